"""A throwaway Postfix 3.7 instance on a loopback port, whose relay decision asks one restriction.

poplock tells Postfix whom to relay for through `smtpd_relay_restrictions` (a policy
service or a lookup table). Tests need a real Postfix that asks exactly that restriction,
on a free port, next to other instances, and that is gone when the test ends.

The instance listens on 127.0.0.1 only and has mynetworks = 127.0.0.1/32, so clients that
connect from 127.0.0.5, 127.0.0.6, ... are outsiders that may relay only when the
restriction says so. It delivers nothing (every message goes to the discard transport)
and logs to DIRECTORY/maillog instead of syslog. It must run as root. `postmulti` cannot
manage such an instance; `postfix -c DIRECTORY/etc` can.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from .ports import free_port, wait_for_port
from .processes import Service, group_running, signal_group

POSTFIX = "/usr/sbin/postfix"

MASTER_CF = """\
127.0.0.1:{port} inet n  -       n       -       -       smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


class PostfixInstance(Service):
    """Postfix on 127.0.0.1:`port` with relay restrictions
    `permit_mynetworks, RESTRICTION, reject_unauth_destination`.

    The restriction is main.cf text, e.g. `check_client_access cidr:/path/clients.cidr` or
    `check_policy_service { inet:127.0.0.1:PORT, timeout=2s, try_limit=1, default_action=DUNNO }`.
    A restriction that makes reject_unauth_destination unreachable (plain `permit`) stops
    smtpd at start-up; start() then raises with Postfix's reason. Use it as a context
    manager; `maillog` is the log file to read on failures.
    """

    def __init__(self, directory: Path, restriction: str, *, ipv6: bool = False):
        self.directory = directory
        self.restriction = restriction
        self.ipv6 = ipv6  # listen on [::1] too (in a private network namespace with other IPv6 addresses)
        self.port = free_port()
        self.config_directory = directory / "etc"
        self.queue_directory = directory / "spool"
        self.maillog = directory / "maillog"
        self.data_directory: Path | None = None
        self._master_pid: int | None = None
        self._log_start = 0

    def _write_config(self) -> None:
        d = self.directory
        for sub in ("etc", "spool"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        # The master opens its lock file in data_directory as the postfix user, by absolute
        # path, and the directories tests get (pytest's tmp_path) sit below a 0700 parent:
        # the data directory lives in world-traversable /tmp instead, owned by postfix.
        if self.data_directory is None:
            self.data_directory = Path(tempfile.mkdtemp(prefix="poplock-postfix-data-", dir="/tmp"))
            os.chown(self.data_directory, _uid("postfix"), -1)
        (self.config_directory / "main.cf").write_text(
            f"""\
compatibility_level = 3.6
config_directory = {self.config_directory}
queue_directory  = {self.queue_directory}
data_directory   = {self.data_directory}
# postlogd writes only below these prefixes; the instance's own directory is one.
maillog_file_prefixes = /tmp, /var, /dev/stdout, {d}
maillog_file     = {self.maillog}
syslog_name      = poplock-test-postfix
myhostname       = mx.poplock.test
mydomain         = poplock.test
mydestination    =
relay_domains    =
local_recipient_maps =
inet_interfaces  = {"127.0.0.1, [::1]" if self.ipv6 else "127.0.0.1"}
inet_protocols   = {"all" if self.ipv6 else "ipv4"}
mynetworks       = 127.0.0.1/32
smtpd_peername_lookup = no
default_transport = discard:poplock-test
relay_transport   = discard:poplock-test
smtpd_relay_restrictions = permit_mynetworks, {self.restriction}, reject_unauth_destination
biff = no
"""
        )
        master = MASTER_CF.format(port=self.port)
        if self.ipv6:  # the same smtpd on [::1] too
            master = master.replace(f"127.0.0.1:{self.port} inet", f"[::1]:{self.port} inet", 1).replace(
                "\n", f"\n127.0.0.1:{self.port} inet n  -       n       -       -       smtpd\n", 1)
        (self.config_directory / "master.cf").write_text(master)
        # Postfix waits (in 300 ms steps) until main.cf is at least a second older than
        # the clock, in case an editor is still writing it: backdate both files.
        _backdate(self.config_directory / "main.cf", self.config_directory / "master.cf")
        # `postfix check` creates the queue subdirectories and fails on fatal configuration errors.
        self._postfix("check")

    def _postfix(self, command: str) -> None:
        # `postfix start` leaves a daemon behind that inherits our descriptors: its output
        # goes to a file, never a pipe that would stay open as long as the master runs.
        with open(self.directory / "postfix.out", "ab") as output:
            subprocess.run(
                [POSTFIX, "-c", str(self.config_directory), command],
                check=True, stdin=subprocess.DEVNULL, stdout=output, stderr=output,
            )

    def start(self) -> "PostfixInstance":
        self._write_config()
        # Only this run's lines count when looking for start-up errors.
        self._log_start = self.maillog.stat().st_size if self.maillog.exists() else 0
        self._postfix("start")
        self._master_pid = _read_pid(self.queue_directory / "pid" / "master.pid")
        wait_for_port("127.0.0.1", self.port)
        self._wait_for_greeting()
        return self

    def _wait_for_greeting(self, timeout: float = 10.0) -> None:
        """Wait for smtpd's 220 banner. The master listens even when smtpd dies at start-up
        (it rejects some restriction lists as fatal); say why instead of hanging."""
        import socket

        deadline = time.monotonic() + timeout
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as connection:
            connection.settimeout(0.05)
            received = b""
            while b"\n" not in received:
                try:
                    chunk = connection.recv(512)
                    if not chunk:
                        break
                    received += chunk
                except TimeoutError:
                    fatal = self._fatal_errors()
                    if fatal or time.monotonic() > deadline:
                        raise RuntimeError(f"Postfix smtpd did not start: {fatal or 'no greeting'}") from None
            if not received.startswith(b"220"):
                raise RuntimeError(f"Postfix smtpd greeted with {received!r}")
            connection.sendall(b"QUIT\r\n")

    def _fatal_errors(self) -> str:
        try:
            with open(self.maillog, "rb") as log:
                log.seek(self._log_start)
                lines = log.read().decode(errors="replace").splitlines()
        except FileNotFoundError:
            return ""
        return "; ".join(line.split(": ", 1)[1] for line in lines if ": fatal: " in line)

    def stop(self) -> None:
        """Stop the instance; return once its master and smtpd processes are gone."""
        pid = self._master_pid or _read_pid(self.queue_directory / "pid" / "master.pid")
        if pid is not None and _alive(pid):
            # What `postfix stop` does, without its polling in whole seconds: SIGTERM to the
            # master, then wait, since a new master on the same directories refuses to
            # start while the old one still holds its lock file.
            os.kill(pid, signal.SIGTERM)
            if not _wait_until_exited(pid, timeout=10):
                os.killpg(pid, signal.SIGKILL)
                _wait_until_exited(pid, timeout=5)
            # Its children notice within a second or so. The master called setsid(), so its
            # process group is exactly them: SIGTERM, and SIGKILL for a child caught between
            # fork and exec, which blocks SIGTERM and sleeps for a second.
            signal_group(pid, signal.SIGTERM)
            grace, deadline = time.monotonic() + 0.2, time.monotonic() + 10
            while group_running(pid):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"processes of Postfix master {pid} do not exit")
                if time.monotonic() > grace:
                    signal_group(pid, signal.SIGKILL)
                time.sleep(0.01)
            _wait_until_port_closed(self.port)
        self._master_pid = None
        if self.data_directory is not None:
            shutil.rmtree(self.data_directory, ignore_errors=True)
            self.data_directory = None

    def wait_for_log(self, text: str, timeout: float = 10.0) -> str:
        """Wait until the maillog holds a line containing `text`; returns that line."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                for line in self.maillog.read_text().splitlines():
                    if text in line:
                        return line
            except FileNotFoundError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"no line with {text!r} in {self.maillog}")
            time.sleep(0.02)


def _backdate(*paths: Path, seconds: float = 10.0) -> None:
    past = time.time() - seconds
    for path in paths:
        os.utime(path, (past, past))


def _uid(user: str) -> int:
    import pwd

    return pwd.getpwnam(user).pw_uid


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    """True while `pid` runs; a zombie nobody has reaped yet counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _wait_until_exited(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _wait_until_port_closed(port: int, timeout: float = 10.0) -> None:
    """Wait until no socket listens on `port` (smtpd children outlive the master briefly).

    It reads /proc/net/tcp rather than connecting: a connection to a listener nobody
    accepts on any more hangs until its timeout.
    """
    deadline = time.monotonic() + timeout
    while _listening(port):
        if time.monotonic() > deadline:
            raise TimeoutError(f"port {port} still listens after Postfix stopped")
        time.sleep(0.01)


def _listening(port: int) -> bool:
    with open("/proc/net/tcp") as table:
        next(table)
        for line in table:
            local_address, _remote_address, state = line.split()[1:4]
            if int(local_address.rsplit(":", 1)[1], 16) == port and state == "0A":  # TCP_LISTEN
                return True
    return False
