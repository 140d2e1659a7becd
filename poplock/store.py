"""The grant store, read side: a gdbm file that is never changed in place.

How one writer and many readers share it (LMDB-style):

  * The file at Store.Path is a complete, immutable snapshot. A writer (poplock-reader,
    or `poplock add/remove/flush/expire`) takes an exclusive lock on PATH.lock, makes
    the new snapshot in PATH.new (a copy of PATH with the changes written into it),
    fsyncs it and renames it over PATH, which is atomic. See storewriter.py.
  * A reader opens PATH and sees the old snapshot or the new one, whole, never a mix:
    a snapshot is never written after it is published, and a reader that opened the
    old file keeps reading it after the rename.
  * Keys are canonical addresses; values are grants (grants.py). Keys starting with "#"
    hold bookkeeping published in the same snapshot, such as poplock-reader's journal
    cursor, so that grants and the position they cover are committed together.
  * Damage is detected, never read as fewer grants: each snapshot records its number
    of entries under "#count", and a whole-store read (show, remove, flush, a writer's
    load) that finds another number, or that gdbm reports as needing recovery, raises
    StoreCorruptError. gdbm's firstkey/nextkey end early without an error on a damaged
    file, so counting is the only way to tell. Lookups of one key (relaylock, the
    policy service) go on answering from what is readable and fail closed on errors.
  * The journal is the source of truth and the store a view of it: a store that is
    missing or damaged is rebuilt from the journal, one window back (reader.py), not
    emptied; manual grants and removals are replayed from their journal entries.
  * gdbm's own lock is exclusive between a writer and readers: opening with
    GDBM_READER fails with EAGAIN while anything has that file open for writing.
    poplock's writers never open a published snapshot for writing, so a reader meets
    EAGAIN only when some other program (gdbmtool, a script) writes PATH in place.
    Then it retries for Store.BusyTimeout (default 20ms) and fails closed with
    StoreBusyError: no relay, but mail still flows.

relaylock imports this once per SMTP connection: only `_gdbm` and `time` here.
"""

import _gdbm
import time

from poplock.errors import StoreBusyError, StoreCorruptError, StoreError
from poplock.grants import Grant, GrantDecodeError, decode_grant

# Keys that are not addresses: bookkeeping committed together with the grants, such as
# poplock-reader's journal cursor ("#cursor:/var/lib/poplock/cursor").
METADATA_PREFIX = "#"
# Random for each published snapshot, which tells a writer whether the file is still the
# one it published (storewriter.py).
GENERATION_KEY = b"#generation"
# How many other keys the snapshot holds, so that a whole-store read tells damage from an end.
COUNT_KEY = b"#count"

_EAGAIN = 11
_ENOENT = 2
_RETRY_PAUSE = 0.001


def open_snapshot(path: str, busy_timeout: float):
    """The published snapshot opened read-only, or None when there is none yet.

    Raises StoreBusyError after `busy_timeout` seconds of EAGAIN, StoreCorruptError
    when the file is not a gdbm file, StoreError when it cannot be read at all.
    """
    deadline = time.monotonic() + busy_timeout
    while True:
        try:
            return _gdbm.open(path, "r")
        except _gdbm.error as error:
            code = error.args[0] if error.args and isinstance(error.args[0], int) else None
            if code == _ENOENT:
                return None
            if code is None:
                raise StoreCorruptError(f"the grant store {path} is not a readable gdbm file: {error}") from None
            if code != _EAGAIN:
                raise StoreError(f"cannot read the grant store {path}: {error.args[-1]}") from None
        if time.monotonic() >= deadline:
            raise StoreBusyError(
                f"the grant store {path} stayed locked by another program for more than "
                f"{busy_timeout * 1000:.0f}ms"
            )
        time.sleep(_RETRY_PAUSE)


def lookup_grant(path: str, address: str, busy_timeout: float) -> Grant | None:
    """The stored grant for a canonical address, live or not; None if there is none.

    A value this version cannot decode is a StoreError: the caller refuses the relay.
    """
    snapshot = open_snapshot(path, busy_timeout)
    if snapshot is None:
        return None
    try:
        return find_grant(snapshot, address, path)
    finally:
        snapshot.close()


def find_grant(snapshot, address: str, path: str) -> Grant | None:
    """The grant for a canonical address in an open snapshot (see lookup_grant)."""
    value = snapshot.get(address.encode())
    if value is None:
        return None
    try:
        return decode_grant(address, value)
    except GrantDecodeError as error:
        raise StoreError(f"{path}: {error}") from None


def lookup_metadata(path: str, name: str, busy_timeout: float) -> str | None:
    """One bookkeeping value of the published snapshot (None when absent or unreadable as text)."""
    snapshot = open_snapshot(path, busy_timeout)
    if snapshot is None:
        return None
    try:
        value = snapshot.get((METADATA_PREFIX + name).encode())
    except _gdbm.error as error:
        raise StoreError(f"cannot read the grant store {path}: {error}") from None
    finally:
        snapshot.close()
    try:
        return value.decode() if value is not None else None
    except UnicodeDecodeError:
        return None


class Snapshot:
    """Everything in one published file."""

    __slots__ = ("grants", "metadata", "undecodable", "generation")

    def __init__(self, grants: dict, metadata: dict, undecodable: dict, generation: bytes | None = None):
        self.grants = grants  # address -> Grant
        self.metadata = metadata  # name -> text, from keys that start with METADATA_PREFIX
        self.undecodable = undecodable  # raw key -> raw value this version cannot read
        self.generation = generation


def read_snapshot(path: str, busy_timeout: float) -> Snapshot:
    """Every entry of the published snapshot (empty when there is none yet).

    StoreCorruptError when the file is damaged: fewer entries readable than it holds.
    """
    snapshot = open_snapshot(path, busy_timeout)
    if snapshot is None:
        return Snapshot({}, {}, {})
    try:
        result, count, expected = _read_entries(snapshot)
        if expected is None:  # written before "#count": gdbm's own check must do
            len(snapshot)
        elif count != expected:
            raise StoreCorruptError(f"the grant store {path} is damaged: {count} of its {expected} entries "
                                    "are readable")
    except (_gdbm.error, KeyError) as error:  # KeyError: a key listed whose value cannot be found
        raise StoreCorruptError(f"the grant store {path} is damaged: {error}") from None
    finally:
        snapshot.close()
    return result


def salvage_snapshot(path: str) -> Snapshot:
    """What can still be read of a damaged snapshot, as far as gdbm gets; never raises."""
    try:
        snapshot = open_snapshot(path, busy_timeout=0)
    except StoreError:
        return Snapshot({}, {}, {})
    if snapshot is None:
        return Snapshot({}, {}, {})
    try:
        return _read_entries(snapshot, partial := Snapshot({}, {}, {}))[0]
    except (_gdbm.error, KeyError):
        return partial
    finally:
        snapshot.close()


def _read_entries(snapshot, result: Snapshot | None = None) -> tuple[Snapshot, int, int | None]:
    """(entries, how many keys were read besides "#count", the count the snapshot records)."""
    result = result if result is not None else Snapshot({}, {}, {})
    count = 0
    expected = None
    key = snapshot.firstkey()
    while key is not None:
        value = snapshot[key]
        if key == COUNT_KEY:
            expected = int(value) if value.isdigit() else -1
            key = snapshot.nextkey(key)
            continue
        count += 1
        if key == GENERATION_KEY:
            result.generation = value
            key = snapshot.nextkey(key)
            continue
        try:
            name = key.decode()
            if name.startswith(METADATA_PREFIX):
                result.metadata[name[len(METADATA_PREFIX):]] = value.decode()
            else:
                result.grants[name] = decode_grant(name, value)
        except (UnicodeDecodeError, GrantDecodeError):
            result.undecodable[key] = value
        key = snapshot.nextkey(key)
    return result, count, expected
