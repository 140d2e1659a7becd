"""The grant store, read side: gdbm files that are never changed in place.

How one writer and many readers share it, at any size (LMDB's one atomic root switch,
and an LSM tree's small mutable level over a large immutable one):

  * The store is two levels. PATH, the top, is a small gdbm file holding the recent
    changes, the bookkeeping and, under "#base", the name of the base: a large gdbm
    file PATH.base-GENERATION in the same directory with everything older. A lookup
    reads the top first and the base only for what the top does not hold; a removal
    of a grant the base holds is a tombstone ("-") in the top. A small store has no
    base at all, and then PATH is the whole store (as stores written before bases
    existed are: those are read as they are, and become the first base when written).
  * Every file is immutable once published. A writer (poplock-reader, or `poplock
    add/remove/...`) takes an exclusive lock on PATH.lock, makes the new top (a copy of
    the top with the changes written in, in memory), writes it to PATH.new, fsyncs it and
    renames it over PATH, which is atomic: one data sync and one directory sync, whatever
    the store holds. See storewriter.py.
  * The top names its base, so a reader that opened one top sees one whole state,
    old or new, never a mix. When the top has grown, its changes are merged into a
    new base off the login path, and a new top names it; an old base is removed
    afterwards, so a lookup that finds its base gone starts again from the new top.
  * Keys are canonical addresses; values are grants (grants.py). Keys starting with "#"
    hold bookkeeping published in the same top, such as poplock-reader's journal
    cursor, so that grants and the position they cover are committed together.
  * Damage is detected, never read as fewer grants: each file records its number of
    entries under "#count", and a whole-store read (show, a writer's load) that finds
    another number, or that gdbm reports as needing recovery, raises
    StoreCorruptError. gdbm's firstkey/nextkey end early without an error on a damaged
    file, so counting is the only way to tell. Lookups of one key (relaylock, the
    policy service) go on answering from what is readable and fail closed on errors.
  * The journal is the source of truth and the store a view of it: a store that is
    missing or damaged is rebuilt from the journal, one window back (reader.py), not
    emptied; manual grants and removals are replayed from their journal entries.
  * gdbm's own lock is exclusive between a writer and readers: opening with
    GDBM_READER fails with EAGAIN while anything has that file open for writing.
    poplock's writers never open a published file for writing, so a reader meets
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
# Random for each published top, which tells a writer whether the file is still the
# one it published (storewriter.py).
GENERATION_KEY = b"#generation"
# How many other keys the file holds, so that a whole-store read tells damage from an end.
COUNT_KEY = b"#count"
# The top's base: a file name in the store's directory.
BASE_KEY = b"#base"
# How many grants the whole store holds (top and base), so that nobody counts them one by one.
GRANTS_KEY = b"#grants"
# Random, new whenever the store starts over (flushed, replaced) or gets a new base: a
# merge begun in another epoch is dropped (storewriter.py).
EPOCH_KEY = b"#epoch"
# In the top: the base's grant for this address is withdrawn.
TOMBSTONE = b"-"
# "~NAME": the addresses whose grants the user NAME's logins opened, space-separated. An
# index for the abuse limits, kept by the writers; a hint to check against the grants
# themselves, never a grant.
USER_PREFIX = b"~"
# The top's own keys, which are neither grants nor metadata of the callers'.
STRUCTURE_KEYS = (GENERATION_KEY, COUNT_KEY, BASE_KEY, GRANTS_KEY, EPOCH_KEY)

_EAGAIN = 11
_ENOENT = 2
_RETRY_PAUSE = 0.001


def _open_file(path: str, busy_timeout: float):
    """One gdbm file opened read-only, or None when it does not exist."""
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


class OpenStore:
    """One published state of the store: its top, and its base opened when first needed."""

    __slots__ = ("path", "top", "base_name", "_base", "_busy_timeout")

    def __init__(self, path: str, top, busy_timeout: float):
        self.path = path
        self.top = top
        name = top.get(BASE_KEY)
        self.base_name = name.decode("utf-8", "replace") if name else None
        self._base = None
        self._busy_timeout = busy_timeout

    @property
    def base_path(self) -> str | None:
        if self.base_name is None:
            return None
        directory = self.path.rpartition("/")[0]
        return f"{directory}/{self.base_name}" if directory else self.base_name

    def base(self):
        """The base's gdbm handle (None when there is no base); BaseGoneError if it was removed."""
        if self._base is None and self.base_name is not None:
            if "/" in self.base_name or not self.base_name.startswith(self.path.rpartition("/")[2] + ".base-"):
                raise StoreCorruptError(f"the grant store {self.path} names a base that is not its own: "
                                        f"{self.base_name!r}")
            self._base = _open_file(self.base_path, self._busy_timeout)
            if self._base is None:
                raise BaseGoneError(self.base_path)
        return self._base

    def get(self, key: bytes) -> bytes | None:
        """The raw value for `key`: the top's, else the base's; None when absent or withdrawn."""
        value = self.top.get(key)
        if value is None and self.base_name is not None and not key.startswith(b"#"):  # "~" keys too
            value = self.base().get(key)
        return None if value == TOMBSTONE else value

    def __getitem__(self, key: bytes) -> bytes:
        value = self.get(key)
        if value is None:
            raise KeyError(key)
        return value

    def keys(self) -> list[bytes]:
        """Every key in effect: grants of both levels (tombstones applied) and the top's bookkeeping."""
        top = self.top.keys()
        keys = [key for key in top if self.top[key] != TOMBSTONE and key not in STRUCTURE_KEYS]
        if self.base_name is not None:
            shadowed = set(top)
            keys += [key for key in self.base().keys() if key not in shadowed and not key.startswith(b"#")]
        return keys

    def grant_keys(self) -> list[bytes]:
        """The keys in effect that are grants (not bookkeeping, not the user index)."""
        return [key for key in self.keys() if not key.startswith((b"#", USER_PREFIX))]

    def close(self) -> None:
        self.top.close()
        if self._base is not None:
            self._base.close()
            self._base = None


class BaseGoneError(StoreError):
    """The base a top names was removed after a merge: open the store again."""


def open_snapshot(path: str, busy_timeout: float) -> OpenStore | None:
    """The published store opened read-only, or None when there is none yet.

    Raises StoreBusyError after `busy_timeout` seconds of EAGAIN, StoreCorruptError
    when the file is not a gdbm file, StoreError when it cannot be read at all.
    """
    top = _open_file(path, busy_timeout)
    if top is None:
        return None
    try:
        return OpenStore(path, top, busy_timeout)
    except _gdbm.error as error:
        top.close()
        raise StoreCorruptError(f"the grant store {path} is damaged: {error}") from None


def lookup_grant(path: str, address: str, busy_timeout: float) -> Grant | None:
    """The stored grant for a canonical address, live or not; None if there is none.

    A value this version cannot decode is a StoreError: the caller refuses the relay.
    """
    for _ in range(3):  # a merge may remove the base between opening the top and reading the base
        snapshot = open_snapshot(path, busy_timeout)
        if snapshot is None:
            return None
        try:
            return find_grant(snapshot, address, path)
        except BaseGoneError:
            continue
        finally:
            snapshot.close()
    raise StoreBusyError(f"the grant store {path} changed its base three times during one lookup")


def find_grant(snapshot: OpenStore, address: str, path: str) -> Grant | None:
    """The grant for a canonical address in an open store (see lookup_grant)."""
    try:
        value = snapshot.get(address.encode())
    except _gdbm.error as error:
        raise StoreError(f"cannot read the grant store {path}: {error}") from None
    if value is None:
        return None
    try:
        return decode_grant(address, value)
    except GrantDecodeError as error:
        raise StoreError(f"{path}: {error}") from None


def lookup_metadata(path: str, name: str, busy_timeout: float) -> str | None:
    """One bookkeeping value of the published top (None when absent or unreadable as text)."""
    snapshot = open_snapshot(path, busy_timeout)
    if snapshot is None:
        return None
    try:
        value = snapshot.top.get((METADATA_PREFIX + name).encode())
    except _gdbm.error as error:
        raise StoreError(f"cannot read the grant store {path}: {error}") from None
    finally:
        snapshot.close()
    try:
        return value.decode() if value is not None else None
    except UnicodeDecodeError:
        return None


class Snapshot:
    """Everything in the store, read whole: for small stores, tests and tools (iterate_store streams)."""

    __slots__ = ("grants", "metadata", "undecodable", "generation")

    def __init__(self, grants: dict, metadata: dict, undecodable: dict, generation: bytes | None = None):
        self.grants = grants  # address -> Grant
        self.metadata = metadata  # name -> text, from the top's keys that start with METADATA_PREFIX
        self.undecodable = undecodable  # raw key -> raw value this version cannot read
        self.generation = generation


def read_snapshot(path: str, busy_timeout: float) -> Snapshot:
    """Every entry of the published store (empty when there is none yet).

    StoreCorruptError when a file is damaged: fewer entries readable than it holds.
    """
    result = Snapshot({}, {}, {})
    for kind, key, value in iterate_store(path, busy_timeout):
        if kind == "grant":
            result.grants[key] = value
        elif kind == "metadata":
            result.metadata[key] = value
        elif kind == "undecodable":
            result.undecodable[key] = value
        elif kind == "generation":
            result.generation = value
    return result


def iterate_store(path: str, busy_timeout: float):
    """The store's entries one by one, checked for damage, without holding them all:
    ("grant", address, Grant), ("metadata", name, text), ("undecodable", raw key, raw
    value), ("user", name, [addresses]) for the index of who opened which grants, and
    ("generation", None, value). Raises StoreCorruptError as read_snapshot."""
    for _ in range(3):
        snapshot = open_snapshot(path, busy_timeout)
        if snapshot is None:
            return
        try:
            yield from _iterate_open(snapshot, path)
            return
        except BaseGoneError:
            continue  # nothing was yielded yet: the base is opened before its first entry
        finally:
            snapshot.close()
    raise StoreBusyError(f"the grant store {path} changed its base three times while it was read")


def _iterate_open(snapshot: OpenStore, path: str):
    try:
        base = snapshot.base()  # before anything is yielded, so that a vanished base can be retried
        top_entries = {}
        count, expected = 0, None
        key = snapshot.top.firstkey()
        while key is not None:
            value = snapshot.top[key]
            if key == COUNT_KEY:
                expected = int(value) if value.isdigit() else -1
            else:
                count += 1
                top_entries[key] = value
            key = snapshot.top.nextkey(key)
        _check_count(snapshot.top, path, count, expected)
        generation = top_entries.get(GENERATION_KEY)
        if generation is not None:
            yield "generation", None, generation
        for key, value in top_entries.items():
            if key in STRUCTURE_KEYS or value == TOMBSTONE:
                continue
            yield _entry(key, value)
        if base is None:
            return
        count, expected = 0, None
        key = base.firstkey()
        while key is not None:
            value = base[key]
            if key == COUNT_KEY:
                expected = int(value) if value.isdigit() else -1
            else:
                count += 1
                if key not in top_entries and not key.startswith(b"#"):
                    yield _entry(key, value)
            key = base.nextkey(key)
        _check_count(base, snapshot.base_path, count, expected)
    except (_gdbm.error, KeyError) as error:  # KeyError: a key listed whose value cannot be found
        raise StoreCorruptError(f"the grant store {path} is damaged: {error}") from None


def _check_count(handle, path: str, count: int, expected: int | None) -> None:
    if expected is None:  # written before "#count": gdbm's own check must do
        len(handle)
    elif count != expected:
        raise StoreCorruptError(f"the grant store {path} is damaged: {count} of its {expected} entries "
                                "are readable")


def _entry(key: bytes, value: bytes) -> tuple:
    if key.startswith(USER_PREFIX):
        return "user", key[1:].decode("utf-8", "surrogateescape"), value.decode("utf-8", "replace").split()
    try:
        name = key.decode()
        if name.startswith(METADATA_PREFIX):
            return "metadata", name[len(METADATA_PREFIX):], value.decode()
        return "grant", name, decode_grant(name, value)
    except (UnicodeDecodeError, GrantDecodeError):
        return "undecodable", key, value


def salvage_snapshot(path: str) -> Snapshot:
    """What can still be read of a damaged store, as far as gdbm gets; never raises."""
    result = Snapshot({}, {}, {})
    try:
        for kind, key, value in _iterate_unchecked(path):
            if kind == "grant":
                result.grants[key] = value
    except Exception:  # noqa: BLE001 - whatever the damage, what was read so far is kept
        pass
    return result


def _iterate_unchecked(path: str):
    snapshot = open_snapshot(path, busy_timeout=0)
    if snapshot is None:
        return
    try:
        seen = set()  # the top's keys, tombstones included, shadow the base's
        for handle in (snapshot.top, snapshot.base() if snapshot.base_name else None):
            if handle is None:
                continue
            key = handle.firstkey()
            while key is not None:
                if key not in seen:
                    value = handle[key]
                    if handle is snapshot.top:
                        seen.add(key)
                    if not key.startswith(b"#") and value != TOMBSTONE:
                        yield _entry(key, value)
                key = handle.nextkey(key)
    finally:
        snapshot.close()
