"""Login sources: which journal entries may come from a POP3/IMAP server, and which are trusted.

A source is a built-in server (servers.py) as adjusted by its [Source:NAME] section, or
a server the admin defines there. The trust rule, in one place:

    An entry counts only when fields that journald itself sets say it came from the
    server. If it carries _SYSTEMD_UNIT and the source lists Units, that unit must be
    one of them; otherwise its _UID must be one of Users.

A login line whose _UID is one of LoginUsers (and not of Users) is trusted less: it may
confirm a login but never supply its address, which must then come from a fully trusted
line of the same connection (servers.py explains why). Units may hold glob patterns
(`popa3d@*.service`, for per-connection units); those only decide trust, and the
journal is searched for them by identifier.

The same rule decides which entries open and end sessions (servers.Sessions): only a
fully trusted line ends one, and for servers whose end lines are written as the mail
user a session is opened only by a login its unit vouches for. The start and stop jobs
of a source's units count when PID 1 logged them (_PID=1, which no other process has).

SYSLOG_IDENTIFIER, which any local user can set (`logger -t dovecot`), only selects
candidate entries. _COMM and _EXE are not evidence: journald reads them from /proc when
the entry arrives, and they were seen stale (a server just exec'ed by tcpd logged as
_COMM=tcpd) or missing.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import pwd
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from poplock.config import Config, unknown_source_problem
from poplock.errors import ConfigError
from poplock.servers import CORRELATE_BY_SESSION, SERVERS

# How much an entry is trusted (Source.trust_level).
UNTRUSTED = 0
LOGIN_ONLY = 1  # its _UID is one of LoginUsers: it may confirm a login, never give an address
TRUSTED = 2


@dataclass(frozen=True)
class Correlation:
    """A Correlation (servers.py) with its patterns compiled."""

    key: str
    connections: tuple[re.Pattern, ...]
    ends: tuple[re.Pattern, ...]
    max_age: float
    max_size: int


@dataclass(frozen=True)
class Sessions:
    """A Sessions (servers.py) with its patterns compiled."""

    key: tuple[str, ...]
    ends: tuple[re.Pattern, ...]
    restarts: tuple[re.Pattern, ...]
    per_instance: bool
    ends_need_unit: bool


@dataclass(frozen=True)
class Source:
    name: str
    identifiers: tuple[str, ...]
    units: tuple[str, ...]
    uids: frozenset[int]
    patterns: tuple[re.Pattern, ...]
    hint: re.Pattern | None
    login_uids: frozenset[int] = frozenset()
    correlation: Correlation | None = None
    # Built-in default user names that do not exist on this machine (the source is not watched).
    unresolved_users: tuple[str, ...] = ()
    sessions: Sessions | None = None
    # Hosts=: the POP hosts whose received journals it reads (received.py); empty: this host's journal.
    hosts: frozenset[str] = frozenset()

    def reads_from(self, sender: str | None) -> bool:
        """Entries from `sender`'s received journal (None: this host's own) are this source's to read."""
        return sender in self.hosts if sender is not None else not self.hosts

    def admits(self, entry: Mapping[str, str]) -> bool:
        """The entry is one of this source's candidates (by identifier or unit) and is trusted."""
        return self.trust_level(entry) == TRUSTED

    def trusts(self, entry: Mapping[str, str]) -> bool:
        """The trust rule alone (see the module's docstring)."""
        return self._trust(entry.get("_SYSTEMD_UNIT"), entry) == TRUSTED

    def trust_level(self, entry: Mapping[str, str]) -> int:
        """UNTRUSTED, LOGIN_ONLY or TRUSTED, for a candidate entry; UNTRUSTED for any other."""
        unit = entry.get("_SYSTEMD_UNIT")
        if not self._lists_unit(unit) and entry.get("SYSLOG_IDENTIFIER") not in self.identifiers:
            return UNTRUSTED
        return self._trust(unit, entry)

    def _trust(self, unit: str | None, entry: Mapping[str, str]) -> int:
        if unit is not None and self.units:
            return TRUSTED if self._lists_unit(unit) else UNTRUSTED
        uid = entry.get("_UID")
        if uid is None or not uid.isdigit():
            return UNTRUSTED
        if int(uid) in self.uids:
            return TRUSTED
        return LOGIN_ONLY if int(uid) in self.login_uids else UNTRUSTED

    def trusted_by_unit(self, entry: Mapping[str, str]) -> bool:
        """The entry's own unit is one of the source's: evidence for lines any uid may write."""
        return bool(self.units) and self._lists_unit(entry.get("_SYSTEMD_UNIT"))

    def _lists_unit(self, unit: str | None) -> bool:
        if unit is None:
            return False
        if unit in self.units:
            return True
        return any(_is_glob(pattern) and fnmatch.fnmatchcase(unit, pattern) for pattern in self.units)

    def journal_matches(self) -> list[str]:
        """FIELD=value matches, any of which selects a candidate entry."""
        return [f"SYSLOG_IDENTIFIER={i}" for i in self.identifiers] + [
            f"_SYSTEMD_UNIT={u}" for u in self.units if not _is_glob(u)]

    def session_matches(self) -> list[str]:
        """For a source whose sessions are read: PID 1's entries about its units' jobs (UNIT=)."""
        if self.sessions is None:
            return []
        return [f"UNIT={u}" for u in self.units if not _is_glob(u)]


def as_received(source: Source) -> Source:
    """The source as it reads a journal received from a POP host: by its Units= alone when it
    lists any. A uid names another account on each host (the names in Users= are this host's),
    and on a host under systemd only root outside every unit writes an entry without
    _SYSTEMD_UNIT, so a received entry counts only when its unit is one of the source's."""
    if not source.units:
        return source
    return replace(source, uids=frozenset(), login_uids=frozenset())


def _is_glob(unit: str) -> bool:
    return any(character in unit for character in "*?[")


def build_sources(config: Config, names: Iterable[str] | None = None) -> dict[str, Source]:
    """The named sources (default: the watched ones and every [Source:NAME] section).

    Raises ConfigError listing every problem. Naming a source that is not watched is
    how `poplock scan --source NAME` tries one before it is enabled. A built-in default
    user that does not exist here (`cyrus` where Cyrus is not installed) is a problem only
    for a watched source; any other just trusts nobody by that name.
    """
    problems: list[str] = []
    if names is None:
        names = list(config.sources) + [name for name in config.source_sections if name not in config.sources]
        if not config.sources:
            problems.append(f"{config.sources_place}: [Reader] Sources: is empty, so nothing would ever be granted")
    sources = {}
    for name in names:
        if name not in SERVERS and name not in config.source_sections:
            problems.append(unknown_source_problem(name, config.sources_place))
            continue
        source = _build_source(name, config.source_sections.get(name, []), name in config.sources, problems,
                               bool(config.received_directory))
        if source is not None:
            sources[name] = source
    if problems:
        raise ConfigError(problems)
    return sources


def _build_source(name: str, assignments, watched: bool, problems: list[str],
                  receives: bool = False) -> Source | None:
    server = SERVERS.get(name)
    identifiers = server.identifiers if server else ()
    units = server.units if server else ()
    users = server.users if server else ()
    login_users = server.login_users if server else ()
    users_from_section = login_users_from_section = False
    hosts: set[str] = set()
    patterns = [(server_pattern, f"built-in {name}") for server_pattern in server.patterns] if server else []
    hint = (server.hint, f"built-in {name}") if server else None
    first_problem = len(problems)
    for item in assignments:
        words = tuple(item.value.split())
        if item.key == "Identifiers":
            identifiers = words
        elif item.key == "Units":
            units = words
        elif item.key == "Users":
            users, users_from_section = words, True
        elif item.key == "LoginUsers":
            login_users, login_users_from_section = words, True
        elif item.key == "Pattern":
            patterns = patterns + [(item.value, item.place)] if item.value else []
        elif item.key == "Hint":
            hint = (item.value, item.place) if item.value else None
        elif item.key == "Hosts":
            hosts = _parse_hosts(name, item, receives, problems)
    place = assignments[-1].place if assignments else f"built-in source {name}"
    unresolved: list[str] = []
    uids = _resolve_users(name, "Users", users, users_from_section or watched, assignments, place, problems,
                          unresolved)
    login_uids = _resolve_users(name, "LoginUsers", login_users, login_users_from_section or watched, assignments,
                                place, problems, unresolved)
    correlation = server.correlation if server else None
    if login_users and correlation is None:
        problems.append(f"{_place_of(assignments, 'LoginUsers', place)}: [Source:{name}] LoginUsers: this source "
                        f"has no connection lines to take the address from; use Users= or Units=")
    # A built-in that is neither watched nor configured may trust nobody (logauth has no
    # default): it grants nothing, and `poplock scan --all-sources` can still try its patterns.
    if not units and not users and (watched or assignments):
        problems.append(f"{place}: [Source:{name}]: trusts nothing: set Units= (systemd) or Users= (the server's uid)")
    if not identifiers and (not units or any(_is_glob(unit) for unit in units)):
        # A glob only decides trust: the journal is searched by identifier and exact unit names,
        # so the entries of units that only a pattern names are found by identifier alone.
        problems.append(f"{place}: [Source:{name}]: selects nothing: set Identifiers= or Units= "
                        f"(a Units= pattern with * only decides trust)")
    if not patterns:
        problems.append(f"{place}: [Source:{name}]: no Pattern= for a successful login")
    compiled = []
    for text, where in patterns:
        pattern = _compile(text, where, name, "Pattern", problems)
        built_in = where == f"built-in {name}"
        if pattern is not None and not (_reads_a_login(pattern, correlation) if built_in
                                        else "address" in pattern.groupindex):
            problems.append(f"{where}: [Source:{name}] Pattern: needs a named group (?P<address>...)")
        compiled.append(pattern)
    compiled_hint = _compile(hint[0], hint[1], name, "Hint", problems) if hint else None
    compiled_correlation = _compile_correlation(name, correlation, problems) if correlation else None
    compiled_sessions = _compile_sessions(name, server.sessions, problems) if server and server.sessions else None
    if len(problems) > first_problem:
        return None
    return Source(name, identifiers, units, frozenset(uids), tuple(compiled), compiled_hint,
                  frozenset(login_uids), compiled_correlation, tuple(unresolved), compiled_sessions,
                  frozenset(hosts))


def _parse_hosts(name: str, item, receives: bool, problems: list[str]) -> set[str]:
    """Hosts=ADDRESS...: as systemd-journal-remote names their files (an IPv4-mapped IPv6 address
    is the IPv4 one). Names are refused: a file is named after an address, never a name."""
    hosts = set()
    for word in item.value.split():
        try:
            address = ipaddress.ip_address(word)
        except ValueError:
            problems.append(f"{item.place}: [Source:{name}] Hosts: {word!r} is not an IP address (the received "
                            f"journals are named after the sender's address)")
            continue
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        hosts.add(str(address))
    if hosts and not receives:
        problems.append(f"{item.place}: [Source:{name}] Hosts: needs [Reader] Directory=, the directory where "
                        f"the journals received from those hosts are written")
    return hosts


def _reads_a_login(pattern: re.Pattern, correlation) -> bool:
    """A login pattern gives the address, or (built in, correlated) the key to find it."""
    if "address" in pattern.groupindex:
        return True
    if correlation is None:
        return False
    return correlation.key != CORRELATE_BY_SESSION or "session" in pattern.groupindex


def _compile_correlation(name: str, correlation, problems: list[str]) -> Correlation | None:
    where = f"built-in {name}"
    connections = tuple(_compile(text, where, name, "connection pattern", problems)
                        for text in correlation.connections)
    ends = tuple(_compile(text, where, name, "end pattern", problems) for text in correlation.ends)
    if any(pattern is None for pattern in connections + ends):
        return None
    return Correlation(correlation.key, connections, ends, correlation.max_age, correlation.max_size)


def _compile_sessions(name: str, sessions, problems: list[str]) -> Sessions | None:
    where = f"built-in {name}"
    ends = tuple(_compile(text, where, name, "session end pattern", problems) for text in sessions.ends)
    restarts = tuple(_compile(text, where, name, "restart pattern", problems) for text in sessions.restarts)
    if any(pattern is None for pattern in ends + restarts):
        return None
    return Sessions(sessions.key, ends, restarts, sessions.per_instance, sessions.ends_need_unit)


def _resolve_users(name: str, key: str, users: tuple[str, ...], required: bool, assignments, place: str,
                   problems: list[str], unresolved: list[str]) -> set[int]:
    uids = set()
    for user in users:
        uid = _resolve_user(user)
        if uid is not None:
            uids.add(uid)
        elif required:
            problems.append(f"{_place_of(assignments, key, place)}: [Source:{name}] {key}: no such user {user!r}")
        else:
            unresolved.append(user)
    return uids


def _compile(text: str, where: str, name: str, key: str, problems: list[str]) -> re.Pattern | None:
    try:
        return re.compile(text)
    except re.error as error:
        problems.append(f"{where}: [Source:{name}] {key}: not a valid regular expression: {error}")
        return None


def _resolve_user(user: str) -> int | None:
    if user.isdigit():
        return int(user)
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        return None


def _place_of(assignments, key: str, default: str) -> str:
    for item in reversed(assignments):
        if item.key == key:
            return item.place
    return default
