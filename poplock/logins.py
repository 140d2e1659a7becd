"""Login parsing (pure): a journal entry -> the successful login it records, or nothing.

An entry is a mapping of journal field names to text values, as the follower reads
them (or as `journalctl -o json` prints them). Time comes from __REALTIME_TIMESTAMP,
the moment journald received the entry, never from text inside the message.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import NamedTuple

from poplock.addresses import normalize_address
from poplock.errors import AddressError
from poplock.sources import Source


class Login(NamedTuple):  # a tuple: cheap to make thousands of times while catching up
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

    def parse(self, entry: Mapping[str, str]) -> Login | None:
        # The message first: most entries are not logins, and the journal hands out
        # fields one at a time, so the trusted fields are read only for a match.
        message = entry.get("MESSAGE")
        if not message:
            return None
        for source in self.sources:
            for pattern in source.patterns:
                match = pattern.fullmatch(message)
                if match is None:
                    continue
                if self.check_trust and not source.admits(entry):
                    break
                try:
                    address = normalize_address(match["address"])
                except AddressError:
                    continue
                user = match.groupdict().get("user")
                return Login(address, entry_time(entry), user, source.name)
        return None
