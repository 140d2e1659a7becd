"""Several hosts on one machine, set up as poplock-cluster(7) says: two POP hosts and the deciding host
as booted systemd containers, a Postfix host, a qmail-style host and the mail clients as network
namespaces, all on one private bridge.

    pop1 10.123.0.11, pop2 10.123.0.12   Dovecot as dovecot.service, systemd-journal-upload (HTTPS)
    aggregator 10.123.0.1                systemd-journal-remote, poplock-reader, -policy, -socketmap
    postfix 10.123.0.30                  Postfix asking the aggregator's policy service over TCP
    qmail 10.123.0.40                    qpsmtpd behind tcpserver and relaylock with Server=
    clients 10.123.0.100-.250            the mail clients, one account and one address each
    outsider 10.123.0.13                 a host that is not listed, to upload forgeries from

The bridge lives in a network namespace of its own (the "switch"); systemd-nspawn runs there, so
its --network-bridge= finds it (the option comes from a settings file in /run/systemd/nspawn/,
which systemd-nspawn trusts fully). Nothing here can reach an address outside this machine: the
namespaces have no interface but their loopback and their end of the bridge. Never connect to
10.123.0.0/24 from the root namespace (there it is routed off the machine); Namespace.entered()
moves the calling thread into a namespace for the sockets it makes.

The guide's files and commands are read out of man/poplock-cluster.7 (guide_display, guide_files)
and used as they are, with its example network 192.0.2.0/24 mapped onto 10.123.0.0/24.

systemd-nspawn is started with a parent-death signal, which follows the thread that started it:
each container is booted and powered off by a thread of its own that lives as long as the cluster.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import subprocess
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from .dovecot import container_files
from .mailclients import imap_login, pop3_login
from .mtas import PostfixWithLocalDomain
from .netns import _setns
from .nspawn import Container, build_root, wait_until
from .poplock import command
from .ports import wait_for_port
from .postfix import _backdate
from .processes import Service
from .smtpservers import LOCAL_DOMAIN, TcpServer, qpsmtpd, try_relay

REPOSITORY = Path(__file__).resolve().parents[2]
GUIDE = REPOSITORY / "man" / "poplock-cluster.7"

# The guide's example network, and the private one the tests put in its place.
GUIDE_NETWORK = "192.0.2."
NETWORK = "10.123.0."
PREFIX_LENGTH = 24

AGGREGATOR = NETWORK + "1"
POP_HOSTS = {"pop1": NETWORK + "11", "pop2": NETWORK + "12"}
OUTSIDER = NETWORK + "13"
POSTFIX_HOST = NETWORK + "30"
QMAIL_HOST = NETWORK + "40"
CLIENTS = tuple(f"{NETWORK}{last}" for last in range(100, 251))

POLICY_PORT = 10040
SOCKETMAP_PORT = 7025
JOURNAL_REMOTE_PORT = 19532
POP3_PORT, IMAP_PORT = 110, 143
RECEIVED = "/var/log/journal/remote"
PASSWORD = "secret"

# poplock on the aggregator, installed as a local admin would (its /usr is the host's, read-only).
PREFIX = "/opt/poplock"
BINDIR = f"{PREFIX}/bin"
INSTALL = {
    "PREFIX": PREFIX,
    "SYSCONFDIR": "/etc",
    "UNITDIR": "/etc/systemd/system",
    "TMPFILESDIR": "/etc/tmpfiles.d",
    "SYSUSERSDIR": "/etc/sysusers.d",
    "CATALOGDIR": "/etc/systemd/catalog",
}
POPLOCK = f"{BINDIR}/poplock"

NSPAWN_SETTINGS = Path("/run/systemd/nspawn")
NETWORKD = "/lib/systemd/system/systemd-networkd.service"



# --- the guide -----------------------------------------------------------------------------------

def on_this_network(text: str) -> str:
    """The guide's text with its example addresses (192.0.2.x) moved onto the test network."""
    return text.replace(GUIDE_NETWORK, NETWORK)


def guide_displays(section: str | None = None) -> list[str]:
    """The literal displays of poplock-cluster(7) (of `.Sh SECTION` only, when given), as an admin
    copies them from the rendered page: roff escapes undone, addresses as in the guide."""
    text = GUIDE.read_text()
    if section is not None:
        start = text.index(f"\n.Sh {section}\n")
        end = text.find("\n.Sh ", start + 1)
        text = text[start:end if end > 0 else len(text)]
    blocks = re.findall(r"^\.Bd -literal[^\n]*\n(.*?)^\.Ed$", text, re.M | re.S)
    return [block.replace("\\&", "").replace("\\e", "\\") for block in blocks]


def guide_display(containing: str, section: str | None = None) -> str:
    """The one display that holds `containing`."""
    found = [block for block in guide_displays(section) if containing in block]
    assert len(found) == 1, f"poplock-cluster(7): {len(found)} displays hold {containing!r}"
    return found[0]


def guide_files(section: str) -> dict[str, str]:
    """The files the guide gives in `.Sh SECTION`: each display whose first line is `# /path`."""
    files = {}
    for block in guide_displays(section):
        first, _, rest = block.partition("\n")
        if re.fullmatch(r"# /\S+", first):
            files[first[2:]] = rest
    return files


def postfix_restrictions() -> str:
    """The guide's smtpd_relay_restrictions for Postfix, on the test network."""
    return on_this_network(guide_display("check_policy_service", "MTA HOSTS"))


# --- network namespaces --------------------------------------------------------------------------

class Namespace:
    """A network namespace attached to the switch, with its address(es) on eth0."""

    def __init__(self, name: str, address: str):
        self.name = name
        self.address = address

    @contextlib.contextmanager
    def entered(self) -> Iterator[Namespace]:
        """The calling thread in this namespace: sockets it makes and programs it starts belong here."""
        original = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
        try:
            _setns(target)
            try:
                yield self
            finally:
                _setns(original)
        finally:
            os.close(target)
            os.close(original)

    def run(self, *argv: str, check: bool = False, timeout: float = 30, **options) -> subprocess.CompletedProcess:
        """A command run to completion in this namespace."""
        return subprocess.run(["ip", "netns", "exec", self.name, *argv], capture_output=True, text=True,
                              check=check, timeout=timeout, **options)


class Network:
    """The switch (a namespace holding bridge br0) and the namespaces attached to it."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.switch = f"{prefix}-switch"
        self.namespaces: list[Namespace] = []
        self.created = False

    def create(self) -> None:
        _ip("netns", "add", self.switch)
        self.created = True
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        _ip("-n", self.switch, "link", "set", "lo", "up")

    def attach(self, name: str, address: str, *more: str) -> Namespace:
        namespace = Namespace(f"{self.prefix}-{name}", address)
        _ip("netns", "add", namespace.name)
        self.namespaces.append(namespace)
        port = f"v-{name}"[:15]
        _ip("link", "add", port, "netns", self.switch, "type", "veth", "peer", "name", "eth0", "netns", namespace.name)
        _ip("-n", self.switch, "link", "set", port, "master", "br0", "up")
        lines = [f"addr add {each}/{PREFIX_LENGTH} dev eth0" for each in (address, *more)]
        lines += ["link set lo up", "link set eth0 up"]
        subprocess.run(["ip", "-n", namespace.name, "-batch", "-"], input="\n".join(lines) + "\n", text=True,
                       check=True, capture_output=True)
        return namespace

    def enter_thread(self) -> None:
        """Moves the calling thread into the switch for good (the containers' owner threads)."""
        target = os.open(f"/run/netns/{self.switch}", os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)

    def remove(self) -> None:
        """Every namespace, after the processes still in it (none should be)."""
        names = [namespace.name for namespace in self.namespaces] + ([self.switch] if self.created else [])
        for name in names:
            pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), 9)
            subprocess.run(["ip", "netns", "delete", name], capture_output=True)
        self.namespaces = []
        self.created = False


def _ip(*arguments: str) -> None:
    result = subprocess.run(["ip", *arguments], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(arguments)}: {result.stderr.strip()}")


# --- containers ----------------------------------------------------------------------------------

class Machine:
    """A booted systemd container on the switch, with a static address on host0.

    Its owner thread (in the switch namespace) boots it and powers it off.
    """

    def __init__(self, network: Network, name: str, address: str, root: Path):
        self.name = name
        self.address = address
        self.container = Container(build_root(root), name=f"{network.prefix}-{name}"[:12])
        self.settings = NSPAWN_SETTINGS / f"{self.container.name}.nspawn"
        self._owner = ThreadPoolExecutor(1, thread_name_prefix=name, initializer=network.enter_thread)
        self._prepare()

    @property
    def root(self) -> Path:
        return self.container.root

    def _prepare(self) -> None:
        root = self.root
        self.write("/etc/systemd/network/10-host0.network",
                   f"[Match]\nName=host0\n\n[Network]\nAddress={self.address}/{PREFIX_LENGTH}\n"
                   "LinkLocalAddressing=no\n")
        self.enable_at_boot(NETWORKD)
        # A machine ID of its own, kept across boots, so that its persistent journal stays one.
        (root / "etc/machine-id").write_text(uuid.uuid4().hex + "\n")
        NSPAWN_SETTINGS.mkdir(parents=True, exist_ok=True)
        self.settings.write_text("[Network]\nBridge=br0\n")

    def write(self, path: str, text: str, mode: int = 0o644) -> Path:
        return self.container.write_file(path, text, mode)

    def enable_at_boot(self, unit_path: str, target: str = "multi-user.target") -> None:
        wants = self.root / f"etc/systemd/system/{target}.wants"
        wants.mkdir(parents=True, exist_ok=True)
        link = wants / Path(unit_path).name
        if not link.is_symlink():
            link.symlink_to(unit_path)

    def boot(self) -> Future:
        return self._owner.submit(self.container.boot)

    def poweroff(self) -> None:
        self._owner.submit(self.container.poweroff).result()

    def close(self) -> None:
        try:
            self.poweroff()
        finally:
            self._owner.shutdown()
            self.settings.unlink(missing_ok=True)

    def run(self, *argv: str, **options) -> subprocess.CompletedProcess:
        return self.container.run(*argv, **options)

    def shell(self, script: str, directory: str = "/", **options) -> subprocess.CompletedProcess:
        """A snippet of the guide run by sh inside, in `directory`."""
        return self.container.run("sh", "-euc", f"cd {shlex.quote(directory)}\n{script}", **options)

    def firewall_enforced(self) -> bool:
        """Whether systemd here enforces IPAddressDeny= (its BPF firewall): a connection from a unit
        denied every address fails with EPERM when it does, and reaches the closed port otherwise."""
        probe = ("import errno, socket\n"
                 "print(errno.errorcode[socket.socket().connect_ex(('127.0.0.1', 9))])")
        result = self.run("systemd-run", "--quiet", "--wait", "--pipe", "--property=IPAddressDeny=any",
                          "python3", "-c", probe)
        return result.stdout.strip() == "EPERM"

    def journal_all_boots(self, *matches: str) -> list[dict[str, str]]:
        """Entries of every boot kept in its persistent journal matching FIELD=value `matches`."""
        result = self.run("journalctl", "--no-pager", "--output=json", "--all", *matches, check=False)
        return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


# --- the cluster ---------------------------------------------------------------------------------

class Cluster(Service):
    """Every host of poplock-cluster(7), set up from the guide; a context manager that removes all."""

    def __init__(self, directory: Path):
        self.directory = directory
        self.prefix = f"plc{uuid.uuid4().hex[:4]}"
        self.network = Network(self.prefix)
        self.machines: dict[str, Machine] = {}
        self.certificates = directory / "certificates"
        self._services = contextlib.ExitStack()
        self.postfix: PostfixInHost | None = None
        self.postfix_namespace: Namespace | None = None
        self.qmail: TcpServer | None = None
        self.users = {address: f"user{index:03d}" for index, address in enumerate(CLIENTS)}

    # --- setting up ------------------------------------------------------------------------------

    def start(self) -> Cluster:
        started = time.monotonic()
        self.network.create()
        self.postfix_namespace = self.network.attach("postfix", POSTFIX_HOST)
        self.qmail_namespace = self.network.attach("qmail", QMAIL_HOST)
        self.clients = self.network.attach("clients", CLIENTS[0], *CLIENTS[1:])
        self.outsider = self.network.attach("outsider", OUTSIDER)
        self._make_certificates()
        for name, address in POP_HOSTS.items():
            self.machines[name] = self._pop_host(name, address)
        self.machines["aggregator"] = self._aggregator()
        booting = [machine.boot() for machine in self.machines.values()]
        for future in booting:
            future.result()
        self._start_mtas()
        # The receiver first, so that the uploaders reach it at their first try.
        self._set_up_aggregator()
        self._set_up_pop_hosts()
        self.wait_until_serving()
        self.setup_seconds = time.monotonic() - started
        return self

    def _make_certificates(self) -> None:
        self.certificates.mkdir(parents=True, exist_ok=True)
        script = on_this_network(guide_display("openssl req -x509", "CERTIFICATES"))
        subprocess.run(["sh", "-euc", script], cwd=self.certificates, check=True, capture_output=True, timeout=120)

    def _pop_host(self, name: str, address: str) -> Machine:
        machine = Machine(self.network, name, address, self.directory / name)
        for path, text in container_files({user: PASSWORD for user in self.users.values()}, POP3_PORT,
                                          imap_port=IMAP_PORT, listen="*").items():
            machine.write(f"/{path}", text)
        mail = machine.root / "srv/mail"
        mail.mkdir(parents=True, exist_ok=True)
        os.chown(mail, *_ids(machine.root, "nobody"))
        mail.chmod(0o750)
        machine.enable_at_boot("/lib/systemd/system/dovecot.service")
        for path, text in guide_files("POP HOSTS").items():
            machine.write(path, on_this_network(text).replace("pop1", name))
        self._copy_certificates(machine, "ca.pem", f"{name}.pem", f"{name}.key")
        return machine

    def _aggregator(self) -> Machine:
        machine = Machine(self.network, "aggregator", AGGREGATOR, self.directory / "aggregator")
        result = subprocess.run(["make", "-s", "install", f"DESTDIR={machine.root}",
                                 *(f"{name}={value}" for name, value in INSTALL.items())],
                                cwd=REPOSITORY, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"make install failed:\n{result.stdout}{result.stderr}")
        # A persistent journal: the reader's events of every boot stay there.
        (machine.root / "var/log/journal").mkdir(parents=True, exist_ok=True)
        for path, text in guide_files("THE DECIDING HOST").items():
            machine.write(path, on_this_network(text))
        for path, text in guide_files("OLD FILES").items():
            machine.write(path, text)
        self._copy_certificates(machine, "ca.pem", "loghost.pem", "loghost.key")
        return machine

    def _copy_certificates(self, machine: Machine, *names: str) -> None:
        for name in names:
            machine.write(f"/root/certificates/{name}", (self.certificates / name).read_text(), 0o600)

    def _set_up_pop_hosts(self) -> None:
        for name, machine in self.pop_hosts().items():
            script = guide_display("systemctl enable --now systemd-journal-upload.service", "POP HOSTS")
            machine.shell(script.replace("pop1", name), "/root/certificates")

    def _set_up_aggregator(self) -> None:
        machine = self.aggregator
        # What `make install` does without DESTDIR, here inside the container.
        machine.run("systemd-sysusers", f"{INSTALL['SYSUSERSDIR']}/poplock.conf")
        machine.run("systemd-tmpfiles", "--create", f"{INSTALL['TMPFILESDIR']}/poplock.conf")
        machine.shell(guide_display("install -d -m 0750 -g systemd-journal-remote", "THE DECIDING HOST"),
                      "/root/certificates")
        machine.shell(guide_display("systemctl enable --now systemd-journal-remote.socket", "THE DECIDING HOST"))

    def _start_mtas(self) -> None:
        directory = self.directory / "postfix"
        directory.mkdir(parents=True, exist_ok=True)
        with self.postfix_namespace.entered():
            try:
                postfix = PostfixInHost(directory, postfix_restrictions(), POSTFIX_HOST).__enter__()
            except RuntimeError:
                # Seen once under load: the master listening, no smtpd greeting within its 10 s.
                postfix = PostfixInHost(directory, postfix_restrictions(), POSTFIX_HOST).__enter__()
            self.postfix = postfix
            self._services.push(lambda *exc: postfix.stop())
        qmail = self.directory / "qmail"
        (qmail / "poplock.conf.d").mkdir(parents=True, exist_ok=True)
        (qmail / "static-allowed").write_text("")
        (qmail / "poplock.conf").write_text(f"[Grants]\nStaticAllowFile={qmail / 'static-allowed'}\n")
        for path, text in guide_files("MTA HOSTS").items():
            (qmail / "poplock.conf.d" / Path(path).name).write_text(on_this_network(text))
        relaylock = [command("relaylock"), "-c", str(qmail / "poplock.conf"), "--"]
        with self.qmail_namespace.entered():
            self.qmail = self._services.enter_context(
                TcpServerOn(QMAIL_HOST, qpsmtpd(qmail / "qpsmtpd"), wrapper=relaylock))

    def wait_until_serving(self, timeout: float = 60) -> None:
        """Until each POP host's Dovecot answers the clients and the aggregator's services the MTAs."""
        for address in POP_HOSTS.values():
            with self.clients.entered():
                wait_for_port(address, POP3_PORT, timeout)
        with self.postfix_namespace.entered():
            wait_for_port(AGGREGATOR, POLICY_PORT, timeout)
        with self.qmail_namespace.entered():
            wait_for_port(AGGREGATOR, SOCKETMAP_PORT, timeout)

    # --- tearing down ----------------------------------------------------------------------------

    def stop(self) -> None:
        errors = []
        # Containers power off in parallel, each by its own thread.
        with ThreadPoolExecutor(len(self.machines) or 1) as closing:
            futures = {name: closing.submit(machine.close) for name, machine in self.machines.items()}
        for name, future in futures.items():
            try:
                future.result()
            except Exception as error:  # noqa: BLE001 - every host is cleaned up whatever fails first
                errors.append(f"{name}: {error}")
        self.machines = {}
        try:
            # Postfix's stop() watches its port in the namespace it listens in.
            with self.postfix_namespace.entered() if self.postfix_namespace else contextlib.nullcontext():
                self._services.close()
        except Exception as error:  # noqa: BLE001
            errors.append(str(error))
        self.network.remove()
        if errors:
            raise RuntimeError("cleaning up the cluster: " + "; ".join(errors))

    # --- the hosts -------------------------------------------------------------------------------

    @property
    def aggregator(self) -> Machine:
        return self.machines["aggregator"]

    def pop_hosts(self) -> dict[str, Machine]:
        return {name: self.machines[name] for name in POP_HOSTS}

    def stop_aggregator(self) -> None:
        self.aggregator.poweroff()

    def start_aggregator(self) -> None:
        self.aggregator.boot().result()
        self.wait_until_serving()

    # --- what clients do -------------------------------------------------------------------------

    def login(self, client: str, host: str = "pop1", protocol: str = "pop3") -> bool:
        """A real login of `client`'s own account at a POP host, from `client`'s address."""
        with self.clients.entered():
            if protocol == "imap":
                return imap_login(POP_HOSTS[host], IMAP_PORT, self.users[client], PASSWORD, source=client)
            return pop3_login(POP_HOSTS[host], POP3_PORT, self.users[client], PASSWORD, source=client)

    def relay_postfix(self, client: str, recipient: str | None = None) -> tuple[int, str]:
        """RCPT TO a foreign recipient (or `recipient`) through the Postfix host, from `client`."""
        with self.clients.entered():
            return _relay(POSTFIX_HOST, self.postfix.port, client, recipient)

    def relay_qmail(self, client: str, recipient: str | None = None) -> tuple[int, str]:
        with self.clients.entered():
            return _relay(QMAIL_HOST, self.qmail.port, client, recipient)

    # --- the aggregator's grants -----------------------------------------------------------------

    def grants(self) -> dict[str, dict]:
        """`poplock show --json --all` on the aggregator: every stored grant by address."""
        output = self.aggregator.run(POPLOCK, "show", "--json", "--all").stdout
        records = [json.loads(line) for line in output.splitlines() if line.strip()]
        return {record["address"]: record for record in records if record.get("kind") == "grant"}

    def wait_until_granted(self, address: str, timeout: float = 30) -> dict:
        return wait_until(lambda: self.grants().get(address), f"a grant for {address} on the aggregator", timeout,
                          pause=0.1)

    def received_files(self) -> list[str]:
        return sorted(path.name for path in (self.aggregator.root / RECEIVED.lstrip("/")).glob("*.journal*"))


class PostfixInHost(PostfixWithLocalDomain):
    """Postfix that also listens on its host's address on the switch (started inside its namespace)."""

    def __init__(self, directory: Path, main_cf: str, address: str):
        super().__init__(directory, main_cf)
        self.address = address

    def _write_config(self) -> None:
        super()._write_config()
        main = self.config_directory / "main.cf"
        with open(main, "a") as file:
            file.write(f"inet_interfaces = 127.0.0.1, {self.address}\n")
        master = self.config_directory / "master.cf"
        master.write_text(f"{self.address}:{self.port} inet n  -       n       -       -       smtpd\n"
                          + master.read_text())
        _backdate(main, master)
        self._postfix("check")


class TcpServerOn(TcpServer):
    """tcpserver on `host` (in the namespace it is started in) rather than on 127.0.0.1."""

    def __init__(self, host: str, *arguments, **options):
        super().__init__(*arguments, **options)
        self.host = host


def _relay(host: str, port: int, client: str, recipient: str | None) -> tuple[int, str]:
    if recipient is None:
        return try_relay(host, port, source=client)
    return try_relay(host, port, source=client, recipient=recipient)


def local_recipient() -> str:
    return f"postmaster@{LOCAL_DOMAIN}"


def _ids(root: Path, name: str) -> tuple[int, int]:
    for line in (root / "etc/passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return int(fields[2]), int(fields[3])
    raise KeyError(name)
