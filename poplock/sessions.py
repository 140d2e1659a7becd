"""Sessions: the open connections that hold a grant live past its window (pure: time is an argument).

A modern mail client logs in to IMAP once and stays connected for hours. For the servers
whose connection ends poplock reads (servers.Sessions), the rule is pop-before-smtp's:

  * A trusted login that names its connection opens a session on the grant it made or
    extended. While any of its sessions is open, the grant stays live.
  * A trusted line that ends the connection closes its session; once the grant's last
    session has closed, the grant lasts the window after that end (or as long as its
    logins and manual grants made it, if longer), then expires.
  * Bounds, so that a lost end line cannot hold a relay open forever: a session counts as
    ended MaxSessionLength after it opened, whatever the journal says; a restart of the
    server (its start or stop line, its unit's start or stop job, or for a per-instance
    server a new logging process) ends all of its sessions; and removing the grant
    (`poplock remove`, `--user`, `flush`, a replayed removal) ends its sessions with it.
  * A line that ends a connection no trusted login opened, or whose grant is gone,
    changes nothing: an end line never extends a grant.

Where the state lives, committed in the same store transaction as the journal cursor
(so a restart, a kill -9 or a rebuild from the journal neither forgets an open session
nor brings back a closed one):

  * in each grant: its open sessions (key, opened at) and its expiry once released
    (grants.py, format 3). `expires_at` already includes the sessions' bound, so the
    programs that decide (relaylock, the policy service) know nothing of sessions;
  * in the store's metadata, "session:KEY" -> "ADDRESS OPENED_AT": which grant a session
    is on, as end lines do not all name the client's address; and "instance:SCOPE" ->
    the logging process last seen for a per-instance server.

Each function takes the transaction's grants (a mapping of address to Grant) and its
metadata (a dict) and changes them; those that end sessions return the grants whose last
session they closed, so that the reader can say so once the transaction is committed.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import NamedTuple

from poplock.grants import Grant

INDEX_PREFIX = "session:"
INSTANCE_PREFIX = "instance:"
# Sessions one grant holds at most (a NAT gateway's many clients); the oldest go first.
MAX_SESSIONS_PER_GRANT = 256


class Bounds(NamedTuple):
    window: float  # [Grants] Window: how long a grant lasts after its last session ended
    max_session_length: float  # [Grants] MaxSessionLength: a session counts as ended this long after it opened

    def held_until(self, opened_at: int) -> int:
        """How long a session opened at `opened_at` can hold a grant: its bound, then the window."""
        return opened_at + int(self.max_session_length) + int(self.window)


def open_session(grants: MutableMapping[str, Grant], metadata: dict[str, str], address: str, key: str,
                 opened_at: float, bounds: Bounds) -> Grant | None:
    """Session `key`, opened at `opened_at` by the login that just granted `address`, now holds that
    grant; the grant as it is now (None: there is no grant to hold)."""
    opened = int(opened_at)
    if INDEX_PREFIX + key in metadata:  # the server names a new connection so: the old one has ended
        close_session(grants, metadata, key, opened, bounds)
    grant = grants.get(address)
    if grant is None:
        return None
    sessions = tuple(session for session in grant.sessions if session[0] != key) + ((key, opened),)
    dropped, sessions = sessions[:-MAX_SESSIONS_PER_GRANT], sessions[-MAX_SESSIONS_PER_GRANT:]
    for old_key, _ in dropped:
        metadata.pop(INDEX_PREFIX + old_key, None)
    held = Grant(grant.address, max(grant.expires_at, bounds.held_until(opened)), grant.login_at, grant.source,
                 grant.user, sessions, grant.expires_when_released)
    grants[address] = held
    metadata[INDEX_PREFIX + key] = f"{address} {opened}"
    return held


def close_session(grants: MutableMapping[str, Grant], metadata: dict[str, str], key: str, ended_at: float,
                  bounds: Bounds) -> Grant | None:
    """Session `key` ended at `ended_at`; the grant if that was its last session, else None."""
    entry = metadata.pop(INDEX_PREFIX + key, None)
    if entry is None:
        return None  # no trusted login opened it (or it ended already)
    address = entry.partition(" ")[0]
    grant = grants.get(address)
    if grant is None:
        return None  # removed: its sessions went with it
    opened = dict(grant.sessions).get(key)
    if opened is None:
        return None  # a grant made since, which this session never held
    # A session ends by its bound at the latest, and not before it opened (a late entry).
    ended = max(opened, min(int(ended_at), opened + int(bounds.max_session_length)))
    released = max(grant.expires_when_released, ended + int(bounds.window))
    remaining = tuple(session for session in grant.sessions if session[0] != key)
    expires_at = max([released] + [bounds.held_until(other) for _, other in remaining])
    grants[address] = Grant(grant.address, expires_at, grant.login_at, grant.source, grant.user, remaining,
                            released)
    return None if remaining else grants[address]


def end_sessions(grants: MutableMapping[str, Grant], metadata: dict[str, str], prefix: str, ended_at: float,
                 bounds: Bounds) -> tuple[int, list[Grant]]:
    """Every session whose key starts with `prefix` (a server, or one of its logging processes)
    ended at `ended_at`: (how many there were, the grants released)."""
    keys = [name[len(INDEX_PREFIX):] for name in metadata if name.startswith(INDEX_PREFIX + prefix)]
    released = [grant for key in keys if (grant := close_session(grants, metadata, key, ended_at, bounds))]
    return len(keys), released


def note_instance(grants: MutableMapping[str, Grant], metadata: dict[str, str], instance: tuple[str, str],
                  at: float, bounds: Bounds) -> tuple[int, list[Grant]]:
    """A per-instance server's line came from logging process `instance` = (scope, boot/pid): if
    that is a new one, the server was started again and the old one's sessions have ended."""
    scope, current = instance
    previous = metadata.get(INSTANCE_PREFIX + scope)
    if previous == current:
        return 0, []
    metadata[INSTANCE_PREFIX + scope] = current
    if previous is None:
        return 0, []
    return end_sessions(grants, metadata, f"{scope}/{previous}/", at, bounds)


def sweep_sessions(grants: MutableMapping[str, Grant], metadata: dict[str, str], now: float,
                   bounds: Bounds) -> list[Grant]:
    """Tidy up: sessions past their bound end there (they hold nothing any more), and index entries
    whose grant is gone or no longer lists them are dropped. Returns the grants released."""
    released = []
    for name in [name for name in metadata if name.startswith(INDEX_PREFIX)]:
        address, _, opened = metadata[name].partition(" ")
        key = name[len(INDEX_PREFIX):]
        grant = grants.get(address)
        if grant is None or key not in dict(grant.sessions):
            del metadata[name]
        elif opened.isdigit() and int(opened) + bounds.max_session_length <= now:
            grant = close_session(grants, metadata, key, now, bounds)
            if grant is not None:
                released.append(grant)
    return released


def count_sessions(metadata: dict[str, str]) -> int:
    """How many sessions the store's index lists (for STATUS=)."""
    return sum(1 for name in metadata if name.startswith(INDEX_PREFIX))
