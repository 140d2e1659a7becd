"""Real POP3/IMAP servers other than Dovecot, on loopback ports, logging through syslog(3).

Courier, Cyrus, GNU mailutils, popa3d and solid-pop3d all provide pop3-server or
imap-server and so conflict with Dovecot's packages, which the tests keep installed.
`install_servers()` therefore unpacks each server package with `dpkg-deb -x` into its
own folder under INSTALL_ROOT and installs only their dependencies with
`apt-get satisfy`. Nothing here starts a package's own init script. `make check` runs
it before the tests (`python3 -m support.popservers` with tests/ on the path), and the
tests' `unpacked_servers` fixture runs it again, which takes a few milliseconds once done.

Each server class is a context manager like `dovecot.Dovecot`: free ports, 127.0.0.1
and ::1 only, users given as `name: password`, logging to /dev/log and from there
into the journal. Servers with compiled-in paths (/etc/courier, /etc/passwd,
/var/mail, ...) run in a private mount namespace (unshare(1)) where those paths are
bind mounts of the server's own directory, so the host's files stay untouched and
the mail users exist only for that server.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .dovecot import Dovecot
from .ports import free_port, wait_for_port
from .processes import Service
from .tls import self_signed_certificate

INSTALL_ROOT = Path("/opt/poplock-test-servers")

# Unpacked into INSTALL_ROOT/<package>, never installed: these conflict with Dovecot
# or would pull in a mail transport agent through their Depends.
UNPACKED_PACKAGES = (
    "courier-base",
    "courier-pop",
    "courier-imap",
    "cyrus-common",
    "cyrus-pop3d",
    "cyrus-imapd",
    "mailutils-pop3d",
    "mailutils-imap4d",
    "popa3d",
    "solid-pop3d",
)

# Installed normally besides the unpacked packages' own dependencies.
HELPER_PACKAGES = (
    "sasl2-bin",  # saslpasswd2 writes Cyrus's sasldb
    "openbsd-inetd",  # popa3d and solid-pop3d only listen on port 110 by themselves
    "tcpd",  # the only place popa3d's client address is ever logged
    "openssl",
    "util-linux",  # unshare
)

# Dependency clauses left out: a mail transport agent is not needed to serve POP3
# or IMAP, and these would otherwise install one on a machine that has none.
_SKIPPED_DEPENDENCIES = ("default-mta", "mail-transport-agent")

# System accounts the unpacked packages' maintainer scripts would have created.
# (name, primary group, home)
_SYSTEM_ACCOUNTS = (
    ("cyrus", "mail", "/var/lib/cyrus"),  # Cyrus's master drops root for this compiled-in user
    ("courier", None, "/var/lib/courier"),  # couriertls -user=courier
    ("popa3d", None, "/var/lib/popa3d"),  # popa3d's compiled-in unprivileged user and chroot
    ("spop3d", "mail", "/var/lib/solid-pop3d"),  # solid-pop3d's compiled-in unprivileged user
)


def install_servers(packages: tuple[str, ...] = UNPACKED_PACKAGES) -> None:
    """Unpack the server packages and install what they need; does nothing when done already.

    Several processes may call it at once (`make check` and a test run, say): the second
    waits for the first, then finds everything done.
    """
    INSTALL_ROOT.mkdir(parents=True, exist_ok=True)
    with open(INSTALL_ROOT / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        missing = [p for p in packages if not (INSTALL_ROOT / p / ".unpacked").exists()]
        if missing:
            print(f"unpacking into {INSTALL_ROOT}: {' '.join(missing)}", file=sys.stderr, flush=True)
            _unpack(missing)
        depends = _dependencies(packages)
        stamp = INSTALL_ROOT / ".dependencies"
        if not stamp.exists() or stamp.read_text() != depends:
            print("installing their dependencies", file=sys.stderr, flush=True)
            with _no_daemon_starts():
                _apt("satisfy", depends)
            stamp.write_text(depends)
        for name, group, home in _SYSTEM_ACCOUNTS:
            _ensure_system_account(name, group, home)


@contextlib.contextmanager
def _no_daemon_starts():
    """A policy-rc.d(8) that forbids every start, unless the machine has one already.

    The dependencies include daemons (courier-authdaemon) whose maintainer scripts would
    start them on a machine where invoke-rc.d can; the tests start what they need themselves.
    """
    policy = Path("/usr/sbin/policy-rc.d")
    if policy.exists():
        yield
        return
    policy.write_text("#!/bin/sh\n# tests/support/popservers.py, while it installs: start no daemon.\nexit 101\n")
    policy.chmod(0o755)
    try:
        yield
    finally:
        policy.unlink()


def _apt(command: str, *arguments: str, cwd: Path | None = None) -> None:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    # Waits for another apt or dpkg (unattended-upgrades, a parallel make) instead of failing.
    argv = ["apt-get", "-y", "-q", "--no-install-recommends", "-o", "DPkg::Lock::Timeout=600", command, *arguments]
    result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        # A fresh machine has no package lists yet, or stale ones.
        update = subprocess.run(["apt-get", "-q", "-o", "DPkg::Lock::Timeout=600", "update"],
                                env=env, capture_output=True, text=True)
        result = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{shlex.join(argv)} failed (after apt-get update, exit status"
                               f" {update.returncode}):\n{update.stderr}{result.stdout}{result.stderr}")


def _unpack(packages: list[str]) -> None:
    with tempfile.TemporaryDirectory() as download:
        _apt("download", *packages, cwd=Path(download))
        for package in packages:
            (deb,) = Path(download).glob(f"{package}_*.deb")
            target = INSTALL_ROOT / package
            partial = INSTALL_ROOT / f".{package}.partial"
            shutil.rmtree(partial, ignore_errors=True)
            subprocess.run(["dpkg-deb", "-x", str(deb), str(partial)], check=True)
            control = subprocess.run(
                ["dpkg-deb", "-f", str(deb), "Version", "Depends"],
                check=True, capture_output=True, text=True,
            ).stdout
            (partial / ".unpacked").write_text(control)
            shutil.rmtree(target, ignore_errors=True)
            partial.rename(target)


def _dependencies(packages: tuple[str, ...]) -> str:
    """The union of the packages' Depends, less each other and the mail transport agent."""
    clauses: list[str] = []
    for package in packages:
        control = (INSTALL_ROOT / package / ".unpacked").read_text()
        depends = control.split("Depends:", 1)[1].replace("\n", " ")
        for clause in (c.strip() for c in depends.split(",")):
            names = {alternative.split()[0] for alternative in clause.split("|")}
            if names & set(UNPACKED_PACKAGES) or names & set(_SKIPPED_DEPENDENCIES):
                continue
            if clause and clause not in clauses:
                clauses.append(clause)
    clauses.extend(p for p in HELPER_PACKAGES if p not in clauses)
    return ", ".join(clauses)


def _ensure_system_account(name: str, group: str | None, home: str) -> None:
    try:
        pwd.getpwnam(name)
    except KeyError:
        argv = ["adduser", "--system", "--quiet", "--no-create-home", "--home", home]
        argv += ["--ingroup", group] if group else ["--group"]
        subprocess.run([*argv, name], check=True)
    Path(home).mkdir(parents=True, exist_ok=True)


def _crypt(password: str) -> str:
    """A SHA-512 crypt(3) hash, which every server here checks through libcrypt."""
    return subprocess.run(
        ["openssl", "passwd", "-6", "-stdin"], input=password, check=True, capture_output=True, text=True
    ).stdout.strip()


def _mount_namespace(pid: int) -> str:
    return os.readlink(f"/proc/{pid}/ns/mnt")


class _NamespacedServer(Service):
    """Runs one shell script in a private mount namespace and stops every process in it.

    All of a server's processes inherit the namespace, including daemons that start a
    new session, so stopping means signalling exactly the processes whose mount
    namespace is this one.
    """

    _process: subprocess.Popen | None = None
    _namespace: str | None = None
    # Whether it serves IMAP and the TLS ports besides plain POP3 (ports are taken for each).
    FOUR_PORTS = True

    def __init__(self, directory: Path, users: dict[str, str], *, host_names: dict[str, str] | None = None,
                 journal_sockets: Path | None = None):
        self.directory = directory
        self.users = users
        self.host_names = host_names or {}  # for the namespace's /etc/hosts, where a server resolves names
        # A PrivateJournald's sockets (tests/support/journald.py), bound on /run/systemd/journal
        # in the namespace: /dev/log, and so the server's syslog(3), then lead to that journal.
        self.journal_sockets = journal_sockets
        self.pop3_port = free_port()
        if self.FOUR_PORTS:
            self.pop3s_port = free_port()
            self.imap_port = free_port()
            self.imaps_port = free_port()

    def _spawn(self, binds: list[tuple[Path | str, str]], body: str) -> None:
        script = self.directory / "launch.sh"
        output = self.directory / "server.out"
        if self.journal_sockets is not None:
            binds = [(self.journal_sockets, "/run/systemd/journal"), *binds]
        lines = ["set -e"]
        lines += [f"mount --bind {shlex.quote(str(source))} {shlex.quote(target)}" for source, target in binds]
        # "ready" on the pipe tells that the mounts are in place, so the namespace can
        # be read before anything else happens in it.
        lines += ["echo ready", f"exec >>{shlex.quote(str(output))}", body]
        script.write_text("\n".join(lines) + "\n")
        with open(output, "ab") as errors:
            self._process = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "/bin/sh", str(script)],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=errors, start_new_session=True,
            )
        with self._process.stdout as ready:
            if ready.readline() != b"ready\n":
                self.stop()
                raise RuntimeError(f"{type(self).__name__} did not start: see {output}")
        self._namespace = _mount_namespace(self._process.pid)
        if self._namespace == _mount_namespace(os.getpid()):
            raise RuntimeError("unshare did not give the server a mount namespace of its own")

    def _wait_for_ports(self, *ports: int) -> None:
        """Wait until every port answers on 127.0.0.1 and ::1, or the launcher has died."""
        for port in ports:
            for host in ("127.0.0.1", "::1"):
                deadline = time.monotonic() + 20
                while True:
                    try:
                        wait_for_port(host, port, timeout=0.2)
                        break
                    except TimeoutError:
                        if self._process.poll() is not None or time.monotonic() > deadline:
                            raise RuntimeError(
                                f"{type(self).__name__} is not listening on {host} port {port}:"
                                f" see {self.directory / 'server.out'}"
                            ) from None

    def _wait_for_unix_socket(self, path: Path) -> None:
        """Wait until a stream socket at `path` (a host path) accepts, or the launcher has died."""
        deadline = time.monotonic() + 20
        while True:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                try:
                    probe.connect(str(path))
                    return
                except OSError:
                    pass
            if self._process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{type(self).__name__}: nothing listens on {path}:"
                                   f" see {self.directory / 'server.out'}")
            time.sleep(0.02)

    def _processes(self) -> list[int]:
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    if _mount_namespace(int(entry)) == self._namespace:
                        found.append(int(entry))
                except OSError:
                    pass
        return found

    def stop(self) -> None:
        if self._process is None:
            return
        if self._namespace is None:
            # It never got past its mounts: the launcher is all there is.
            self._process.kill()
        else:
            # Processes forked after the first round (inetd, master) get their own
            # SIGTERM; whatever is left after the deadline gets SIGKILL.
            signalled: set[int] = set()
            deadline = time.monotonic() + 10
            while processes := self._processes():
                late = time.monotonic() > deadline
                for pid in processes:
                    if late or pid not in signalled:
                        try:
                            os.kill(pid, signal.SIGKILL if late else signal.SIGTERM)
                        except ProcessLookupError:
                            pass
                        signalled.add(pid)
                time.sleep(0.02)
        self._process.wait()
        self._process = None
        self._namespace = None

    def start(self):
        raise NotImplementedError


class Courier(_NamespacedServer):
    """Courier 1.0 pop3d, pop3d-ssl, imapd and imapd-ssl, each under its own courierlogger.

    As Debian's init scripts do: couriertcpd runs courierpop3login/imaplogin for each
    connection (couriertls in front for the -ssl ports), and courierlogger sends their
    stderr to syslog under the service's name. authdaemond checks passwords against a
    userdb of our own; authlib's paths (/etc/courier, /run/courier) are compiled in, so
    they are bind mounts here. STLS/STARTTLS is offered on the plain ports. Courier has
    no APOP.
    """

    ROOT = INSTALL_ROOT
    # The name Courier logs under for each port, as in Debian's /etc/courier files.
    IDENTIFIERS = ("pop3d", "pop3d-ssl", "imapd", "imapd-ssl")

    @staticmethod
    def storable_user_name(name: str) -> bool:
        """userdb(8) lines are `name<TAB>fields`, one account per line."""
        return name != "" and name.strip() == name and not any(c in name for c in "\t\n\r")

    def _write_config(self) -> None:
        d = self.directory
        etc, run, mail = d / "etc-courier", d / "run-courier", d / "mail"
        for sub in (etc, run / "authdaemon", mail):
            sub.mkdir(parents=True, exist_ok=True)
        d.chmod(0o755)
        # As Debian's tmpfiles.d entry for courier-authdaemon makes it.
        (run / "authdaemon").chmod(0o750)
        shutil.chown(run / "authdaemon", "courier", "courier")
        (etc / "authdaemonrc").write_text(
            'authmodulelist="authuserdb"\n'
            "daemons=2\n"
            "authdaemonvar=/run/courier/authdaemon\n"
            "DEBUG_LOGIN=0\n"
            'DEFAULTOPTIONS=""\n'
            'LOGGEROPTS=""\n'
        )
        nobody = pwd.getpwnam("nobody")
        lines = []
        for number, (name, password) in enumerate(self.users.items()):
            # Home folders are numbered: user names here may hold any text.
            home = mail / f"user{number}"
            for sub in ("cur", "new", "tmp"):
                (home / "Maildir" / sub).mkdir(parents=True, exist_ok=True)
            for path in (home, *home.rglob("*")):
                os.chown(path, nobody.pw_uid, nobody.pw_gid)
            lines.append(
                f"{name}\tuid={nobody.pw_uid}|gid={nobody.pw_gid}|home={home}|systempw={_crypt(password)}\n"
            )
        userdb = etc / "userdb"
        userdb.write_text("".join(lines))
        userdb.chmod(0o600)
        certificate, key = self_signed_certificate(d)
        pem = etc / "courier.pem"
        pem.write_text(key.read_text() + certificate.read_text())
        pem.chmod(0o600)
        shutil.chown(pem, "courier")

    def _service(self, name: str, port: int, login: Path, mail_server: Path, tls: bool,
                 environment: dict[str, str]) -> str:
        base = self.ROOT / "courier-base"
        listen = f"127.0.0.1.{port},::1.{port}"
        program = [str(login), str(mail_server), "Maildir"]
        if tls:
            program = [str(base / "usr/bin/couriertls"), "-server", "-tcpd", "-user=courier", *program]
        variables = {
            "PATH": "/usr/bin:/bin:/usr/sbin:/sbin",
            "COURIERTLS": str(base / "usr/bin/couriertls"),
            "TLS_CERTFILE": "/etc/courier/courier.pem",
            "TLS_VERIFYPEER": "NONE",
            "TLS_PROTOCOL": "TLS1_2+",
            **environment,
        }
        argv = [
            "env", "-i", *(f"{k}={v}" for k, v in variables.items()),
            "/usr/sbin/courierlogger", f"-name={name}",
            str(base / "usr/sbin/couriertcpd"), "-nodnslookup", "-noidentlookup",
            "-maxprocs=40", "-maxperip=40", listen, *program,
        ]
        return shlex.join(argv) + " &"

    def start(self) -> "Courier":
        self._write_config()
        d = self.directory
        pop = self.ROOT / "courier-pop/usr/lib/courier/courier"
        imap = self.ROOT / "courier-imap/usr/lib/courier/courier"
        imapd = self.ROOT / "courier-imap/usr/bin/imapd"
        pop3 = {"POP3AUTH": "", "POP3AUTH_TLS": "", "POP3_PROXY": "0", "MAILDIRPATH": "Maildir"}
        imap_settings = {
            "IMAP_CAPABILITY": "IMAP4rev1 UIDPLUS CHILDREN NAMESPACE IDLE",
            "IMAP_CAPABILITY_TLS": "IMAP4rev1 UIDPLUS CHILDREN NAMESPACE IDLE AUTH=PLAIN",
            "IMAP_PROXY": "0", "IMAP_UMASK": "022", "IMAP_ULIMITD": "131072", "IMAP_USELOCKS": "1",
            "IMAP_ENHANCEDIDLE": "0", "MAILDIRPATH": "Maildir",
        }
        services = [
            self._service("pop3d", self.pop3_port, pop / "courierpop3login", pop / "courierpop3d", False,
                          {**pop3, "POP3_STARTTLS": "YES", "POP3_TLS_REQUIRED": "0"}),
            self._service("pop3d-ssl", self.pop3s_port, pop / "courierpop3login", pop / "courierpop3d", True,
                          {**pop3, "POP3_TLS": "1", "POP3_STARTTLS": "NO", "POP3_TLS_REQUIRED": "0"}),
            self._service("imapd", self.imap_port, imap / "imaplogin", imapd, False,
                          {**imap_settings, "IMAP_STARTTLS": "YES", "IMAP_TLS_REQUIRED": "0"}),
            self._service("imapd-ssl", self.imaps_port, imap / "imaplogin", imapd, True,
                          {**imap_settings, "IMAP_TLS": "1", "IMAP_STARTTLS": "NO", "IMAP_TLS_REQUIRED": "0"}),
        ]
        body = "\n".join([
            # userdb.dat is built inside the namespace, where /etc/courier is ours.
            "/usr/sbin/makeuserdb",
            "/usr/sbin/courierlogger -name=authdaemond /usr/lib/courier/courier-authlib/authdaemond &",
            *services,
            "wait",
        ])
        # The mount points; courier-authdaemon's own /etc/courier is hidden, not changed.
        for mount_point in ("/etc/courier", "/run/courier"):
            Path(mount_point).mkdir(parents=True, exist_ok=True)
        self._spawn([(d / "etc-courier", "/etc/courier"), (d / "run-courier", "/run/courier")], body)
        self._wait_for_ports(self.pop3_port, self.pop3s_port, self.imap_port, self.imaps_port)
        # The ports can answer before authdaemond does; a login then fails ("authdaemon:
        # s_connect() failed") as if the password were wrong.
        self._wait_for_unix_socket(d / "run-courier/authdaemon/socket")
        return self


def _hosts_file(path: Path, names: dict[str, str]) -> Path:
    """An /etc/hosts for a server's namespace: localhost on both families, plus `names`.

    Servers that resolve client addresses log the name; a name that looks like another
    address is what a hostile DNS owner can arrange.
    """
    lines = ["127.0.0.1 localhost\n", "::1 localhost\n"]
    lines += [f"{address} {name}\n" for address, name in names.items()]
    path.write_text("".join(lines))
    path.chmod(0o644)
    return path


class Cyrus(_NamespacedServer):
    """Cyrus IMAP 3.6 pop3d and imapd, started by its `master` as Debian's init script does.

    Services `pop3`, `pop3s`, `imap`, `imaps` listen on localhost (127.0.0.1 and ::1);
    Cyrus logs as `<syslog_prefix>/<service>`, so `cyrus/pop3` and so on. Passwords
    are in a sasldb (plaintext, so APOP works). `host_names` maps client addresses to
    names for the namespace's /etc/hosts, which Cyrus then logs before the address.
    """

    ROOT = INSTALL_ROOT
    SERVER_NAME = "mail.poplock.test"

    @staticmethod
    def storable_user_name(name: str) -> bool:
        return name != "" and not any(c in name for c in "\n\r\0")

    def _binary(self, package: str, name: str) -> str:
        return str(self.ROOT / package / "usr/lib/cyrus/bin" / name)

    def _write_config(self) -> tuple[Path, Path]:
        d = self.directory
        d.mkdir(parents=True, exist_ok=True)
        d.chmod(0o755)
        # What Debian's cyrus-makedirs prepares; without lib/db and lib/socket every
        # process logs DBERROR and "locking disabled" lines.
        for sub in ("lib", "lib/db", "lib/socket", "lib/log", "lib/msg", "lib/user", "lib/quota",
                    "spool", "run", "run/socket", "sieve"):
            (d / sub).mkdir(exist_ok=True)
            shutil.chown(d / sub, "cyrus", "mail")
            (d / sub).chmod(0o750)
        certificate, key = self_signed_certificate(d)
        shutil.chown(key, "cyrus", "mail")
        config = d / "imapd.conf"
        config.write_text(
            f"""\
configdirectory: {d}/lib
partition-default: {d}/spool
defaultpartition: default
proc_path: {d}/run/proc
mboxname_lockpath: {d}/run/lock
lmtpsocket: {d}/run/socket/lmtp
idlesocket: {d}/run/socket/idle
notifysocket: {d}/run/socket/notify
sievedir: {d}/sieve
servername: {self.SERVER_NAME}
syslog_prefix: cyrus
altnamespace: no
unixhierarchysep: no
hashimapspool: true
allowplaintext: yes
allowapop: yes
popminpoll: 0
autocreate_quota: 0
sasl_pwcheck_method: auxprop
sasl_auxprop_plugin: sasldb
sasl_sasldb_path: {d}/sasldb2
sasl_mech_list: PLAIN LOGIN
tls_server_cert: {certificate}
tls_server_key: {key}
"""
        )

        def command(package: str, name: str, *arguments: str) -> str:
            # master does not pass its -C on to the programs it starts.
            return " ".join([self._binary(package, name), "-C", str(config), *arguments])

        services = {
            "pop3": (command("cyrus-pop3d", "pop3d"), self.pop3_port),
            "pop3s": (command("cyrus-pop3d", "pop3d", "-s"), self.pop3s_port),
            "imap": (command("cyrus-imapd", "imapd"), self.imap_port),
            "imaps": (command("cyrus-imapd", "imapd", "-s"), self.imaps_port),
        }
        cyrus_conf = d / "cyrus.conf"
        cyrus_conf.write_text(
            "START {\n"
            f'  recover cmd="{command("cyrus-common", "ctl_cyrusdb", "-r")}"\n'
            "}\n"
            "SERVICES {\n"
            + "".join(
                f'  {name} cmd="{argv}" listen="localhost:{port}" prefork=0 maxchild=50\n'
                for name, (argv, port) in services.items()
            )
            + "}\n"
            "EVENTS {\n"
            f'  checkpoint cmd="{command("cyrus-common", "ctl_cyrusdb", "-c")}" period=30\n'
            "}\n"
        )
        sasldb = d / "sasldb2"
        for name, password in self.users.items():
            # Cyrus lower-cases user names before the lookup (username_tolower: 1).
            subprocess.run(
                ["saslpasswd2", "-p", "-c", "-f", str(sasldb), "-u", self.SERVER_NAME, name.lower()],
                input=password, check=True, capture_output=True, text=True,
            )
        shutil.chown(sasldb, "cyrus", "mail")
        sasldb.chmod(0o640)
        return config, cyrus_conf

    def start(self) -> "Cyrus":
        config, cyrus_conf = self._write_config()
        hosts = _hosts_file(self.directory / "hosts", self.host_names)
        library_path = self.ROOT / "cyrus-common/usr/lib/x86_64-linux-gnu"
        master = [
            "env", f"LD_LIBRARY_PATH={library_path}",
            self._binary("cyrus-common", "master"),
            "-C", str(config), "-M", str(cyrus_conf), "-p", str(self.directory / "run/master.pid"),
        ]
        self._spawn([(hosts, "/etc/hosts")], "exec " + shlex.join(master))
        self._wait_for_ports(self.pop3_port, self.pop3s_port, self.imap_port, self.imaps_port)
        return self


class _SystemUsers:
    """Mail users as system accounts, visible only inside the server's namespace.

    The namespace's /etc/passwd and /etc/shadow are the host's plus one line per user
    (uid FIRST_UID + n, group nogroup, a crypt(3) hash), and /var/mail holds an empty
    mbox for each, so getpwnam(3), PAM's pam_unix and the servers' compiled-in
    /var/mail/<user> all find them.
    """

    FIRST_UID = 20000

    @staticmethod
    def storable_user_name(name: str) -> bool:
        """passwd(5) fields are colon-separated lines; the mbox path must be one file."""
        return name != "" and not any(c in name for c in ":\n\r/\0") and name[0] not in "+-" and name not in (".", "..")

    def _system_user_binds(self, directory: Path, users: dict[str, str]) -> list[tuple[Path, str]]:
        etc, mail, home = directory / "etc", directory / "mail", directory / "home"
        for sub in (etc, mail, home):
            sub.mkdir(parents=True, exist_ok=True)
        mail.chmod(0o1777)
        passwd = Path("/etc/passwd").read_text()
        shadow = Path("/etc/shadow").read_text()
        nogroup = pwd.getpwnam("nobody").pw_gid
        self.homes: dict[str, tuple[Path, int, int]] = {}
        for number, (name, password) in enumerate(users.items()):
            uid = self.FIRST_UID + number
            user_home = home / f"user{number}"
            user_home.mkdir(exist_ok=True)
            os.chown(user_home, uid, nogroup)
            self.homes[name] = (user_home, uid, nogroup)
            mailbox = mail / name
            mailbox.touch()
            os.chown(mailbox, uid, nogroup)
            mailbox.chmod(0o600)
            passwd += f"{name}:x:{uid}:{nogroup}::{user_home}:/usr/sbin/nologin\n"
            shadow += f"{name}:{_crypt(password)}:19000:0:99999:7:::\n"
        (etc / "passwd").write_text(passwd)
        (etc / "passwd").chmod(0o644)
        (etc / "shadow").write_text(shadow)
        (etc / "shadow").chmod(0o640)
        shutil.chown(etc / "shadow", "root", "shadow")
        return [(etc / "passwd", "/etc/passwd"), (etc / "shadow", "/etc/shadow"), (mail, "/var/mail")]


class Mailutils(_SystemUsers, _NamespacedServer):
    """GNU mailutils 3.15 pop3d and imap4d as standalone daemons (`--daemon --foreground`).

    Each listens on 127.0.0.1 and ::1: plain ports offer STLS/STARTTLS, the -s ports
    speak TLS from the start (`tls-mode connection`). They log as `pop3d` and `imap4d`
    (facility mail). Out of the box mailutils logs no client address at all; this
    configuration adds what a POP-before-SMTP site must set: `acl { log from any
    "connect from ${address}"; }`, which the listening process logs, and
    `logging { session-id yes; }`, which prefixes every line of a connection, in the
    listener and in the child that serves it, with the same session id. APOP secrets
    are in pop3d's own APOP database.
    """

    ROOT = INSTALL_ROOT

    def _config(self, program: str, plain_port: int, tls_port: int, extra: str) -> Path:
        d = self.directory
        certificate, key = self_signed_certificate(d)
        servers = "".join(
            f'server "{address}:{port}" {{\n  tls-mode {mode};\n}};\n'
            for port, mode in ((plain_port, "stls"), (tls_port, "connection"))
            for address in ("127.0.0.1", "[::1]")
        )
        config = d / f"{program}.conf"
        config.write_text(
            f"""\
logging {{
  syslog yes;
  facility mail;
  session-id yes;
}};
acl {{
  log from any "connect from ${{address}}";
}};
tls {{
  ssl-certificate-file "{certificate}";
  ssl-key-file "{key}";
}};
tls-file-checks {{
  key-file none;
  cert-file none;
}};
pidfile "{d}/{program}.pid";
max-children 20;
{extra}{servers}"""
        )
        return config

    def start(self) -> "Mailutils":
        d = self.directory
        d.mkdir(parents=True, exist_ok=True)
        d.chmod(0o755)
        binds = self._system_user_binds(d, self.users)
        apop = d / "apop.db"
        pop3d = self.ROOT / "mailutils-pop3d/usr/sbin/pop3d"
        imap4d = self.ROOT / "mailutils-imap4d/usr/sbin/imap4d"
        popauth = self.ROOT / "mailutils-pop3d/usr/bin/popauth"
        pop3_config = self._config(
            "pop3d", self.pop3_port, self.pop3s_port,
            f'apop-database-file "{apop}";\napop-database-safety none;\n',
        )
        imap_config = self._config("imap4d", self.imap_port, self.imaps_port, "")
        body = [
            *(shlex.join([str(popauth), "-a", "-u", name, "-p", password, "-f", str(apop)])
              for name, password in self.users.items()),
            shlex.join([str(pop3d), f"--config-file={pop3_config}", "--daemon", "--foreground"]) + " &",
            shlex.join([str(imap4d), f"--config-file={imap_config}", "--daemon", "--foreground"]) + " &",
            "wait",
        ]
        self._spawn(binds, "\n".join(body))
        self._wait_for_ports(self.pop3_port, self.pop3s_port, self.imap_port, self.imaps_port)
        return self


class _InetdServer(_SystemUsers, _NamespacedServer):
    """A POP3 server that only serves port 110 by itself, run from openbsd-inetd.

    inetd (`-i`, in the foreground) listens on a free port on 127.0.0.1 and ::1 and
    starts `tcpd PROGRAM` for each connection, as Debian's update-inetd entries do;
    tcpd logs `connect from NAME (ADDRESS)` under the program's name and then execs
    it with the same pid. `host_names` maps client addresses to names in the
    namespace's /etc/hosts, which tcpd and the server then log.
    """

    ROOT = INSTALL_ROOT
    PROGRAM: Path
    FOUR_PORTS = False

    def _prepare(self) -> list[tuple[Path, str]]:
        """Writes what the server needs besides the accounts; returns extra bind mounts."""
        return []

    def start(self):
        d = self.directory
        d.mkdir(parents=True, exist_ok=True)
        d.chmod(0o755)
        binds = self._system_user_binds(d, self.users)
        binds.append((_hosts_file(d / "hosts", self.host_names), "/etc/hosts"))
        binds += self._prepare()
        config = d / "inetd.conf"
        config.write_text(
            "".join(
                f"{address}:{self.pop3_port} stream {protocol} nowait root /usr/sbin/tcpd {self.PROGRAM}\n"
                for address, protocol in (("127.0.0.1", "tcp4"), ("[::1]", "tcp6"))
            )
        )
        self._spawn(binds, "exec " + shlex.join(["/usr/sbin/inetd", "-i", str(config)]))
        self._wait_for_ports(self.pop3_port)
        return self


class Popa3d(_InetdServer):
    """popa3d 1.0.3 (Openwall) from inetd with tcpd; PAM (the `other` service) checks passwords.

    popa3d itself never logs the client address: only tcpd's `connect from` line of
    the same _PID has it. No TLS, no APOP.
    """

    PROGRAM = INSTALL_ROOT / "popa3d/usr/sbin/popa3d"


class SolidPop3d(_InetdServer):
    """solid-pop3d 0.15 from inetd with tcpd; PAM (the `other` service) checks passwords.

    No TLS. Each user's password is also their APOP secret, in ~/.spop3d as
    dot-spop3d(5) describes.
    """

    PROGRAM = INSTALL_ROOT / "solid-pop3d/usr/sbin/solid-pop3d"

    def _prepare(self) -> list[tuple[Path, str]]:
        for name, password in self.users.items():
            home, uid, gid = self.homes[name]
            settings = home / ".spop3d"
            # What pop_auth(1) writes, which asks on a terminal: each byte inverted, in hex.
            secret = "".join(f"{0xFF - byte:02x}" for byte in password.encode())
            settings.write_text(f"APOPSecret {secret}\n")
            os.chown(settings, uid, gid)
            settings.chmod(0o600)  # the server ignores the file otherwise
        # The package's bulletin folder: without it every login fails after logging success.
        return [(self.ROOT / "solid-pop3d/var/lib/solid-pop3d", "/var/lib/solid-pop3d")]


class DovecotAnyUserName(Dovecot):
    """Dovecot with `auth_username_chars =` (empty), which lets any user name log in.

    By default Dovecot refuses names outside [a-zA-Z0-9.@_-] before checking a
    password; sites that empty the list let names such as `x, rip=203.0.113.9`
    succeed, and Dovecot then copies them into its `Login:` line. Dovecot lower-cases
    names before the lookup (auth_username_format = %Lu), so the passwd-file holds them
    lower-cased.
    """

    def __init__(self, directory: Path, users: dict[str, str], *, tls: bool = True):
        super().__init__(directory, {name.lower(): password for name, password in users.items()}, tls=tls)

    def _write_config(self) -> Path:
        config = super()._write_config()
        with config.open("a") as settings:
            settings.write("auth_username_chars =\n")
        return config


# Tools the tests run that are not servers, unpacked the same way and never installed:
# promtool, from the prometheus package, whose install would bring a Prometheus server.
UNPACKED_TOOLS = ("prometheus",)


def unpacked_tool(package: str) -> Path:
    """Where `package` is unpacked (unpacking it first if it is not yet): a tool without dependencies."""
    INSTALL_ROOT.mkdir(parents=True, exist_ok=True)
    with open(INSTALL_ROOT / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (INSTALL_ROOT / package / ".unpacked").exists():
            print(f"unpacking into {INSTALL_ROOT}: {package}", file=sys.stderr, flush=True)
            _unpack([package])
    return INSTALL_ROOT / package


if __name__ == "__main__":
    install_servers()
    for tool in UNPACKED_TOOLS:
        unpacked_tool(tool)
