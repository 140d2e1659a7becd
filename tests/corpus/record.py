"""Record what real POP3/IMAP servers log into the journal, labelled for poplock's login parsers.

    /usr/bin/python3 tests/corpus/record.py [SERVER...]

SERVER is one or more of the names in SERVERS below (default: all). Runs as root.

For each server it starts the real server on loopback ports (tests/support), makes
POP3/IMAP logins one after the other, each failed one from a 127.x address of its own
and the others mostly too, a few from ::1: right and wrong passwords, unknown users,
APOP, plain, implicit TLS and STARTTLS where the server has them, and user names
crafted to look like parts of log lines, both refused and (where the server's user
database can hold the name) accepted. It then writes tests/corpus/<server>.jsonl with
every entry the server logged while it ran, in journal order:

    {"server": "courier-pop3d", "scenario": "...", "grants": "127.22.0.5" or null, "fields": {...}}

`fields` holds every journal field as a string. `grants` is the client address that
entry must grant relay to, or null. The label comes from what the client saw (login
accepted or not, its source address) and, to pick the one entry per accepted login,
from a success pattern per server that is used for labelling only. The script fails
if an accepted login has not exactly one such entry, or a refused one has any, or if
an entry naming one attempt's source address lands in another attempt's window.

Each server is recorded by a child of this script in a private mount namespace with a
journald of its own (the same systemd-journald, its sockets and files in a scratch
directory), so that whatever else logs on the machine at the same time cannot get into
the corpus, every entry read belongs to the server under test, and several servers can
be recorded at once. The fields journald adds (_PID, _UID, _COMM, _EXE, ...) are
computed exactly as the system journald computes them.
"""

from __future__ import annotations

import argparse
import dataclasses
import imaplib
import ipaddress
import json
import os
import poplib
import re
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPOSITORY))

from tests.support import popservers  # noqa: E402
from tests.support.dovecot import Dovecot  # noqa: E402
from tests.support.journald import JOURNALD, accepts_datagrams, ensure_journald  # noqa: E402
from tests.support.mailclients import imap_login, pop3_login  # noqa: E402

CORPUS = Path(__file__).resolve().parent
PRIVATE_MOUNTS = "POPLOCK_CORPUS_PRIVATE_MOUNTS"

# After each login the journal must stay silent this long before the next one starts:
# servers log a connection's last lines (logout, child exit) after the client has
# gone, and nothing signals that a connection has logged its last line. The address
# check below catches a line that arrives later than this.
QUIET = 0.5

USER = "alice"
PASSWORD = "alice-secret-1"
WRONG_PASSWORD = "not-the-password"
UNKNOWN_USER = "nosuchuser"

START_UP = (
    "server start-up, including the readiness probes: a TCP connection to each port"
    " from 127.0.0.1 and from ::1, closed without a command"
)
SHUT_DOWN = "server shutdown"


class RecordingError(Exception):
    """The recording contradicts what the clients saw."""


# -- a journald of our own ----------------------------------------------------------


class PrivateJournal:
    """systemd-journald with its sockets and files bind-mounted from `directory`.

    Only valid inside a private mount namespace: the binds hide the system journald's
    sockets (/run/systemd/journal, hence /dev/log) from this process tree only.
    """

    def __init__(self, directory: Path):
        self.directory = directory
        self.entries: list[dict[str, str]] = []
        self._process: subprocess.Popen | None = None
        self._reader = None

    def start(self) -> None:
        sockets, storage, unused = (self.directory / name for name in ("sockets", "storage", "persistent"))
        for folder in (sockets, storage, unused):
            folder.mkdir(parents=True)
        config = self.directory / "journald.conf"
        # Volatile files in `storage`; no rate limit, which would drop lines of a busy run.
        config.write_text(
            "[Journal]\nStorage=volatile\nRateLimitIntervalSec=0\nRateLimitBurst=0\n"
            "ReadKMSG=no\nForwardToSyslog=no\nForwardToWall=no\n"
        )
        Path("/run/log/journal").mkdir(parents=True, exist_ok=True)
        binds = [(sockets, "/run/systemd/journal"), (storage, "/run/log/journal"),
                 (config, "/etc/systemd/journald.conf")]
        if Path("/var/log/journal").is_dir():
            binds.append((unused, "/var/log/journal"))
        for source, target in binds:
            subprocess.run(["mount", "--bind", str(source), target], check=True)
        self._process = subprocess.Popen(
            [JOURNALD], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 10
        while not (accepts_datagrams(sockets / "dev-log") and any(storage.glob("*/system.journal"))):
            if self._process.poll() is not None or time.monotonic() > deadline:
                raise RecordingError("the private systemd-journald did not start")
            time.sleep(0.02)
        from systemd import journal

        self._reader = journal._Reader(flags=0, path=str(storage))

    def stop(self) -> None:
        if self._reader is not None:
            self._reader.close()
        if self._process is not None:
            self._process.terminate()
            self._process.wait(timeout=10)

    def read(self) -> int:
        """Appends what has arrived to `entries`; returns how many arrived."""
        reader = self._reader
        reader.process()
        count = 0
        while reader._next():
            fields = {name: _text(value) for name, value in reader._get_all().items()}
            fields["__CURSOR"] = reader._get_cursor()
            fields["__REALTIME_TIMESTAMP"] = str(reader._get_realtime())
            fields["__MONOTONIC_TIMESTAMP"] = str(reader._get_monotonic()[0])
            self.entries.append(fields)
            count += 1
        return count

    def settle(self, timeout: float = 30) -> None:
        """Returns once nothing has arrived for QUIET seconds."""
        deadline = time.monotonic() + timeout
        quiet_since = time.monotonic()
        while True:
            if self.read():
                quiet_since = time.monotonic()
            now = time.monotonic()
            if now - quiet_since >= QUIET:
                return
            if now > deadline:
                raise RecordingError(f"the journal did not fall silent within {timeout} seconds")
            self._reader.wait(int(min(QUIET, deadline - now) * 1_000_000))

    def wait_for(self, predicate: Callable[[dict[str, str]], bool], start: int, timeout: float = 10) -> bool:
        """Waits until an entry from index `start` on satisfies `predicate`."""
        deadline = time.monotonic() + timeout
        while True:
            self.read()
            if any(predicate(entry) for entry in self.entries[start:]):
                return True
            if time.monotonic() > deadline:
                return False
            self._reader.wait(100_000)


def _text(value) -> str | list[str]:
    if isinstance(value, list):  # a field given more than once in one entry
        return [_text(item) for item in value]
    return value.decode("utf-8", "backslashreplace")


# -- what each server is --------------------------------------------------------------

ALL_TLS = ("none", "implicit", "starttls")
PORTS = {"pop3": {"none": "pop3_port", "implicit": "pop3s_port", "starttls": "pop3_port"},
         "imap": {"none": "imap_port", "implicit": "imaps_port", "starttls": "imap_port"}}


@dataclasses.dataclass(frozen=True)
class Server:
    name: str
    start: Callable[[Path, dict[str, str], dict[str, str]], object]
    # SYSLOG_IDENTIFIER -> the "server" value of its entries; None: not this server's.
    program: Callable[[str], str | None]
    # Labelling only: the entry an accepted login produces exactly once.
    success: re.Pattern[str]
    protocols: dict[str, tuple[str, ...]]  # protocol -> TLS modes
    apop: bool
    storable: Callable[[str], bool]  # can the user database hold this name?
    # The server's own address-bearing success line, with another address inside.
    own_lines: tuple[str, ...]
    resolves_names: bool = False  # logs the client's host name from /etc/hosts
    note: str | None = None  # on granting entries whose line has no address
    crafted_only: bool = False


def _dovecot_storable(name: str) -> bool:
    return name != "" and not any(c in name for c in ":\n\r\t")


SERVERS = (
    Server(
        name="dovecot",
        start=lambda d, users, names: Dovecot(d, users),
        program=lambda identifier: "dovecot" if identifier == "dovecot" else None,
        success=re.compile(r"^(pop3|imap)-login: Login: user=<"),
        protocols={"pop3": ALL_TLS, "imap": ALL_TLS},
        apop=True,
        storable=_dovecot_storable,
        own_lines=("pop3-login: Login: user=<alice>, method=PLAIN, rip=203.0.113.15, lip=127.0.0.1,"
                   " mpid=4242, session=<AAAAAAAAAAAAAAAA>",),
    ),
    Server(
        name="dovecot-anyname",
        start=lambda d, users, names: popservers.DovecotAnyUserName(d, users),
        program=lambda identifier: "dovecot" if identifier == "dovecot" else None,
        success=re.compile(r"^(pop3|imap)-login: Login: user=<"),
        protocols={"pop3": ("none",), "imap": ("none",)},
        apop=False,
        storable=_dovecot_storable,
        own_lines=("pop3-login: Login: user=<alice>, method=PLAIN, rip=203.0.113.15, lip=127.0.0.1,"
                   " mpid=4242, session=<AAAAAAAAAAAAAAAA>",),
        crafted_only=True,
    ),
    Server(
        name="courier",
        start=lambda d, users, names: popservers.Courier(d, users),
        program=lambda identifier: (
            f"courier-{identifier}" if identifier in (*popservers.Courier.IDENTIFIERS, "authdaemond") else None
        ),
        success=re.compile(r"^LOGIN, user="),
        protocols={"pop3": ALL_TLS, "imap": ALL_TLS},
        apop=False,
        storable=popservers.Courier.storable_user_name,
        own_lines=("LOGIN, user=alice, ip=[::ffff:203.0.113.15], port=[4242]",),
    ),
    Server(
        name="cyrus",
        start=lambda d, users, names: popservers.Cyrus(d, users, host_names=names),
        program=lambda identifier: f"cyrus-{identifier[6:]}" if identifier.startswith("cyrus/") else None,
        success=re.compile(r"^login: "),
        protocols={"pop3": ALL_TLS, "imap": ALL_TLS},
        apop=True,
        storable=popservers.Cyrus.storable_user_name,
        own_lines=("login: [203.0.113.15] alice plaintext User logged in SESSIONID=<cyrus-1-2-3-4>",),
        resolves_names=True,
    ),
    Server(
        name="mailutils",
        start=lambda d, users, names: popservers.Mailutils(d, users),
        program={"pop3d": "mailutils-pop3d", "imap4d": "mailutils-imap4d"}.get,
        success=re.compile(r"^\S+ (POP3 login: user `|user `.*' logged in \(source: \w+\)$)"),
        protocols={"pop3": ALL_TLS, "imap": ALL_TLS},
        apop=True,
        storable=popservers.Mailutils.storable_user_name,
        own_lines=("2AQDpYNk connect from 203.0.113.15",),
        note=(
            "mailutils' success line has no address: it is in the listener's earlier"
            " '<session id> connect from ADDRESS' line with the same session id (the first word"
            " of MESSAGE), which has the listener's _PID, not this one"
        ),
    ),
    Server(
        name="popa3d",
        start=lambda d, users, names: popservers.Popa3d(d, users, host_names=names),
        program={"popa3d": "popa3d"}.get,
        success=re.compile(r"^Authentication passed for "),
        protocols={"pop3": ("none",)},
        apop=False,
        storable=popservers.Popa3d.storable_user_name,
        own_lines=("connect from 203.0.113.15 (203.0.113.15)",),
        resolves_names=True,
        note=(
            "popa3d's success line has no address: it is in tcpd's earlier"
            " 'connect from NAME (ADDRESS)' line with the same _PID (tcpd execs popa3d)"
        ),
    ),
    Server(
        name="solid-pop3d",
        start=lambda d, users, names: popservers.SolidPop3d(d, users, host_names=names),
        program={"solid-pop3d": "solid-pop3d"}.get,
        success=re.compile(r"^user .* authenticated (through APOP )?- "),
        protocols={"pop3": ("none",)},
        apop=True,
        storable=popservers.SolidPop3d.storable_user_name,
        own_lines=("user alice authenticated - 203.0.113.15",),
        resolves_names=True,
    ),
)


def crafted_names(server: Server) -> list[tuple[str, str]]:
    """(why, user name): names shaped like pieces of the servers' log lines."""
    return [
        ("holding a second rip=", "x, rip=203.0.113.9"),
        ("holding the rest of a Dovecot login line",
         "a>, method=PLAIN, rip=203.0.113.10, lip=127.0.0.1, mpid=1, session=<x>"),
        ("that is an address", "198.51.100.7"),
        ("holding a Courier ip=[...]", "x, ip=[203.0.113.11]"),
        ("holding a bracketed address as Cyrus logs it", "x [203.0.113.12]"),
        ("holding solid-pop3d's 'authenticated - ADDRESS'", "x authenticated - 203.0.113.13"),
        ("holding tcpd's and mailutils' 'connect from ADDRESS'", "x connect from 203.0.113.14"),
        *(("that is a copy of this server's own success line with another address", line)
          for line in server.own_lines),
    ]


# -- logins -------------------------------------------------------------------------


@dataclasses.dataclass
class Attempt:
    protocol: str
    tls: str
    user: str
    password: str
    source: str
    intent: str
    apop: bool = False
    accepted: bool = False
    error: str | None = None
    first: int = 0  # this attempt's entries are journal.entries[first:last]
    last: int = 0

    def describe(self) -> str:
        if self.protocol == "pop3":
            how = "POP3 APOP" if self.apop else "POP3 USER/PASS"
            tls = {"none": "", "implicit": " over implicit TLS (POP3S)", "starttls": " after STLS"}[self.tls]
        else:
            how = "IMAP LOGIN"
            tls = {"none": "", "implicit": " over implicit TLS (IMAPS)", "starttls": " after STARTTLS"}[self.tls]
        outcome = "accepted" if self.accepted else "refused"
        if self.error:
            outcome += f" ({self.error})"
        return f"{how}{tls} from {self.source} as user {self.user!r} with {self.intent}: {outcome}"


class Sources:
    """A new 127.x client address for every call; one block of addresses per server."""

    def __init__(self, block: int):
        self.block = block
        self.count = 0

    def next(self) -> str:
        self.count += 1
        return f"127.{self.block}.{self.count // 250}.{self.count % 250 + 1}"

    def resolved(self) -> dict[str, str]:
        """Client addresses whose /etc/hosts name looks like another address."""
        return {f"127.{self.block}.9.9": "198.51.100.99.example.net",
                f"127.{self.block}.9.10": "198.51.100.98.example.net"}


def plan(server: Server, sources: Sources, users: dict[str, str]) -> list[Attempt]:
    attempts: list[Attempt] = []

    def add(protocol: str, tls: str, user: str, password: str, source: str, intent: str, apop: bool = False):
        attempts.append(Attempt(protocol, tls, user, password, source, intent, apop))

    if server.crafted_only:
        for protocol in server.protocols:
            add(protocol, "none", USER, PASSWORD, sources.next(), "the right password")
    else:
        for protocol, modes in server.protocols.items():
            for tls in modes:
                add(protocol, tls, USER, PASSWORD, sources.next(), "the right password")
            add(protocol, "none", USER, PASSWORD, "::1", "the right password")
            add(protocol, "none", USER, WRONG_PASSWORD, sources.next(), "a wrong password")
            add(protocol, "none", UNKNOWN_USER, WRONG_PASSWORD, sources.next(), "an unknown user name")
        if server.apop:
            add("pop3", "none", USER, PASSWORD, sources.next(), "the right APOP secret", apop=True)
            add("pop3", "none", USER, WRONG_PASSWORD, sources.next(), "a wrong APOP secret", apop=True)
        # Only one failure from ::1: Dovecot delays repeated failures from one address.
        add("pop3", "none", USER, WRONG_PASSWORD, "::1", "a wrong password")
        if server.resolves_names:
            (named_ok, name_ok), (named_bad, name_bad) = sources.resolved().items()
            add("pop3", "none", USER, PASSWORD, named_ok,
                f"the right password, the client's host name being {name_ok}")
            add("pop3", "none", USER, WRONG_PASSWORD, named_bad,
                f"a wrong password, the client's host name being {name_bad}")
    for why, name in crafted_names(server):
        for protocol in server.protocols:
            add(protocol, "none", name, WRONG_PASSWORD, sources.next(), f"a wrong password, the user name {why}")
            if name in users:
                add(protocol, "none", name, users[name], sources.next(), f"the right password, the user name {why}")
    return attempts


def _imap_user(name: str) -> str:
    """LOGIN's user argument: an atom when it can be, else a quoted string (imaplib sends it raw)."""
    if re.fullmatch(r"[A-Za-z0-9._@-]+", name):
        return name
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def log_in(attempt: Attempt, running: object) -> None:
    port = getattr(running, PORTS[attempt.protocol][attempt.tls])
    host = "::1" if ":" in attempt.source else "127.0.0.1"
    try:
        if attempt.protocol == "pop3":
            attempt.accepted = pop3_login(host, port, attempt.user, attempt.password, source=attempt.source,
                                          tls=attempt.tls, apop=attempt.apop)
        else:
            attempt.accepted = imap_login(host, port, _imap_user(attempt.user), attempt.password,
                                          source=attempt.source, tls=attempt.tls)
    except (OSError, EOFError, poplib.error_proto, imaplib.IMAP4.error, ssl.SSLError) as error:
        attempt.accepted = False
        attempt.error = f"client error: {error}"


# -- one server -----------------------------------------------------------------------

IPV4 = re.compile(r"(?<![\d.])(\d{1,3}(?:\.\d{1,3}){3})(?![\d.])")


def record(server: Server, block: int, scratch: Path, journal: PrivateJournal) -> tuple[list[dict], Counter]:
    sources = Sources(block)
    users = {USER: PASSWORD}
    for number, (_, name) in enumerate(crafted_names(server)):
        if server.storable(name):
            users[name] = f"crafted-secret-{number}"
    attempts = plan(server, sources, users)

    journal.read()
    start = len(journal.entries)
    with server.start(scratch / server.name, users, sources.resolved() if server.resolves_names else {}) as running:
        journal.settle()
        started = len(journal.entries)
        for attempt in attempts:
            journal.read()
            attempt.first = len(journal.entries)
            log_in(attempt, running)
            if attempt.accepted:
                journal.wait_for(
                    lambda entry: bool(server.success.search(entry.get("MESSAGE", ""))), attempt.first
                )
            journal.settle()
            attempt.last = len(journal.entries)
    journal.settle()
    end = len(journal.entries)

    windows = [(start, started, None), *((a.first, a.last, a) for a in attempts), (attempts[-1].last, end, None)]
    problems: list[str] = []
    records: list[dict] = []
    left_out: Counter = Counter()
    all_sources = {a.source for a in attempts if ":" not in a.source}
    for first, last, attempt in windows:
        mine = []
        for entry in journal.entries[first:last]:
            program = server.program(entry.get("SYSLOG_IDENTIFIER", ""))
            if program is None:
                left_out[entry.get("SYSLOG_IDENTIFIER", "(none)")] += 1
                continue
            mine.append((program, entry))
        markers = [entry for _, entry in mine if server.success.search(entry.get("MESSAGE", ""))]
        scenario = attempt.describe() if attempt else (START_UP if first == start else SHUT_DOWN)
        if attempt and attempt.accepted and len(markers) != 1:
            problems.append(f"{scenario}: {len(markers)} success entries, not 1")
        elif not (attempt and attempt.accepted) and markers:
            problems.append(f"{scenario}: success entries {[m['MESSAGE'] for m in markers]}")
        for program, entry in mine:
            for address in IPV4.findall(entry.get("MESSAGE", "")):
                if address in all_sources and (attempt is None or address != attempt.source):
                    problems.append(f"{scenario}: holds an entry of another attempt: {entry['MESSAGE']!r}")
            item = {"server": program, "scenario": scenario, "grants": None, "fields": dict(sorted(entry.items()))}
            if attempt and attempt.accepted and entry is markers[0]:
                item["grants"] = str(ipaddress.ip_address(attempt.source))
                if server.note:
                    item["note"] = server.note
            records.append(item)
    if problems:
        raise RecordingError(f"{server.name}:\n  " + "\n  ".join(problems))
    return records, left_out


def write_corpus(path: Path, records: list[dict]) -> None:
    partial = path.with_suffix(".jsonl.partial")
    with partial.open("w") as output:
        for item in records:
            output.write(json.dumps(item, ensure_ascii=False) + "\n")
    os.replace(partial, path)


# -- main ---------------------------------------------------------------------------------

# Servers recorded at once, each in its own namespace with its own journald: most of a
# run is spent in the servers' delays after failed logins (Courier 5 s, Cyrus 3 s,
# PAM 2 s, Dovecot 2 s), not on the CPU.
PARALLEL = 4


def record_one(server: Server, block: int, keep: bool) -> int:
    """Records one server; runs inside a private mount namespace of its own."""
    scratch = Path(tempfile.mkdtemp(prefix=f"poplock-corpus-{server.name}-"))
    scratch.chmod(0o755)
    journal = PrivateJournal(scratch / "journal")
    began = time.monotonic()
    try:
        journal.start()
        records, left_out = record(server, block, scratch, journal)
    except RecordingError as error:
        print(f"record.py: error: {error}", file=sys.stderr, flush=True)
        return 1
    finally:
        journal.stop()
        if keep:
            print(f"{server.name}: scratch directory kept: {scratch}", flush=True)
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    write_corpus(CORPUS / f"{server.name}.jsonl", records)
    granting = sum(1 for item in records if item["grants"])
    extra = f"; left out entries of {dict(left_out)}" if left_out else ""
    print(f"{server.name}: {len(records)} entries, {granting} granting,"
          f" {time.monotonic() - began:.0f} s{extra}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    names = [server.name for server in SERVERS]
    parser = argparse.ArgumentParser(
        prog="record.py", description="Record labelled journal entries of real POP3/IMAP servers."
    )
    parser.add_argument("servers", nargs="*", metavar="SERVER", help=f"any of {', '.join(names)} (default: all)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directories")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the per-server child, in its namespace
    arguments = parser.parse_args(argv)
    unknown = [name for name in [*arguments.servers, *filter(None, [arguments.one])] if name not in names]
    if unknown:
        parser.error(f"unknown server {', '.join(unknown)}: choose from {', '.join(names)}")
    if os.geteuid() != 0:
        print("record.py: error: must run as root (mount namespaces, server accounts)", file=sys.stderr)
        return os.EX_NOPERM

    if arguments.one:
        if os.environ.get(PRIVATE_MOUNTS) != "1":
            parser.error("--one is for the children record.py starts itself")
        return record_one(SERVERS[names.index(arguments.one)], 20 + names.index(arguments.one), arguments.keep)

    ensure_journald()  # /dev/log must lead to /run/systemd/journal, which each child replaces
    popservers.install_servers()
    environment = dict(os.environ, **{PRIVATE_MOUNTS: "1"})
    waiting = [name for name in names if not arguments.servers or name in arguments.servers]
    running: dict[int, tuple[str, subprocess.Popen]] = {}
    failed: list[str] = []
    began = time.monotonic()
    while waiting or running:
        while waiting and len(running) < PARALLEL:
            name = waiting.pop(0)
            command = [sys.executable, str(Path(__file__).resolve()), "--one", name, *(["--keep"] * arguments.keep)]
            child = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "--", *command],
                                     env=environment)
            running[child.pid] = (name, child)
        pid, status = os.wait()
        name, child = running.pop(pid)
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode != 0:
            failed.append(name)
    print(f"total {time.monotonic() - began:.0f} s" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
