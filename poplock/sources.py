"""Login sources: which journal entries may come from a POP3/IMAP server, and which are trusted.

A source is a built-in server (servers.py) as adjusted by its [Source:NAME] section, or
a server the admin defines there. The trust rule, in one place:

    An entry counts only when fields that journald itself sets say it came from the
    server. If it carries _SYSTEMD_UNIT and the source lists Units, that unit must be
    one of them; otherwise its _UID must be one of Users.

SYSLOG_IDENTIFIER, which any local user can set (`logger -t dovecot`), only selects
candidate entries. _COMM and _EXE are not evidence: journald reads them from /proc when
the entry arrives, and they were seen stale (a server just exec'ed by tcpd logged as
_COMM=tcpd) or missing.
"""

from __future__ import annotations

import pwd
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from poplock.config import Config
from poplock.errors import ConfigError
from poplock.servers import SERVERS


@dataclass(frozen=True)
class Source:
    name: str
    identifiers: tuple[str, ...]
    units: tuple[str, ...]
    uids: frozenset[int]
    patterns: tuple[re.Pattern, ...]
    hint: re.Pattern | None

    def admits(self, entry: Mapping[str, str]) -> bool:
        """The entry is one of this source's candidates (by identifier or unit) and is trusted."""
        unit = entry.get("_SYSTEMD_UNIT")
        if unit not in self.units and entry.get("SYSLOG_IDENTIFIER") not in self.identifiers:
            return False
        return self._trusts(unit, entry)

    def trusts(self, entry: Mapping[str, str]) -> bool:
        """The trust rule alone (see the module's docstring)."""
        return self._trusts(entry.get("_SYSTEMD_UNIT"), entry)

    def _trusts(self, unit: str | None, entry: Mapping[str, str]) -> bool:
        if unit is not None and self.units:
            return unit in self.units
        uid = entry.get("_UID")
        return uid is not None and uid.isdigit() and int(uid) in self.uids

    def journal_matches(self) -> list[str]:
        """FIELD=value matches, any of which selects a candidate entry."""
        return [f"SYSLOG_IDENTIFIER={i}" for i in self.identifiers] + [f"_SYSTEMD_UNIT={u}" for u in self.units]


def build_sources(config: Config, names: Iterable[str] | None = None) -> dict[str, Source]:
    """The named sources (default: the watched ones and every [Source:NAME] section).

    Raises ConfigError listing every problem. Naming a source that is not watched is
    how `poplock scan --source NAME` tries one before it is enabled.
    """
    problems: list[str] = []
    if names is None:
        names = list(config.sources) + [name for name in config.source_sections if name not in config.sources]
        if not config.sources:
            problems.append(f"{config.sources_place}: [Reader] Sources: is empty, so nothing would ever be granted")
    sources = {}
    for name in names:
        if name not in SERVERS and name not in config.source_sections:
            problems.append(
                f"{config.sources_place}: [Reader] Sources: unknown source {name!r} "
                f"(built in: {', '.join(SERVERS)}; or define it in a [Source:{name}] section)"
            )
            continue
        source = _build_source(name, config.source_sections.get(name, []), problems)
        if source is not None:
            sources[name] = source
    if problems:
        raise ConfigError(problems)
    return sources


def _build_source(name: str, assignments, problems: list[str]) -> Source | None:
    server = SERVERS.get(name)
    identifiers = server.identifiers if server else ()
    units = server.units if server else ()
    users = server.users if server else ()
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
            users = words
        elif item.key == "Pattern":
            patterns = patterns + [(item.value, item.place)] if item.value else []
        elif item.key == "Hint":
            hint = (item.value, item.place) if item.value else None
    place = assignments[-1].place if assignments else f"built-in source {name}"
    uids = set()
    for user in users:
        uid = _resolve_user(user)
        if uid is None:
            problems.append(f"{_place_of(assignments, 'Users', place)}: [Source:{name}] Users: no such user {user!r}")
        else:
            uids.add(uid)
    if not units and not users:
        problems.append(f"{place}: [Source:{name}]: trusts nothing: set Units= (systemd) or Users= (the server's uid)")
    if not identifiers and not units:
        problems.append(f"{place}: [Source:{name}]: selects nothing: set Identifiers= or Units=")
    if not patterns:
        problems.append(f"{place}: [Source:{name}]: no Pattern= for a successful login")
    compiled = []
    for text, where in patterns:
        pattern = _compile(text, where, name, "Pattern", problems)
        if pattern is not None and "address" not in pattern.groupindex:
            problems.append(f"{where}: [Source:{name}] Pattern: needs a named group (?P<address>...)")
        compiled.append(pattern)
    compiled_hint = _compile(hint[0], hint[1], name, "Hint", problems) if hint else None
    if len(problems) > first_problem:
        return None
    return Source(name, identifiers, units, frozenset(uids), tuple(compiled), compiled_hint)


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
