"""qmail-style SMTP servers that honour RELAYCLIENT, the launchers that run them, and an SMTP client.

relaylock sits between a per-connection launcher and the SMTP server: it sets or removes
RELAYCLIENT and then execs the server. Tests need real servers that decide relaying on that
variable alone, under the launchers sites use, with the wrapper slot where relaylock goes:

    launcher ... WRAPPER... SERVER...

- mailfront (`smtpfront-echo relayclient qmail-validate`): relays when RELAYCLIENT is set,
  to anything including "". It delivers nothing; the echo back end logs the envelope.
- qpsmtpd with its `relay` and `rcpt_ok` plugins: relays only when RELAYCLIENT is true in
  Perl's sense ("" and "0" are not). It has no inetd-style launcher in Debian, so a small
  Perl one is written next to its configuration.
- tcpserver (ucspi-tcp) passes its own environment through to the server, so an inherited
  RELAYCLIENT reaches it unless something removes it.
- systemd-socket-activate --accept --inetd wipes the environment to PATH, HOME and TERM plus
  its -E NAME=VALUE options, as a systemd Accept=yes socket does.

Recipients outside the local domain (poplock.test) are what relaying means here.
"""

from __future__ import annotations

import os
import signal
import smtplib
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from .ports import free_port, wait_for_port
from .processes import Service, group_running, signal_group

LOCAL_DOMAIN = "poplock.test"
FOREIGN_RECIPIENT = "someone@elsewhere.example"
LOCAL_SENDER = "sender@poplock.test"
CLIENT_NAME = "client.poplock.test"

MAILFRONT = "/usr/sbin/smtpfront-echo"
TCPSERVER = "/usr/bin/tcpserver"
SOCKET_ACTIVATE = "/usr/bin/systemd-socket-activate"

# Reads the connection from fd 0, as under inetd, tcpserver or an Accept=yes socket.
# Qpsmtpd looks for its configuration in config/ next to this script ($0).
QPSMTPD_LAUNCHER = """\
#!/usr/bin/perl -w
use strict;
use IO::Socket::INET;
use Qpsmtpd::TcpServer;
$| = 1;
my $client = IO::Socket::INET->new_from_fd(0, "r+") or die "standard input is not a socket: $!\\n";
my $qpsmtpd = Qpsmtpd::TcpServer->new();
$qpsmtpd->load_plugins();
$qpsmtpd->start_connection();
$qpsmtpd->run($client);
$qpsmtpd->run_hooks("post-connection");
$qpsmtpd->connection->reset;
"""


@dataclass(frozen=True)
class SmtpCommand:
    """How to run one SMTP conversation on standard input and output.

    `environment` is what the server itself needs (e.g. QMAILHOME); launchers pass it on.
    `directory` holds its configuration and is where launchers write their logs.
    """

    argv: tuple[str, ...]
    directory: Path
    environment: Mapping[str, str] = field(default_factory=dict)


def mailfront(directory: Path, *, local_domain: str = LOCAL_DOMAIN) -> SmtpCommand:
    """mailfront accepting mail for `local_domain`; other recipients need RELAYCLIENT set."""
    control = directory / "control"
    control.mkdir(parents=True, exist_ok=True)
    # Without the accept-recipient plugin (which accepts everything), qmail-validate's
    # rcpthosts check is the only gate, and relayclient opens it when RELAYCLIENT is set.
    (control / "rcpthosts").write_text(f"{local_domain}\n")
    return SmtpCommand(
        argv=(MAILFRONT, "relayclient", "qmail-validate"),
        directory=directory,
        environment={"QMAILHOME": str(directory)},
    )


def qpsmtpd(directory: Path, *, local_domain: str = LOCAL_DOMAIN) -> SmtpCommand:
    """qpsmtpd accepting mail for `local_domain` into DIRECTORY/maildir; relaying needs RELAYCLIENT=1."""
    config = directory / "config"
    spool = directory / "spool"
    maildir = directory / "maildir"
    for path in (config, maildir / "new", maildir / "cur", maildir / "tmp"):
        path.mkdir(parents=True, exist_ok=True)
    spool.mkdir(mode=0o700, exist_ok=True)
    files = {
        "plugin_dirs": "/usr/share/qpsmtpd/plugins\n",
        # relay sets "relay client" from RELAYCLIENT at connect; rcpt_ok refuses foreign
        # recipients to everyone else.
        "plugins": f"relay\nrcpt_ok\nqueue/maildir {maildir}\n",
        "rcpthosts": f"{local_domain}\n",
        # Empty, so that no client address relays by itself; without the file qpsmtpd
        # would read /var/qmail/control/relayclients.
        "relayclients": "",
        "me": f"mx.{local_domain}\n",
        "spool_dir": f"{spool}\n",
        "logging": "logging/warn LOGINFO\n",
        "loglevel": "6\n",
    }
    for name, text in files.items():
        (config / name).write_text(text)
    launcher = directory / "qpsmtpd"
    launcher.write_text(QPSMTPD_LAUNCHER)
    launcher.chmod(0o755)
    return SmtpCommand(argv=(str(launcher),), directory=directory)


class _Launcher(Service):
    """A per-connection launcher on 127.0.0.1:`port`, in its own process group.

    The launcher's own environment is PATH plus `environment`; its output and the servers'
    (stderr) go to `log`.
    """

    name = "launcher"

    def __init__(self, server: SmtpCommand, *, wrapper: Sequence[str] = (),
                 environment: Mapping[str, str] | None = None, log: Path | None = None):
        self.server = server
        self.wrapper = tuple(wrapper)
        self.environment = dict(environment or {})
        self.host = "127.0.0.1"
        self.port = free_port(self.host)
        self.log = log or server.directory / f"{self.name}-{self.port}.log"
        self.process: subprocess.Popen | None = None

    def argv(self) -> list[str]:
        raise NotImplementedError

    def _launcher_environment(self) -> dict[str, str]:
        return {**_base_environment(), **self.environment}

    def start(self) -> Self:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                self.argv(),
                env=self._launcher_environment(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                # One group for the launcher and every server it forks, to stop them together.
                start_new_session=True,
            )
        deadline = time.monotonic() + 10
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.argv()} exited with {self.process.returncode}; see {self.log}")
            try:
                wait_for_port(self.host, self.port, timeout=0.1)
                return self
            except TimeoutError:
                if time.monotonic() > deadline:
                    raise

    def stop(self) -> None:
        if self.process is None:
            return
        group = self.process.pid
        signal_group(group, signal.SIGTERM)
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            signal_group(group, signal.SIGKILL)
            self.process.wait()
        # Servers forked for connections that are still open get the same signal; wait
        # until the last of them has gone.
        deadline = time.monotonic() + 5
        while group_running(group):
            if time.monotonic() > deadline:
                signal_group(group, signal.SIGKILL)
                break
            time.sleep(0.01)
        self.process = None


class TcpServer(_Launcher):
    """`tcpserver -R -H -l 0 127.0.0.1 PORT WRAPPER... SERVER...` (ucspi-tcp).

    tcpserver passes its environment through: `environment` (e.g. an inherited RELAYCLIENT)
    reaches the wrapper and the server, together with TCPREMOTEIP and friends.
    """

    name = "tcpserver"

    def argv(self) -> list[str]:
        # -R -H -l 0: no ident or DNS lookups, which would stall each connection offline.
        return [TCPSERVER, "-R", "-H", "-l", "0", self.host, str(self.port),
                *self.wrapper, *self.server.argv]

    def _launcher_environment(self) -> dict[str, str]:
        return {**_base_environment(), **self.server.environment, **self.environment}


class SocketActivate(_Launcher):
    """`systemd-socket-activate --accept --inetd -l 127.0.0.1:PORT -E ... WRAPPER... SERVER...`.

    Each connection's process gets PATH, HOME, TERM and the -E values only: the server's own
    environment and `setenv`. `environment` goes to systemd-socket-activate itself, and is
    wiped before the server runs.
    """

    name = "socket-activate"

    def __init__(self, server: SmtpCommand, *, wrapper: Sequence[str] = (),
                 setenv: Mapping[str, str] | None = None,
                 environment: Mapping[str, str] | None = None, log: Path | None = None):
        super().__init__(server, wrapper=wrapper, environment=environment, log=log)
        self.setenv = {**server.environment, **(setenv or {})}

    def argv(self) -> list[str]:
        options = [option for name, value in self.setenv.items() for option in ("-E", f"{name}={value}")]
        return [SOCKET_ACTIVATE, "--accept", "--inetd", "-l", f"{self.host}:{self.port}", *options,
                *self.wrapper, *self.server.argv]


def _base_environment() -> dict[str, str]:
    # Not the test runner's whole environment: a stray RELAYCLIENT there would change results.
    return {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")}


def _connect(host: str, port: int, source: str) -> smtplib.SMTP:
    # An explicit EHLO name: smtplib would otherwise look up this host's name in DNS.
    return smtplib.SMTP(host, port, local_hostname=CLIENT_NAME, source_address=(source, 0), timeout=10)


def _envelope(client: smtplib.SMTP, sender: str, recipient: str) -> tuple[int, str]:
    client.ehlo_or_helo_if_needed()
    code, text = client.mail(sender)
    if code != 250:
        raise smtplib.SMTPSenderRefused(code, text, sender)
    code, text = client.rcpt(recipient)
    return code, text.decode(errors="replace")


def try_relay(host: str, port: int, *, source: str, sender: str = LOCAL_SENDER,
              recipient: str = FOREIGN_RECIPIENT) -> tuple[int, str]:
    """EHLO, MAIL FROM and RCPT TO from client address `source`; the RCPT reply, e.g.
    (554, "5.7.1 <someone@elsewhere.example>: Relay access denied")."""
    with _connect(host, port, source) as client:
        return _envelope(client, sender, recipient)


def send_message(host: str, port: int, *, source: str, sender: str = LOCAL_SENDER,
                 recipient: str = FOREIGN_RECIPIENT, message: str | None = None) -> tuple[int, str]:
    """A whole message from `source` (a small one by default); the reply to its end of DATA.

    Raises smtplib.SMTPRecipientsRefused when RCPT is refused.
    """
    if message is None:
        message = f"From: <{sender}>\nTo: <{recipient}>\nSubject: poplock test\n\npoplock test message\n"
    with _connect(host, port, source) as client:
        code, text = _envelope(client, sender, recipient)
        if code not in (250, 251):
            raise smtplib.SMTPRecipientsRefused({recipient: (code, text.encode())})
        # smtplib turns bare LF line ends into CRLF and dot-stuffs.
        code, reply = client.data(message.encode())
        return code, reply.decode(errors="replace")
