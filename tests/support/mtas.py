"""Real Sendmail 8.17, Exim 4.96 and OpenSMTPD 6.8 on loopback ports, beside the machine's Postfix, and
a Postfix 3.7 instance with a local domain, each asking poplock-socketmap whether a client may relay.

The four MTAs conflict as Debian packages (each provides mail-transport-agent), and the
machine keeps Postfix installed. `install_mtas()` therefore unpacks Sendmail's, Exim's and
OpenSMTPD's packages with `dpkg-deb -x` into folders of their own under INSTALL_ROOT (as
popservers.py does for the POP3 servers), installs only the libraries they link with and
m4 (`apt-get satisfy`), and creates the system users the binaries are compiled to run
as. Nothing is installed as an MTA and no package's maintainer script runs.

Each MTA here takes its relay rule from poplock-socketmap(8): `manual_snippet()` reads a
literal display of that page, so a test that passes proves the manual. Every instance:

  * listens on 127.0.0.1 (and ::1 where the MTA's snippet is checked with IPv6) on a
    free port, so clients from 127.0.0.5, 127.0.0.6 ... are outsiders;
  * accepts mail for the local domain poplock.test from anyone, and relays for nobody
    but the clients poplock-socketmap answers OK for;
  * delivers nothing that leaves the machine (queue only, discard, or a relay host on
    port 9 of 127.0.0.1), and is gone, with every process it started, when stopped.
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import os
import pwd
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .popservers import INSTALL_ROOT, _apt, _no_daemon_starts
from .ports import free_port, wait_for_port
from .postfix import PostfixInstance, _backdate
from .processes import Service, group_running, reachable_by_everyone, signal_group
from .smtpservers import LOCAL_DOMAIN

REPOSITORY = Path(__file__).resolve().parents[2]
PAGE = REPOSITORY / "man" / "poplock-socketmap.8"
# The socket path the manual's snippets name; the tests put their own in its place.
MANUAL_SOCKET = "/run/poplock-socketmap.sock"

# Unpacked together into INSTALL_ROOT/mta-NAME.
PACKAGES = {
    "sendmail": ("sendmail-bin", "sendmail-base", "sendmail-cf"),
    "exim4": ("exim4-daemon-light", "exim4-base", "exim4-config"),
    "opensmtpd": ("opensmtpd",),
}
# (name, group or None for a group of its own, home), as the packages' postinst scripts make them.
_SYSTEM_ACCOUNTS = (
    ("Debian-exim", None, "/var/spool/exim4"),
    ("opensmtpq", None, "/var/lib/opensmtpd/empty"),
    ("opensmtpd", None, "/var/lib/opensmtpd/empty"),
)

SENDMAIL = INSTALL_ROOT / "mta-sendmail/usr/libexec/sendmail/sendmail"
SENDMAIL_CF = INSTALL_ROOT / "mta-sendmail/usr/share/sendmail/cf"
EXIM = INSTALL_ROOT / "mta-exim4/usr/sbin/exim4"
OPENSMTPD = INSTALL_ROOT / "mta-opensmtpd"


def install_mtas() -> None:
    """Unpack the MTAs and install what they link with; does nothing (milliseconds) when done already."""
    INSTALL_ROOT.mkdir(parents=True, exist_ok=True)
    with open(INSTALL_ROOT / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        missing = [name for name in PACKAGES if not (INSTALL_ROOT / f"mta-{name}" / ".unpacked").exists()]
        if missing:
            print(f"unpacking into {INSTALL_ROOT}: {' '.join(missing)}", file=sys.stderr, flush=True)
            _unpack(missing)
        depends = _libraries()
        stamp = INSTALL_ROOT / ".mta-dependencies"
        if not stamp.exists() or stamp.read_text() != depends:
            with _no_daemon_starts():
                _apt("satisfy", depends)
            stamp.write_text(depends)
        for name, group, home in _SYSTEM_ACCOUNTS:
            _ensure_system_account(name, group, home)


def _unpack(names: list[str]) -> None:
    with tempfile.TemporaryDirectory() as download:
        packages = [package for name in names for package in PACKAGES[name]]
        _apt("download", *packages, cwd=Path(download))
        for name in names:
            target = INSTALL_ROOT / f"mta-{name}"
            partial = INSTALL_ROOT / f".mta-{name}.partial"
            subprocess.run(["rm", "-rf", str(partial)], check=True)
            controls = []
            for package in PACKAGES[name]:
                (deb,) = Path(download).glob(f"{package}_*.deb")
                subprocess.run(["dpkg-deb", "-x", str(deb), str(partial)], check=True)
                controls.append(subprocess.run(["dpkg-deb", "-f", str(deb), "Package", "Version", "Depends"],
                                               check=True, capture_output=True, text=True).stdout)
            (partial / ".unpacked").write_text("\n".join(controls))
            subprocess.run(["rm", "-rf", str(target)], check=True)
            partial.rename(target)


def _libraries() -> str:
    """The shared libraries the unpacked packages depend on, and m4 (Sendmail's configuration
    is built with it); not the rest of their Depends (debconf, cron, adduser ...), which serve
    maintainer scripts that never run here."""
    clauses = ["m4"]
    for name in PACKAGES:
        control = (INSTALL_ROOT / f"mta-{name}" / ".unpacked").read_text()
        for depends in re.findall(r"^Depends: (.*)$", control, re.M):
            for clause in (c.strip() for c in depends.split(",")):
                if clause.startswith("lib") and "|" not in clause and clause not in clauses:
                    clauses.append(clause)
    return ", ".join(clauses)


def _ensure_system_account(name: str, group: str | None, home: str) -> None:
    try:
        pwd.getpwnam(name)
    except KeyError:
        argv = ["adduser", "--system", "--quiet", "--no-create-home", "--home", home, "--disabled-login"]
        argv += ["--ingroup", group] if group else ["--group"]
        if not name.islower():
            argv.append("--allow-bad-names")
        subprocess.run([*argv, name], check=True)


# --- the manual --------------------------------------------------------------------------------

def manual_snippet(subsection: str, containing: str) -> str:
    """The literal display in `.Ss SUBSECTION` of poplock-socketmap(8) that holds `containing`,
    as an admin would copy it from the rendered page (roff escapes undone)."""
    text = PAGE.read_text()
    start = text.index(f"\n.Ss {subsection}\n")
    end = min((index for index in (text.find("\n.Ss ", start + 1), text.find("\n.Sh ", start + 1)) if index > 0),
              default=len(text))
    blocks = re.findall(r"^\.Bd -literal[^\n]*\n(.*?)^\.Ed$", text[start:end], re.M | re.S)
    found = [block for block in blocks if containing in block]
    assert len(found) == 1, f"poplock-socketmap(8) {subsection}: {len(found)} displays hold {containing!r}"
    return found[0].replace("\\&", "").replace("\\e", "\\")


# --- Postfix -------------------------------------------------------------------------------------

class PostfixWithLocalDomain(PostfixInstance):
    """PostfixInstance that is also the final destination for poplock.test (mail to it is
    discarded), with `main_cf` (the manual's smtpd_relay_restrictions) in place of the
    instance's own. `socket` is where the manual's `private/poplock-socketmap` is for it."""

    def __init__(self, directory: Path, main_cf: str):
        super().__init__(directory, "permit_auth_destination")
        self.main_cf = main_cf
        self.socket = self.queue_directory / "private" / "poplock-socketmap"

    def _write_config(self) -> None:
        super()._write_config()
        main = self.config_directory / "main.cf"
        with open(main, "a") as file:  # a later assignment replaces an earlier one
            file.write(f"mydestination = {LOCAL_DOMAIN}\nlocal_transport = discard:local\n"
                       f"alias_maps =\n{self.main_cf}\n")
        _backdate(main)
        self._postfix("check")


# --- processes in a process group or mount namespace ------------------------------------------

class _Daemon(Service):
    """A server run in the foreground in a process group of its own, its output to `log`."""

    name = "daemon"

    def __init__(self, directory: Path):
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        reachable_by_everyone(directory)
        self.port = free_port()
        self.log = directory / f"{self.name}.out"
        self.process: subprocess.Popen | None = None

    def _spawn(self, argv: list[str]) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                            start_new_session=True)

    def _wait_for_greeting(self, hosts: tuple[str, ...] = ("127.0.0.1",), timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        for host in hosts:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{self.output()}")
                try:
                    wait_for_port(host, self.port, timeout=0.1)
                    with socket.create_connection((host, self.port), timeout=5) as probe:
                        if probe.recv(512).startswith(b"220"):
                            probe.sendall(b"QUIT\r\n")
                            break
                except (TimeoutError, OSError):
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name} does not greet on {host} port {self.port}:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        if self.process is None:
            return
        group = self.process.pid
        signal_group(group, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while self.process.poll() is None or group_running(group):
            if time.monotonic() > deadline:
                signal_group(group, signal.SIGKILL)
                deadline = time.monotonic() + 5
            time.sleep(0.01)
        self.process = None


# --- Sendmail ------------------------------------------------------------------------------------

SENDMAIL_MC = """\
divert(-1)
divert(0)dnl
include(`{cf}/m4/cf.m4')dnl
OSTYPE(`linux')dnl
FEATURE(`no_default_msa')dnl
define(`confDOMAIN_NAME', `mx.{domain}')dnl
define(`QUEUE_DIR', `{directory}/queue')dnl
define(`confPID_FILE', `{directory}/sendmail.pid')dnl
define(`STATUS_FILE', `{directory}/statistics')dnl
define(`ALIAS_FILE', `{directory}/aliases')dnl
define(`confSERVICE_SWITCH_FILE', `{directory}/service.switch')dnl
define(`confDONT_PROBE_INTERFACES', `true')dnl
define(`confDELIVERY_MODE', `queueonly')dnl
define(`confDONT_BLAME_SENDMAIL', `TrustStickyBit')dnl
FEATURE(`nocanonify')dnl
FEATURE(`accept_unresolvable_domains')dnl
LOCAL_DOMAIN(`{domain}')dnl
DAEMON_OPTIONS(`Family=inet, Name=MTA-v4, Port={port}, Addr=127.0.0.1')dnl
DAEMON_OPTIONS(`Family=inet6, Name=MTA-v6, Port={port}, Addr=::1')dnl
{snippet}MAILER(`local')dnl
MAILER(`smtp')dnl
"""


class Sendmail(_Daemon):
    """Sendmail 8.17 (`sendmail -bD`) with the manual's .mc lines, asking the socket `socket`.

    Its host name is mx.poplock.test, set in a UTS namespace of its own (unshare -u): with
    this machine's undotted name Sendmail would sleep a minute at start. Its queue, pid file
    and aliases are under `directory`; delivery is queue-only.
    """

    name = "sendmail"

    def __init__(self, directory: Path, snippet: str, socket_path: Path):
        super().__init__(directory)
        self.snippet = snippet.replace(MANUAL_SOCKET, str(socket_path))
        self.cf = directory / "sendmail.cf"

    def _write_config(self) -> None:
        d = self.directory
        (d / "queue").mkdir(mode=0o700, exist_ok=True)
        d.chmod(0o755)  # Sendmail refuses group- or world-writable directories on its paths
        (d / "service.switch").write_text("hosts files\naliases files\n")  # no DNS
        (d / "aliases").write_text("")
        (d / "statistics").write_text("")
        mc = SENDMAIL_MC.format(cf=SENDMAIL_CF, domain=LOCAL_DOMAIN, directory=d, port=self.port,
                                snippet=self.snippet)
        (d / "sendmail.mc").write_text(mc)
        with open(self.cf, "w") as cf:
            subprocess.run(["m4", f"-D_CF_DIR_={SENDMAIL_CF}/", str(d / "sendmail.mc")], stdout=cf, check=True)

    def _command(self, *arguments: str) -> list[str]:
        inner = f"hostname mx.{LOCAL_DOMAIN} && exec {shlex.quote(str(SENDMAIL))} -C {shlex.quote(str(self.cf))} "
        return ["unshare", "-u", "sh", "-c", inner + " ".join(shlex.quote(a) for a in arguments)]

    def start(self) -> "Sendmail":
        self._write_config()
        self._spawn(self._command("-bD"))
        self._wait_for_greeting(("127.0.0.1", "::1"))
        return self

    def check_in_test_mode(self, client_address: str, recipient: str) -> str:
        """What check_rcpt returns for `recipient` from `client_address` as Sendmail spells it
        (e.g. `IPv6:2001:db8:0:0:0:0:0:5`), by `sendmail -bt`: "$# RELAY" or an error."""
        result = subprocess.run(self._command("-bt"), input=f".D{{client_addr}}{client_address}\n"
                                f"check_rcpt <{recipient}>\n", capture_output=True, text=True, timeout=60)
        lines = [line for line in result.stdout.splitlines() if line.startswith("check_rcpt")]
        assert lines, result.stdout + result.stderr
        return lines[-1].split("returns:", 1)[1].strip()


# --- Exim ------------------------------------------------------------------------------------------

EXIM_CONF = """\
primary_hostname = mx.{domain}
daemon_smtp_ports = {port}
local_interfaces = <; 127.0.0.1 ; ::1
spool_directory = {directory}/spool
log_file_path = {directory}/log/%slog
exim_user = Debian-exim
exim_group = Debian-exim
host_lookup =
rfc1413_hosts =
tls_advertise_hosts =
keep_environment =
queue_only = true
domainlist local_domains = {domain}
domainlist relay_to_domains =
acl_smtp_rcpt = acl_check_rcpt

begin acl

acl_check_rcpt:
  accept  hosts = :
{snippet}
  require message = relay not permitted
          domains = +local_domains : +relay_to_domains
  accept

begin routers

discard_all:
  driver = redirect
  data = :blackhole:
"""


class Exim(_Daemon):
    """Exim 4.96 (exim4-daemon-light, `exim4 -bdf`) whose RCPT ACL is the manual's, as in Debian's
    acl_check_rcpt: the poplock lines come before the `require ... relay not permitted` that refuses
    the rest. Queue only, and a router that blackholes everything: nothing is ever delivered."""

    name = "exim"

    def __init__(self, directory: Path, snippet: str, socket_path: Path):
        super().__init__(directory)
        self.snippet = snippet.replace(MANUAL_SOCKET, str(socket_path)).rstrip("\n")
        self.conf = directory / "exim.conf"

    def _write_config(self) -> None:
        d = self.directory
        for sub in ("spool", "log"):
            (d / sub).mkdir(exist_ok=True)
            subprocess.run(["chown", "Debian-exim:Debian-exim", str(d / sub)], check=True)
        self.conf.write_text(EXIM_CONF.format(domain=LOCAL_DOMAIN, port=self.port, directory=d,
                                              snippet=self.snippet))
        check = subprocess.run([str(EXIM), "-C", str(self.conf), "-bV"], capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"exim rejects its configuration:\n{check.stdout}{check.stderr}")

    def start(self) -> "Exim":
        self._write_config()
        self._spawn([str(EXIM), "-C", str(self.conf), "-bdf", "-oX", str(self.port),
                     "-oP", str(self.directory / "exim.pid")])
        self._wait_for_greeting(("127.0.0.1", "::1"))
        return self

    def check_in_test_mode(self, client_address: str, recipient: str) -> tuple[int, str]:
        """The RCPT reply for `recipient` in a fake session from `client_address` (`exim -bh`),
        which runs the ACL for real and spells IPv6 addresses zero-padded."""
        session = (f"EHLO client.{LOCAL_DOMAIN}\r\nMAIL FROM:<sender@{LOCAL_DOMAIN}>\r\n"
                   f"RCPT TO:<{recipient}>\r\nQUIT\r\n")
        result = subprocess.run([str(EXIM), "-C", str(self.conf), "-bh", client_address], input=session,
                                capture_output=True, text=True, timeout=60)
        replies = [line for line in result.stdout.splitlines() if re.match(r"^\d{3} ", line)]
        # 220 greeting, 250 EHLO, 250 MAIL, then the RCPT reply
        assert len(replies) >= 4, result.stdout + result.stderr
        code, _, text = replies[3].partition(" ")
        return int(code), text


# --- OpenSMTPD ---------------------------------------------------------------------------------

OPENSMTPD_CONF = """\
table aliases {{ "root" = "nobody" }}
action "local" maildir "/var/spool/poplock-maildir/%{{user.username}}" alias <aliases>
action "relay" relay host smtp://127.0.0.1:9
{snippet}"""


class OpenSmtpd(_Daemon):
    """OpenSMTPD 6.8 (`smtpd -d`) with the manual's smtpd.conf lines, in a mount namespace of
    its own: smtpd's compiled-in paths (/var/spool/smtpd, its chroot /var/lib/opensmtpd/empty,
    /usr/libexec/opensmtpd, /var/run/smtpd.sock) are private tmpfs or the unpacked copy there,
    and resolv.conf names 127.0.0.1, so no DNS query leaves the machine. Relayed mail would go
    to 127.0.0.1 port 9, where nothing listens; local mail goes to maildirs on the private tmpfs.
    The manual's `listen on 0.0.0.0` becomes 127.0.0.1 and ::1 on a free port;
    `replacements` put the test's paths and domain in place of the manual's.
    """

    name = "opensmtpd"

    def __init__(self, directory: Path, snippet: str, replacements: dict[str, str]):
        super().__init__(directory)
        directory.chmod(0o755)
        for old, new in replacements.items():
            snippet = snippet.replace(old, new)
        listen = re.search(r"^listen on 0\.0\.0\.0( .*)$", snippet, re.M)
        assert listen, f"no `listen on 0.0.0.0` line in {snippet!r}"
        self.snippet = snippet.replace(listen.group(0), f"listen on 127.0.0.1 port {self.port}{listen.group(1)}\n"
                                                        f"listen on ::1 port {self.port}{listen.group(1)}")
        self.namespace: str | None = None

    def start(self) -> "OpenSmtpd":
        d = self.directory
        conf = d / "smtpd.conf"
        conf.write_text(OPENSMTPD_CONF.format(snippet=self.snippet))
        conf.chmod(0o644)
        (d / "resolv.conf").write_text("nameserver 127.0.0.1\n")
        script = d / "run.sh"
        script.write_text("\n".join([
            "set -e",
            "mount -t tmpfs -o mode=0755 tmpfs /var/spool",
            "mkdir -m 1777 /var/spool/poplock-maildir",
            "mount -t tmpfs -o mode=0755 tmpfs /var/lib",
            "mkdir -p /var/lib/opensmtpd/empty",
            "mount -t tmpfs -o mode=0755 tmpfs /run",
            f"mount --bind {OPENSMTPD}/usr/libexec /usr/libexec",
            f"mount --bind {d}/resolv.conf /etc/resolv.conf",
            "echo ready",
            f"exec {OPENSMTPD}/usr/sbin/smtpd -d -v -T lookup -T rules -f {conf}",
        ]) + "\n")
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "/bin/sh",
                                             str(script)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                            stderr=log, start_new_session=True)
        ready = self.process.stdout.readline()
        self.process.stdout.close()
        if ready != b"ready\n":
            raise RuntimeError(f"opensmtpd did not start:\n{self.output()}")
        self.namespace = os.readlink(f"/proc/{self.process.pid}/ns/mnt")
        self._wait_for_greeting(("127.0.0.1", "::1"))
        return self

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _processes(self) -> list[int]:
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{entry}/ns/mnt") == self.namespace:
                        found.append(int(entry))
        return found

    def stop(self) -> None:
        """Every process in smtpd's mount namespace gets SIGTERM, and SIGKILL after 10 s."""
        if self.process is None:
            return
        if self.namespace is not None:
            signalled: set[int] = set()
            deadline = time.monotonic() + 10
            while processes := self._processes():
                late = time.monotonic() > deadline
                for pid in processes:
                    if late or pid not in signalled:
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL if late else signal.SIGTERM)
                        signalled.add(pid)
                time.sleep(0.02)
        else:
            self.process.kill()
        self.process.wait(10)
        self.process = None
        self.namespace = None


# --- poplock-socketmap behind an MTA -------------------------------------------------------------

def socket_permissions(unit_text: str) -> tuple[str, str, int]:
    """SocketUser=, SocketGroup= and SocketMode= of a socket unit or drop-in (the last of each)."""
    found = dict(re.findall(r"^(SocketUser|SocketGroup|SocketMode)=(\S+)$", unit_text, re.M))
    return found["SocketUser"], found["SocketGroup"], int(found["SocketMode"], 8)


class SocketmapBehind:
    """poplock-socketmap (verbose, so that every key is logged as the MTA spelled it) on the unix
    socket `socket_path`, with its own configuration and store under `directory`; it can be stopped
    and started again while the MTA runs. `permissions` (user, group, mode), from the unit or the
    manual's drop-in, are given to the socket as systemd would: the MTA must reach it so."""

    def __init__(self, directory: Path, socket_path: Path, permissions: tuple[str, str, int] | None = None):
        from .poplock import Setup

        directory.mkdir(parents=True, exist_ok=True)
        self.setup = Setup(directory)
        self.socket = socket_path
        self.permissions = permissions
        self.process = None
        self._logs: list[Path] = []

    def start(self) -> "SocketmapBehind":
        from .socketmap import SocketmapProcess

        self.process = SocketmapProcess(self.setup, str(self.socket), verbose=True)
        self._logs.append(self.process.log)
        if self.permissions is not None:
            user, group, mode = self.permissions
            os.chown(self.socket, pwd.getpwnam(user).pw_uid, grp.getgrnam(group).gr_gid)
            os.chmod(self.socket, mode)
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None

    @contextlib.contextmanager
    def stopped(self):
        """poplock-socketmap stopped (its socket gone) for the body, then started again."""
        self.stop()
        try:
            yield
        finally:
            self.start()

    def grant(self, address: str) -> None:
        self.setup.run("add", address, check=True)

    def remove(self, address: str) -> None:
        self.setup.run("remove", address, check=True)

    def expired_grant(self, address: str) -> None:
        """A grant for `address` from a login 30 minutes and a second ago, which expired a second ago."""
        from poplock.grants import Grant
        from poplock.storewriter import StoreWriter

        now = int(time.time())
        with StoreWriter(str(self.setup.store)).transaction() as transaction:
            transaction.grants[address] = Grant(address, now - 1, now - 1801, "dovecot")

    def output(self) -> str:
        return "".join(log.read_text() for log in self._logs)

    def __enter__(self) -> "SocketmapBehind":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


LOCAL_RECIPIENT = f"root@{LOCAL_DOMAIN}"


def send_local_mail(port: int, *, source: str, host: str = "127.0.0.1") -> tuple[int, str]:
    """A whole message from `source` to a local recipient; the reply to its end of DATA.
    Its lines end in CRLF: Sendmail 8.17 refuses bare line feeds (421 4.5.0)."""
    from .smtpservers import send_message

    message = (f"From: <sender@{LOCAL_DOMAIN}>\r\nTo: <{LOCAL_RECIPIENT}>\r\nSubject: poplock test\r\n\r\n"
               "local mail, whatever poplock says\r\n")
    return send_message(host, port, source=source, recipient=LOCAL_RECIPIENT, message=message)


if __name__ == "__main__":  # make test-servers: PYTHONPATH=tests python3 -m support.mtas
    install_mtas()
