"""Login parsing (pure): a journal entry -> the successful login it records, or nothing.

An entry is a mapping of journal field names to text values, as the follower reads
them (or as `journalctl -o json` prints them). Time comes from __REALTIME_TIMESTAMP,
the moment journald received the entry, never from text inside the message.

For servers that log the client address and the login on different lines of a
connection (servers.Correlation), the parser remembers the addresses of connections
not yet logged in: a bounded map per source, aged by the entries' own timestamps. It
must therefore see the entries in journal order, one parser for one stream of entries.

For servers whose connection ends are read (servers.Sessions), a login also names its
connection (Login.session), and the trusted lines that end a connection, or every
connection of the server (its restart, its unit's start or stop job), are SessionEnd and
ServerRestart. What they do to grants is sessions.py's.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import NamedTuple

from poplock.addresses import normalize_address
from poplock.errors import AddressError
from poplock.servers import CORRELATE_BY_SESSION, UNIT_JOB_MESSAGE_IDS
from poplock.sources import TRUSTED, UNTRUSTED, Correlation, Source


class Login(NamedTuple):  # a tuple: cheap to make thousands of times while catching up
    address: str
    time: float  # seconds since the epoch
    user: str | None
    source: str
    session: str | None = None  # the connection's key, when it opens a session (sessions.py)
    instance: tuple[str, str] | None = None  # (scope, instance) of a per-instance server's line


class SessionEnd(NamedTuple):
    """A trusted line that ends the connection `key` of `source`."""

    source: str
    key: str
    time: float
    instance: tuple[str, str] | None = None


class ServerRestart(NamedTuple):
    """A trusted line that ends every connection of `source`: its start or stop."""

    source: str
    time: float
    message: str
    scope: str = ""  # whose server restarted: "" this host's, "/ADDRESS/" a POP host's (LoginParser)
    also: tuple[str, ...] = ()  # other sources whose sessions end with it: they share the unit (inetd)

    @property
    def sessions_prefix(self) -> str:
        """What the keys of the sessions it ends start with (of `source`; see sessions_prefixes)."""
        return f"{self.source}{self.scope}:"

    @property
    def sessions_prefixes(self) -> tuple[str, ...]:
        return tuple(f"{name}{self.scope}:" for name in (self.source, *self.also))


# What a session key may hold (the servers' session ids, pids, addresses, ports, identifiers):
# nothing that separates the sessions in a grant's value (grants.py) or the store's keys.
_SESSION_KEY = re.compile(r"[A-Za-z0-9+/=:._-]{1,200}")


# Why LoginParser.examine() reports an entry.
UNREAD = "looks like a login, but no pattern reads it"
NO_ADDRESS = "a login, but no address line of its connection was read"


class Unmatched(NamedTuple):
    """A trusted entry of `source` that should have been a login and was not read as one.

    UNREAD: its Hint matched, no pattern did (the format drifted). NO_ADDRESS: a login
    line of a correlated source whose connection gave no usable address (the address
    line is missing, was written differently, or disagrees).
    """

    source: str
    message: str
    time: float
    reason: str = UNREAD


def entry_time(entry: Mapping[str, str]) -> float:
    seconds = getattr(entry, "seconds", None)  # follow.JournalEntry: from the header, not through text
    return seconds() if seconds is not None else int(entry["__REALTIME_TIMESTAMP"]) / 1e6


class LoginParser:
    """Reads successful logins out of entries, for a set of sources.

    `check_trust=False` is `poplock scan --all-sources`: every pattern is tried on
    every entry, whoever sent it (for checking patterns, never for granting).
    """

    def __init__(self, sources: Iterable[Source], *, check_trust: bool = True, sessions: bool = False,
                 sender: str | None = None):
        """`sessions`: also read connection ends, and name each login's connection (poplock-reader,
        unless [Grants] MaxSessionLength=0); without, logins only (`poplock scan`). `sender`: the
        POP host whose received journal the entries come from (received.py), None for this host's:
        its sessions are its own, so one host's server restart or logout never ends another's."""
        self.sources = tuple(sources)
        self.check_trust = check_trust
        self.sessions = sessions
        self.scope = "" if sender is None else f"/{sender}/"
        # Sources whose units' start and stop jobs end their sessions.
        self._unit_sources = tuple(source for source in self.sources if sessions and source.sessions is not None
                                   and source.units)
        self._connections = {source.name: Connections(source.correlation)
                             for source in self.sources if source.correlation is not None}
        # Per source, its patterns with whether each gives the address itself: worked out
        # once, as parse() runs for every entry read.
        self._plan = tuple((source, tuple((pattern, "address" in pattern.groupindex) for pattern in source.patterns))
                           for source in self.sources)

    def parse(self, entry: Mapping[str, str]) -> Login | None:
        """The successful login the entry records, or None."""
        found = self._read(entry, False)
        return found if isinstance(found, Login) else None

    def read(self, entry: Mapping[str, str]) -> Login | SessionEnd | ServerRestart | None:
        """The login, or (with `sessions`) the end of a connection or of every connection, that the
        entry records."""
        return self._read(entry, False)

    def examine(self, entry: Mapping[str, str]) -> Login | SessionEnd | ServerRestart | Unmatched | None:
        """As parse(), but a trusted entry that should have been a login and was not read as
        one is an Unmatched: its source's Hint matched and no pattern of any source read it
        (UNREAD: the format drifted), or it is a correlated login line whose connection gave
        no address (NO_ADDRESS). For `poplock scan --unmatched` and the reader's warning."""
        return self._read(entry, True)

    def _read(self, entry: Mapping[str, str], hints: bool) -> Login | Unmatched | None:
        # The message first: most entries are not logins, and the journal hands out
        # fields one at a time, so the trusted fields are read only for a match.
        message = entry.get("MESSAGE")
        if not message:
            return None
        read = False
        addressless = None  # a source whose trusted login line found no address
        for source, patterns in self._plan:
            source_read = False
            for pattern, gives_address in patterns:
                match = pattern.fullmatch(message)
                if match is None:
                    continue
                read = source_read = True
                level = source.trust_level(entry) if self.check_trust else TRUSTED
                if level == UNTRUSTED:
                    break
                if gives_address:
                    try:
                        address = normalize_address(match["address"])
                    except AddressError:
                        continue
                    if level != TRUSTED:
                        # A line trusted only by LoginUsers confirms the address that a
                        # trusted line of the same connection gave; it never gives one.
                        if source.correlation is None or self._take(source, match, entry) != address:
                            addressless = addressless or source
                            break
                else:
                    address = self._take(source, match, entry)
                    if address is None:
                        addressless = addressless or source
                        break
                if self.sessions and source.sessions is not None and (
                        not source.sessions.ends_need_unit or source.trusted_by_unit(entry)):
                    instance = _instance(source, entry, self.scope)
                    key = _session_key(source, match, entry, instance, self.scope)
                    if key is not None:
                        return Login(address, entry_time(entry), match.groupdict().get("user"), source.name,
                                     key, instance)
                return Login(address, entry_time(entry), match.groupdict().get("user"), source.name)
            if not source_read and source.correlation is not None:
                read = self._note_connection(source, source.correlation, message, entry) or read
            if not source_read and self.sessions and source.sessions is not None:
                ended = self._session_line(source, source.sessions, message, entry)
                if ended is not None:
                    return ended
        if not read and self._unit_sources and entry.get("_PID") == "1":
            return self._unit_job(entry, message)
        if not hints:
            return None
        if addressless is not None:
            return Unmatched(addressless.name, message, entry_time(entry), NO_ADDRESS)
        return None if read else self._unmatched(message, entry)

    def _session_line(self, source: Source, sessions, message: str, entry: Mapping[str, str]):
        """The SessionEnd or ServerRestart a fully trusted line of the source records, or None."""
        for pattern in sessions.ends:
            match = pattern.fullmatch(message)
            if match is None:
                continue
            if self._trust_level(source, entry) != TRUSTED:
                return None
            instance = _instance(source, entry, self.scope)
            key = _session_key(source, match, entry, instance, self.scope)
            return SessionEnd(source.name, key, entry_time(entry), instance) if key is not None else None
        for pattern in sessions.restarts:
            if pattern.fullmatch(message) is not None:
                if self._trust_level(source, entry) != TRUSTED:
                    return None
                return ServerRestart(source.name, entry_time(entry), message, self.scope)
        return None

    def _unit_job(self, entry: Mapping[str, str], message: str) -> ServerRestart | None:
        """PID 1's entry about a job of a source's unit (started, stopped, failed): only PID 1
        has _PID=1, and it logs over the native protocol as root."""
        if entry.get("_UID") != "0" or entry.get("_TRANSPORT") != "journal" or \
                entry.get("MESSAGE_ID") not in UNIT_JOB_MESSAGE_IDS:
            return None
        unit = entry.get("UNIT")
        names = [source.name for source in self._unit_sources if unit in source.units]
        if not names:
            return None
        return ServerRestart(names[0], entry_time(entry), message, self.scope, tuple(names[1:]))

    def _trust_level(self, source: Source, entry: Mapping[str, str]) -> int:
        return source.trust_level(entry) if self.check_trust else TRUSTED

    def _take(self, source: Source, match, entry: Mapping[str, str]) -> str | None:
        key = _key(source.correlation, match, entry)
        if key is None:
            return None
        return self._connections[source.name].take(key, entry_time(entry))

    def _note_connection(self, source: Source, correlation: Correlation, message: str,
                         entry: Mapping[str, str]) -> bool:
        """Remembers the address a connection line gives, forgets one an end line closes;
        whether the message was one of them."""
        for pattern in correlation.connections:
            match = pattern.fullmatch(message)
            if match is None:
                continue
            # Only a fully trusted line may give an address (LoginUsers never do).
            if self._trust_level(source, entry) == TRUSTED:
                key = _key(correlation, match, entry)
                try:
                    address = normalize_address(match["address"])
                except AddressError:
                    address = None
                if key is not None:
                    self._connections[source.name].remember(key, address, entry_time(entry))
            return True
        for pattern in correlation.ends:
            match = pattern.fullmatch(message)
            if match is None:
                continue
            # Forgetting can only take a grant away. By _PID anyone may do it (a process can
            # only name its own); a session id could be anyone's, so that needs trust.
            if correlation.key != CORRELATE_BY_SESSION or self._trust_level(source, entry) == TRUSTED:
                key = _key(correlation, match, entry)
                if key is not None:
                    self._connections[source.name].forget(key)
            return True
        return False

    def _unmatched(self, message: str, entry: Mapping[str, str]) -> Unmatched | None:
        for source in self.sources:
            if source.hint is None or source.hint.search(message) is None:
                continue
            if self._trust_level(source, entry) != UNTRUSTED:
                return Unmatched(source.name, message, entry_time(entry))
        return None

    def pending_connections(self, source: str) -> int:
        """How many connections of a correlated source wait for their login (for tests and STATUS)."""
        connections = self._connections.get(source)
        return len(connections) if connections is not None else 0


def _instance(source: Source, entry: Mapping[str, str], scope: str = "") -> tuple[str, str] | None:
    """(scope, instance) of a per-instance server's line: its identifier, and the boot and pid of
    the process that logs for it."""
    if source.sessions is None or not source.sessions.per_instance:
        return None
    identifier, boot, pid = entry.get("SYSLOG_IDENTIFIER"), entry.get("_BOOT_ID"), entry.get("_PID")
    if not identifier or not boot or not pid:
        return None
    return f"{source.name}{scope}:{identifier}", f"{boot[:12]}/{pid}"


def _session_key(source: Source, match, entry: Mapping[str, str], instance: tuple[str, str] | None,
                 scope: str = "") -> str | None:
    """SOURCE[/SENDER/]:PART/PART...: the connection's key, from the line's groups or the journal's fields."""
    parts = [instance[0][len(source.name + scope) + 1:], instance[1]] if instance is not None else []
    if source.sessions.per_instance and instance is None:
        return None
    groups = match.re.groupindex
    for name in source.sessions.key:
        value = match[name] if name in groups else entry.get(name)
        if not value:
            return None
        parts.append(value[:12] if name == "_BOOT_ID" else value)
    key = f"{source.name}{scope}:{'/'.join(parts)}"
    return key if _SESSION_KEY.fullmatch(key) else None


def _key(correlation: Correlation, match, entry: Mapping[str, str]):
    if correlation.key == CORRELATE_BY_SESSION:
        return match["session"]
    pid = entry.get("_PID")
    if not pid:
        return None
    return entry.get("_BOOT_ID"), pid


class Connections:
    """Addresses of connections not yet logged in: key -> (address, time), bounded in size and age.

    Insertion order is journal order, so the oldest are first. Time is the entries'
    own (__REALTIME_TIMESTAMP), never the clock. An address is taken once. A session that
    gives two different addresses gives none: its key is not a connection's alone.
    """

    __slots__ = ("max_age", "max_size", "one_address_per_key", "_items")

    def __init__(self, correlation: Correlation):
        self.max_age = correlation.max_age
        self.max_size = correlation.max_size
        # A pid can serve a new connection (tcpd's line starts it again); a session id cannot.
        self.one_address_per_key = correlation.key == CORRELATE_BY_SESSION
        self._items: dict[object, tuple[str | None, float]] = {}

    def __len__(self) -> int:
        return len(self._items)

    def remember(self, key, address: str | None, time: float) -> None:
        previous = self._items.pop(key, None)
        if previous is not None and self.one_address_per_key and previous[0] != address:
            address = None
        self._items[key] = (address, time)
        self._expire(time)

    def take(self, key, time: float) -> str | None:
        item = self._items.pop(key, None)
        if item is None:
            return None
        address, seen = item
        if address is None or abs(time - seen) > self.max_age:
            return None
        return address

    def forget(self, key) -> None:
        self._items.pop(key, None)

    def _expire(self, now: float) -> None:
        items = self._items
        while len(items) > self.max_size:
            del items[next(iter(items))]
        while items:
            oldest = next(iter(items))
            if now - items[oldest][1] <= self.max_age:
                break
            del items[oldest]


class Drift(NamedTuple):
    """A source whose login-looking entries no pattern reads."""

    source: str
    count: int  # such entries since the source's last report
    first: float  # journal time of the first of them
    last: Unmatched  # the latest, whose text the warning quotes
    last_login: float | None  # journal time of the source's last login read; None: none seen


class UnmatchedLogins:
    """When unread login-looking entries make a format-drift warning (pure: journal time only).

    Give it every Unmatched and every Login the parser returns. A source's drift is due
    once `grace` seconds have passed since the first unreported Unmatched of it: at the
    arrival of a later one, or when due() is asked with a later time. Reporting starts the
    count again, so a source is reported at most once per `grace` of unread entries.
    Logins still being read do not cancel it: a format that changed for some lines only
    (a new flag, IPv6) loses those clients their relay just the same.
    """

    def __init__(self, grace: float = 300.0):
        self.grace = grace
        self._pending: dict[str, list] = {}  # source -> [count, first time, last Unmatched]
        self._last_login: dict[str, float] = {}

    def login(self, login: Login) -> None:
        self._last_login[login.source] = login.time

    def add(self, unmatched: Unmatched) -> Drift | None:
        pending = self._pending.get(unmatched.source)
        if pending is None:
            pending = self._pending[unmatched.source] = [0, unmatched.time, unmatched]
        pending[0] += 1
        pending[2] = unmatched
        if unmatched.time - pending[1] >= self.grace:
            return self._report(unmatched.source)
        return None

    def due(self, now: float) -> list[Drift]:
        return [self._report(source) for source, pending in list(self._pending.items())
                if now - pending[1] >= self.grace]

    def _report(self, source: str) -> Drift:
        count, first, last = self._pending.pop(source)
        return Drift(source, count, first, last, self._last_login.get(source))
