"""Login parsing (pure): a journal entry -> the successful login it records, or nothing.

An entry is a mapping of journal field names to text values, as the follower reads
them (or as `journalctl -o json` prints them). Time comes from __REALTIME_TIMESTAMP,
the moment journald received the entry, never from text inside the message.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from poplock.addresses import normalize_address
from poplock.errors import AddressError
from poplock.sources import Source


@dataclass(frozen=True)
class Login:
    address: str
    time: float  # seconds since the epoch
    user: str | None
    source: str


def entry_time(entry: Mapping[str, str]) -> float:
    return int(entry["__REALTIME_TIMESTAMP"]) / 1e6


class LoginParser:
    """Reads successful logins out of entries, for a set of sources.

    `check_trust=False` is `poplock scan --all-sources`: every pattern is tried on
    every entry, whoever sent it (for checking patterns, never for granting).
    """

    def __init__(self, sources: Iterable[Source], *, check_trust: bool = True):
        self.sources = tuple(sources)
        self.check_trust = check_trust
        self._by_identifier: dict[str, list[Source]] = {}
        self._by_unit: dict[str, list[Source]] = {}
        for source in self.sources:
            for identifier in source.identifiers:
                self._by_identifier.setdefault(identifier, []).append(source)
            for unit in source.units:
                self._by_unit.setdefault(unit, []).append(source)

    def candidates(self, entry: Mapping[str, str]) -> list[Source]:
        """The sources an entry may belong to, by its identifier or unit."""
        if not self.check_trust:
            return list(self.sources)
        found = list(self._by_unit.get(entry.get("_SYSTEMD_UNIT", ""), ()))
        for source in self._by_identifier.get(entry.get("SYSLOG_IDENTIFIER", ""), ()):
            if source not in found:
                found.append(source)
        return found

    def parse(self, entry: Mapping[str, str]) -> Login | None:
        message = entry.get("MESSAGE")
        if not message:
            return None
        for source in self.candidates(entry):
            if self.check_trust and not source.trusts(entry):
                continue
            for pattern in source.patterns:
                match = pattern.fullmatch(message)
                if match is None:
                    continue
                try:
                    address = normalize_address(match["address"])
                except AddressError:
                    continue
                user = match.groupdict().get("user")
                return Login(address, entry_time(entry), user, source.name)
        return None
