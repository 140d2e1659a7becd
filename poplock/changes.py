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
    """One administrative change: `kind` ADD, REMOVE or FLUSH, at `time` (seconds since the epoch)."""

    __slots__ = ("kind", "address", "expires_at", "time")

    def __init__(self, kind: str, address: str | None, expires_at: int | None, time: float):
        self.kind = kind
        self.address = address
        self.expires_at = expires_at
        self.time = time

    def __eq__(self, other) -> bool:
        return isinstance(other, Change) and (self.kind, self.address, self.expires_at, self.time) == (
            other.kind, other.address, other.expires_at, other.time)

    def __repr__(self) -> str:
        return f"Change({self.kind!r}, {self.address!r}, {self.expires_at!r}, {self.time!r})"


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
    try:
        expires_at = int(datetime.datetime.fromisoformat(entry.get("POPLOCK_EXPIRES", "")).timestamp())
    except ValueError:
        return None
    return Change(ADD, address, expires_at, time)


def apply_change(grants: dict[str, Grant], change: Change, now: float) -> bool:
    """Apply `change` to `grants` (address -> Grant); True if that changed anything."""
    if change.kind == FLUSH:
        changed = bool(grants)
        grants.clear()
        return changed
    if change.kind == REMOVE:
        return grants.pop(change.address, None) is not None
    login_at = int(change.time)
    if change.expires_at - login_at > MAX_GRANT_LENGTH or change.expires_at <= now:
        return False
    existing = grants.get(change.address)
    if existing is not None and existing.is_live(now) and existing.expires_at >= change.expires_at:
        return False  # already there (the normal case: `poplock add` changed the store first)
    grants[change.address] = Grant(change.address, change.expires_at, min(login_at, int(now)), "manual")
    return True
