"""Reporting from the per-connection programs (relaylock, poplock-logauth) without the journal module.

They run once per connection and cannot afford to import systemd.journal, yet their
events should carry MESSAGE_ID and POPLOCK_* fields like everyone else's: the native
protocol is one datagram of FIELD=value lines to journald's socket (sd_journal_sendv(3)).
Under inetd, standard error is the client's connection like standard input and output:
then nothing may be written to it.
"""

import _socket
import posix

JOURNAL_SOCKET = "/run/systemd/journal/socket"


def stderr_is_journal() -> bool:
    stream = posix.environ.get(b"JOURNAL_STREAM", b"")
    device, _, inode = stream.partition(b":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        status = posix.fstat(2)
    except OSError:
        return False
    return (status.st_dev, status.st_ino) == (int(device), int(inode))


def encode_field(name: str, value: str) -> bytes:
    data = value.encode("utf-8", "replace")
    if b"\n" in data:  # the binary form: name, newline, 64-bit little-endian length, data
        return name.encode() + b"\n" + len(data).to_bytes(8, "little") + data + b"\n"
    return name.encode() + b"=" + data + b"\n"


def stderr_is_connection() -> bool:
    """Standard error is the same socket as standard input (inetd hands the client all three)."""
    try:
        error, connection = posix.fstat(2), posix.fstat(0)
    except OSError:
        return False
    is_socket = error.st_mode & 0o170000 == 0o140000
    return is_socket and (error.st_dev, error.st_ino) == (connection.st_dev, connection.st_ino)


def report(identifier: str, message: str, priority: int = 6, event=None, address: str | None = None) -> None:
    """One line: to the journal when stderr is a journal stream or the client's connection, else stderr."""
    if stderr_is_journal():
        if send_entry(identifier, message, priority, event, address):
            return
    elif stderr_is_connection():
        send_entry(identifier, message, priority, event, address)  # the journal, or nowhere
        return
    try:
        posix.write(2, f"{identifier}: {message}\n".encode("utf-8", "replace"))
    except OSError:
        pass


def send_entry(identifier: str, message: str, priority: int, event=None, address: str | None = None) -> bool:
    fields = [("MESSAGE", message), ("PRIORITY", str(priority)), ("SYSLOG_IDENTIFIER", identifier)]
    if event is not None:
        fields += [("MESSAGE_ID", event.message_id), ("POPLOCK_EVENT", event.name)]
    if address is not None:
        fields.append(("POPLOCK_CLIENT_ADDRESS", address))
    return send(fields)


def send(fields: list[tuple[str, str]]) -> bool:
    """Send one entry to journald; False when journald cannot be reached."""
    datagram = b"".join(encode_field(name, value) for name, value in fields)
    connection = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM)
    try:
        connection.sendto(datagram, JOURNAL_SOCKET)
    except OSError:
        return False
    finally:
        connection.close()
    return True
