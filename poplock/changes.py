"""Administrative changes to the grants, as the journal records them, and how they replay (pure).

`poplock add`, `remove` and `flush` change the store and then leave a journal entry with
their MESSAGE_ID, the store's path (POPLOCK_STORE) and what changed
(POPLOCK_CLIENT_ADDRESS, POPLOCK_EXPIRES). poplock-reader reads these entries in journal
order together with the logins, so that a store rebuilt from the journal, or one a
lagging reader brings up to date, ends as the administrator left it: manual grants kept,
removals and flushes still in force after the logins that came before them.

Trust as for logins, by what journald itself records: the entry must have come over the
native protocol (_TRANSPORT=journal) from a process whose _UID may write the store (root,
the store directory's owner, and its group's members when the directory lets the group
write: storewriter.store_writers), on this machine (_MACHINE_ID), and read from this host's
own journal, never a received one (received.py). Any user can send an entry with these
fields and MESSAGE_IDs; only those users' entries change anything.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping

from poplock import events
from poplock.grants import MAX_GRANT_LENGTH, Grant

ADD = "add"
REMOVE = "remove"
FLUSH = "flush"

_KINDS = {
    events.GRANT_ADDED.message_id: ADD,
    events.GRANT_REMOVED.message_id: REMOVE,
    events.GRANTS_FLUSHED.message_id: FLUSH,
}


class Change:
    """One administrative change: `kind` ADD, REMOVE or FLUSH, at `time` (seconds since the epoch).

    An ADD's `login_at` is the login time the grant was stored with (the entry's
    POPLOCK_LOGIN_TIME), so that a replay stores what the change did; entries without it
    give the second the change was logged.
    """

    __slots__ = ("kind", "address", "expires_at", "time", "login_at")

    def __init__(self, kind: str, address: str | None, expires_at: int | None, time: float,
                 login_at: int | None = None):
        self.kind = kind
        self.address = address
        self.expires_at = expires_at
        self.time = time
        self.login_at = int(time) if login_at is None else login_at

    def __eq__(self, other) -> bool:
        return isinstance(other, Change) and self._fields() == other._fields()

    def _fields(self) -> tuple:
        return self.kind, self.address, self.expires_at, self.time, self.login_at

    def __repr__(self) -> str:
        return f"Change({self.kind!r}, {self.address!r}, {self.expires_at!r}, {self.time!r}, {self.login_at!r})"


def parse_change(entry: Mapping[str, str], store_path: str, trusted_uids: frozenset[int],
                 machine_id: str | None) -> Change | None:
    """The change a journal entry records for the store at `store_path` on this machine, or None.

    None for entries of another store or another machine (a journal received from another
    host: its root changes its own store), other events, untrusted senders, and entries
    whose fields do not make a complete change.
    """
    if entry.get("POPLOCK_STORE") != store_path:
        return None
    if machine_id is None or entry.get("_MACHINE_ID") != machine_id:
        return None
    kind = _KINDS.get(entry.get("MESSAGE_ID", ""))
    if kind is None or entry.get("_TRANSPORT") != "journal":
        return None
    uid = entry.get("_UID", "")
    if not uid.isdigit() or int(uid) not in trusted_uids:
        return None
    realtime = entry.get("__REALTIME_TIMESTAMP", "")
    if not realtime.isdigit():
        return None
    time = int(realtime) / 1e6
    if kind == FLUSH:
        return Change(FLUSH, None, None, time)
    address = entry.get("POPLOCK_CLIENT_ADDRESS")
    if not address:
        return None
    if kind == REMOVE:
        return Change(REMOVE, address, None, time)
    expires_at = _epoch(entry.get("POPLOCK_EXPIRES", ""))
    if expires_at is None:
        return None
    login_at = _epoch(entry.get("POPLOCK_LOGIN_TIME", ""))
    # never after the entry: a login time to come would keep the grant from being live
    return Change(ADD, address, expires_at, time, None if login_at is None else min(login_at, int(time)))


def _epoch(text: str) -> int | None:
    try:
        return int(datetime.datetime.fromisoformat(text).timestamp())
    except ValueError:
        return None


def apply_change(grants: dict[str, Grant], change: Change, now: float) -> bool:
    """Apply `change` to `grants` (address -> Grant); True if that changed anything."""
    if change.kind == FLUSH:
        changed = bool(grants)
        grants.clear()
        return changed
    if change.kind == REMOVE:
        return grants.pop(change.address, None) is not None
    login_at = change.login_at
    if change.expires_at - login_at > MAX_GRANT_LENGTH or change.expires_at <= now:
        return False
    existing = grants.get(change.address)
    if existing is not None and existing.is_live(now) and existing.expires_at >= change.expires_at:
        return False  # already there (the normal case: `poplock add` changed the store first)
    grants[change.address] = Grant(change.address, change.expires_at, min(login_at, int(now)), "manual")
    return True
