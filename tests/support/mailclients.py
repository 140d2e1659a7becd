"""POP3 and IMAP logins from a chosen client address (127.x.y.z or ::1), plain or TLS."""

from __future__ import annotations

import imaplib
import poplib
import socket
import ssl


def _connect(host: str, port: int, source: str) -> socket.socket:
    return socket.create_connection((host, port), timeout=10, source_address=(source, 0))


def _client_tls() -> ssl.SSLContext:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


class _SourcePOP3(poplib.POP3):
    def __init__(self, host: str, port: int, source: str):
        self.source = source
        super().__init__(host, port, timeout=10)

    def _create_socket(self, timeout):
        return _connect(self.host, self.port, self.source)


class _SourcePOP3_SSL(poplib.POP3_SSL):
    def __init__(self, host: str, port: int, source: str):
        self.source = source
        super().__init__(host, port, timeout=10, context=_client_tls())

    def _create_socket(self, timeout):
        sock = _connect(self.host, self.port, self.source)
        return self.context.wrap_socket(sock, server_hostname=self.host)


class _SourceIMAP4(imaplib.IMAP4):
    def __init__(self, host: str, port: int, source: str):
        self.source = source
        super().__init__(host, port, timeout=10)

    def _create_socket(self, timeout):
        return _connect(self.host, self.port, self.source)


class _SourceIMAP4_SSL(imaplib.IMAP4_SSL):
    def __init__(self, host: str, port: int, source: str):
        self.source = source
        super().__init__(host, port, ssl_context=_client_tls(), timeout=10)

    def _create_socket(self, timeout):
        sock = _connect(self.host, self.port, self.source)
        return self.ssl_context.wrap_socket(sock, server_hostname=self.host)


def pop3_login(host: str, port: int, user: str, password: str, *, source: str,
               tls: str = "none", apop: bool = False) -> bool:
    """USER/PASS (or APOP) login; True when the server accepted the password.

    tls: "none", "implicit" (POP3S) or "starttls" (STLS).
    """
    client = (_SourcePOP3_SSL if tls == "implicit" else _SourcePOP3)(host, port, source)
    try:
        if tls == "starttls":
            client.stls(_client_tls())
        try:
            if apop:
                client.apop(user, password)
            else:
                client.user(user)
                client.pass_(password)
        except poplib.error_proto:
            return False
        client.stat()
        return True
    finally:
        try:
            client.quit()
        except (poplib.error_proto, OSError):
            client.close()


def imap_login(host: str, port: int, user: str, password: str, *, source: str, tls: str = "none") -> bool:
    """LOGIN; True when the server accepted the password. tls as for pop3_login."""
    client = (_SourceIMAP4_SSL if tls == "implicit" else _SourceIMAP4)(host, port, source)
    try:
        if tls == "starttls":
            client.starttls(_client_tls())
        try:
            client.login(user, password)
        except imaplib.IMAP4.error:
            return False
        client.select()
        return True
    finally:
        try:
            client.logout()
        except (imaplib.IMAP4.error, OSError):
            client.shutdown()


def imap_connection(host: str, port: int, user: str, password: str, *, source: str) -> imaplib.IMAP4:
    """An IMAP connection logged in (and INBOX selected) that stays open, as a mail client's does;
    `.logout()` ends it, `.shutdown()` drops it."""
    client = _SourceIMAP4(host, port, source)
    try:
        client.login(user, password)
        client.select()
    except BaseException:
        client.shutdown()
        raise
    return client
