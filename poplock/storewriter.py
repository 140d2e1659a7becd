"""The grant store, write side: one writer at a time publishes a new top (store.py says what that is).

A transaction takes an exclusive flock on PATH.lock (writers only; readers never touch
it), starts from the published state, and on success has gdbm write the new top in memory
(MemoryTop), copies it to PATH.new, fsyncs that, renames it over PATH and fsyncs the
directory: one data sync and one directory sync. A crash at any point leaves the previous
state in place. poplock-reader has those steps after the top is made done in a thread of
their own (Publisher), so that it goes on reading while the disk syncs.

A commit costs what it changes, not what the store holds (an ISP keeps a million grants,
and poplock-reader commits on every login):

  * The top holds only the changes since the last merge, so it stays small. PATH.new
    starts as a copy of the published top, which is never written after publication,
    and only the changed keys are written into the copy. Nothing reads or copies the
    base on a commit, beyond looking up the keys that change.
  * A writer keeps what it published in memory (the top's entries, not the base's),
    and reuses it while the file is still that one: same random generation, same file.
  * Once the top holds MERGE_AFTER entries, its changes are merged into a new base:
    poplock-reader does it in a child process, off the login path (merge_in_background,
    finish_merge), and publishes a new top naming the new base with whatever changed
    meanwhile; other writers, and commits that change very many keys at once (a
    catch-up, an import, an expiry), merge in the commit itself. A new base is written
    to its own name, fsynced, and only then named by a top; the old one is removed
    after that.

If writing into the copy fails (the published top is damaged, or the disk is full), the
top is written afresh from what the writer holds, which was read whole and checked; if
that fails too, the commit fails with StoreError and the old state stays. A damaged
top makes a transaction raise StoreCorruptError: the caller rebuilds the store from the
journal (reader.py) and publishes it with replace=True and keep_damaged=True, which keeps the
damaged file as PATH.damaged-TIME (the newest three) for a post-mortem.

Every file belongs to the owner and group of the store's directory, mode 0640, so that a
root `poplock add` leaves files the reader daemon and the SMTP side can read.
"""

from __future__ import annotations

import _gdbm
import errno
import fcntl
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Iterator, MutableMapping
from contextlib import contextmanager
from functools import partial

from poplock.errors import StoreBusyError, StoreCorruptError, StoreError
from poplock.grants import Grant, GrantDecodeError, decode_grant, encode_grant, value_is_not_live
from poplock.store import (
    BASE_KEY,
    COUNT_KEY,
    EPOCH_KEY,
    GENERATION_KEY,
    GRANTS_KEY,
    METADATA_PREFIX,
    TOMBSTONE,
    USER_PREFIX,
    open_snapshot,
)

USER_KEY = USER_PREFIX.decode()

log = logging.getLogger("poplock.store")

SNAPSHOT_MODE = 0o640
LOCK_MODE = 0o600  # and 0o660 when the store's directory lets its group write (lock_mode)
MERGE_AFTER = 4096  # top entries before they are merged into a new base (about 400 kB of top)
MERGE_NOW_AFTER = 4 * MERGE_AFTER  # a commit leaving more than this merges at once
MERGE_FOUND_DAMAGE = 2  # a background merge's exit status when the base it read was damaged
REWRITE_AFTER = 1000  # changed keys before a base-less top is written afresh, at the least


class State:
    """What a writer knows of one published state: the top's entries, not the base's."""

    def __init__(self, grants: dict, metadata: dict, undecodable: dict, base_name: str | None, total: int,
                 generation: bytes | None = None):
        # address -> Grant, or None for a tombstone over the base's grant; also "~USER" -> the
        # raw value of that user's index entry (store.py), or None for a tombstone.
        self.grants = grants
        self.metadata = metadata  # name -> text
        self.undecodable = undecodable  # raw key -> raw value this version cannot read (kept as is)
        self.base_name = base_name
        self.total = total  # grants in the whole store
        self.generation = generation
        self.epoch: bytes = b""
        self.identity: tuple | None = None
        self.afresh = False  # the published top cannot be copied (an upgraded store of the first format)


class Base:
    """The base file of a state, opened read-only when first needed.

    gdbm maps the file, and the kernel maps the cached pages around each page a lookup touches
    (fault-around: some 130 KiB a lookup, measured): a burst of logins looked up in a base of a
    million grants maps all of its 100 MB into the process. With `lookups_per_open` (the
    long-lived reader) the handle is reopened that often, which unmaps what they touched; each
    lookup then costs its page faults again, so a one-shot command (an expiry looks up 100,000)
    keeps it open."""

    def __init__(self, path: str, name: str | None, lookups_per_open: int | None = None):
        self.name = name
        self.path = f"{os.path.dirname(path) or '.'}/{name}" if name else None
        self._handle = None
        self._lookups = 0
        self._lookups_per_open = lookups_per_open

    def open(self):
        """A handle of its own on the base file, for the caller to close."""
        try:
            return _gdbm.open(self.path, "r")
        except _gdbm.error as error:
            raise StoreError(f"cannot read the store's base {self.path}: {error.args[-1]}") from None

    def get(self, address: str) -> bytes | None:
        if self.path is None:
            return None
        if self._handle is None or self._lookups == self._lookups_per_open:
            self.close()
            self._handle = self.open()
        self._lookups += 1
        value = self._handle.get(address.encode())
        return None if value == TOMBSTONE else value

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        self._lookups = 0


class Grants(MutableMapping):
    """address -> Grant for the whole store as this transaction changes it; reads the base only
    for the keys asked for, and holds only the changes."""

    def __init__(self, state: State, base: Base, *, cleared: bool = False):
        self._state = state
        self._base = base
        self.changes: dict[str, Grant | None] = {}
        self.cleared = cleared
        self._length: int | None = None  # len() as last counted; each change forgets it
        self._base_values: dict[str, bytes | None] = {}  # what base_value() found
        self._base_grants: dict[str, Grant | None] = {}  # and what _published() made of it

    def base_value(self, key: str) -> bytes | None:
        """The base's raw value for `key` (None: none), read from the file once per transaction:
        counting, publishing and the changes themselves ask again (an expiry, 100,000 times)."""
        # `in`, not a KeyError: most keys are asked for once (a catch-up's thousands of new addresses).
        if key in self._base_values:
            return self._base_values[key]
        value = self._base_values[key] = self._base.get(key)
        return value

    def _published(self, address: str) -> Grant | None:
        if self.cleared:
            return None
        if address in self._state.grants:
            return self._state.grants[address]
        if address in self._base_grants:
            return self._base_grants[address]
        value = self.base_value(address)
        try:
            grant = None if value is None else decode_grant(address, value)
        except GrantDecodeError:
            grant = None  # kept as it is until a grant replaces it
        self._base_grants[address] = grant
        return grant

    def get(self, address: str, default=None):
        # Not Mapping.get(), which goes through __getitem__ and a KeyError for each address without
        # a grant: a login looks up each address its user's other logins opened.
        grant = self.changes[address] if address in self.changes else self._published(address)
        return default if grant is None else grant

    def __getitem__(self, address: str) -> Grant:
        grant = self.get(address)
        if grant is None:
            raise KeyError(address)
        return grant

    def __setitem__(self, address: str, grant: Grant) -> None:
        self.changes[address] = grant
        self._length = None

    def __delitem__(self, address: str) -> None:
        self[address]  # KeyError when there is none
        self.changes[address] = None
        self._length = None

    def clear(self) -> None:
        self.changes = {}
        self.cleared = True
        self._length = None

    def __iter__(self):
        for address, _ in self.items():
            yield address

    def items(self, keep=None):
        """(address, Grant) for every grant, the base's streamed from its file; with `keep`, only the
        base's grants whose encoded value keep(value) is true are decoded and given (the others are
        left out: for scans that want a few of a million)."""
        changes = dict(self.changes)
        for address, grant in changes.items():
            if grant is not None:
                yield address, grant
        if self.cleared:
            return
        for address, grant in list(self._state.grants.items()):
            if isinstance(grant, Grant) and address not in changes:
                yield address, grant
        if self._base.path is None:
            return
        handle = self._base.open()  # its own: lookups made meanwhile reopen the shared one
        try:
            yield from self._base_items(handle, changes, keep)
        finally:
            handle.close()

    def _base_items(self, handle, changes: dict, keep):
        read, expected = 0, None
        try:
            key = handle.firstkey()
            while key is not None:
                if key == COUNT_KEY:
                    expected = handle[key]
                    key = handle.nextkey(key)
                    continue
                read += 1
                if not key.startswith((b"#", USER_PREFIX)):
                    value = handle[key]
                    if keep is None or keep(value):
                        address = key.decode("utf-8", "replace")
                        if address not in changes and address not in self._state.grants:
                            try:
                                grant = decode_grant(address, value)
                            except GrantDecodeError:
                                grant = None
                            if keep is not None:  # the few a scan finds are about to be changed
                                self._base_values[address], self._base_grants[address] = value, grant
                            if grant is not None:
                                yield address, grant
                key = handle.nextkey(key)
        except (_gdbm.error, KeyError) as error:
            raise StoreCorruptError(f"the store's base {self._base.path} is damaged: {error}") from None
        _check_base(handle, self._base.path, read, expected)

    def values(self):
        return [grant for _, grant in self.items()]

    def not_live(self, now: float) -> list[Grant]:
        """The grants that do not allow now (expired, or not yet begun): as [g for g in values() if not
        g.is_live(now)], but a base grant is decoded only when it is one of them."""
        return [grant for _, grant in self.items(keep=partial(value_is_not_live, now=now)) if not grant.is_live(now)]

    def __len__(self) -> int:
        if self._length is None:  # each change is looked up in the base: an expiry changes thousands
            if self.cleared:
                self._length = sum(grant is not None for grant in self.changes.values())
            else:
                self._length = self._state.total + sum(
                    (grant is not None) - (self._published(address) is not None)
                    for address, grant in self.changes.items())
        return self._length


class Users:
    """The user index (store.py's "~NAME" keys): which addresses each user's logins opened.

    A hint kept by the writers, to be checked against the grants themselves; read by key."""

    def __init__(self, grants: Grants):
        self._grants = grants
        self.changes: dict[str, list[str]] = {}  # "~NAME" -> addresses ([] removes the entry)

    def addresses(self, user: str) -> list[str]:
        key = USER_KEY + user
        if key in self.changes:
            return list(self.changes[key])
        if self._grants.cleared:
            return []
        state = self._grants._state
        value = state.grants[key] if key in state.grants else self._grants.base_value(key)
        return value.decode("utf-8", "replace").split() if value else []

    def set(self, user: str, addresses: list[str]) -> None:
        self.changes[USER_KEY + user] = list(addresses)


class Transaction:
    """What is being changed: `grants` (address -> Grant), `metadata` (name -> text) and `users`."""

    def __init__(self, grants: Grants, metadata: dict[str, str]):
        self.grants = grants
        self.metadata = metadata
        self.users = Users(grants)


class StoreWriter:
    """The store's writer. `background_merges`: the caller (poplock-reader) merges the top
    with merge_in_background() once merge_due(), so its commits merge only when they leave
    a top of more than MERGE_NOW_AFTER entries; other writers merge at MERGE_AFTER."""

    def __init__(self, path: str, *, lock_timeout: float = 10.0, background_merges: bool = False,
                 defer_directory_sync: bool = False, base_lookups_per_open: int | None = None,
                 publish_in_background: bool = False):
        self.path = path
        self.base_lookups_per_open = base_lookups_per_open  # see Base
        self.lock_timeout = lock_timeout
        self.defer_directory_sync = defer_directory_sync  # the caller calls sync_directory() (see there)
        self._directory_sync_due = False
        self.merge_after = MERGE_NOW_AFTER if background_merges else MERGE_AFTER
        self._published: State | None = None  # what this writer last published
        self._base: Base | None = None
        self._changes_since_rewrite = 0
        self._merge: tuple[int, int, State, str] | None = None  # (child pid, pipe fd, state merged, new base)
        self.durable_metadata: dict | None = None  # the metadata of the state last installed or read from disk
        self._publisher = Publisher(self) if publish_in_background else None

    @property
    def publisher(self) -> Publisher | None:
        """With publish_in_background: what installs the commits' new tops off the caller's thread."""
        return self._publisher

    @property
    def directory(self) -> str:
        return os.path.dirname(self.path) or "."

    @contextmanager
    def transaction(self, *, replace: bool = False, keep_damaged: bool = False) -> Iterator[Transaction]:
        """Lock, load, let the caller change the grants, publish if anything changed.

        `replace`: start from nothing instead of the published state (which may be
        damaged: it is not read) and publish the result afresh; with `keep_damaged`, the
        old top is kept as PATH.damaged-TIME. Raises StoreCorruptError when the
        published top is damaged and `replace` is not given.
        """
        publisher = self._publisher
        if publisher is not None:
            publisher.raise_failure()
            if replace or keep_damaged:
                publisher.drain()  # written in place of everything queued: after it, on disk too
        lock_fd = self._lock() if publisher is None else publisher.take_lock()
        try:
            state = State({}, {}, {}, None, 0) if replace else self._load()
            base = self._base_for(state)
            transaction = Transaction(Grants(state, base, cleared=replace), dict(state.metadata))
            yield transaction
            if transaction.grants.changes or transaction.grants.cleared or transaction.users.changes or \
                    transaction.metadata != state.metadata:
                self._publish(state, base, transaction, replace=replace, keep_damaged=keep_damaged)
        finally:
            if publisher is None:
                os.close(lock_fd)  # releases the flock
            else:
                publisher.release_lock()  # once nothing is queued either
            if self._base is not None:
                # gdbm maps the base: pages a commit's lookups touched would stay in the reader's
                # memory (a million grants are 100 MB of base). Reopening it costs some 30 µs.
                self._base.close()

    def _base_for(self, state: State) -> Base:
        if self._base is None or self._base.name != state.base_name:
            if self._base is not None:
                self._base.close()
            self._base = Base(self.path, state.base_name, self.base_lookups_per_open)
        return self._base

    def _lock(self) -> int:
        lock_path = self.path + ".lock"
        try:
            mode = lock_mode(os.stat(self.directory).st_mode)
            fd = os.open(lock_path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, mode)
        except OSError as error:
            raise StoreError(f"cannot open the store lock {lock_path}: {error.strerror}") from None
        try:
            self._give_to_directory_owner(fd)
            status = os.fstat(fd)
            if status.st_mode & 0o777 != mode and os.geteuid() in (0, status.st_uid):
                os.fchmod(fd, mode)  # whatever the umask, and as the directory's mode is now
            deadline = time.monotonic() + self.lock_timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return fd
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise StoreBusyError(
                            f"another writer held {lock_path} for more than {self.lock_timeout:.0f}s") from None
                    time.sleep(0.002)
        except OSError as error:
            os.close(fd)
            raise StoreError(f"cannot take the store lock {lock_path}: {error.strerror}") from None
        except BaseException:
            os.close(fd)
            raise

    # --- loading -------------------------------------------------------------------------------

    def _load(self) -> State:
        """The published state: the one this writer published, if the file is still that one."""
        if self._published is not None and (
                (self._publisher is not None and self._publisher.busy()) or self._still_published(self._published)):
            return self._published
        self._published = None
        self._changes_since_rewrite = 0
        state = self._read_top()
        self.durable_metadata = state.metadata
        if state.undecodable:
            log.warning("%s: %d entries this version cannot read are kept as they are",
                        self.path, len(state.undecodable))
        return state

    def _read_top(self) -> State:
        """The top read whole and checked (StoreCorruptError when damaged)."""
        snapshot = open_snapshot(self.path, busy_timeout=1.0)
        if snapshot is None:
            return State({}, {}, {}, None, 0)
        try:
            entries, count, expected = {}, 0, None
            top = snapshot.top
            key = top.firstkey()
            while key is not None:
                value = top[key]
                if key == COUNT_KEY:
                    expected = int(value) if value.isdigit() else -1
                else:
                    count += 1
                    entries[key] = value
                key = top.nextkey(key)
            if expected is None:
                len(top)  # written before "#count": gdbm's own check must do
            elif count != expected:
                raise StoreCorruptError(f"the grant store {self.path} is damaged: {count} of its {expected} "
                                        "entries are readable")
            identity = _identity(os.stat(self.path))  # under the lock: no poplock writer replaces it now
        except (_gdbm.error, KeyError) as error:
            raise StoreCorruptError(f"the grant store {self.path} is damaged: {error}") from None
        finally:
            snapshot.close()
        state = self._state_of(entries)
        state.identity = identity
        return state

    def _state_of(self, entries: dict[bytes, bytes]) -> State:
        base = entries.pop(BASE_KEY, None)
        total = entries.pop(GRANTS_KEY, None)
        generation = entries.pop(GENERATION_KEY, None)
        epoch = entries.pop(EPOCH_KEY, b"")
        grants, metadata, undecodable = {}, {}, {}
        for key, value in entries.items():
            try:
                name = key.decode()
                if name.startswith(METADATA_PREFIX):
                    metadata[name[len(METADATA_PREFIX):]] = value.decode()
                elif value == TOMBSTONE:
                    grants[name] = None
                elif name.startswith(USER_KEY):
                    grants[name] = value
                else:
                    grants[name] = decode_grant(name, value)
            except (UnicodeDecodeError, GrantDecodeError):
                undecodable[key] = value
        if base is None:  # no base: everything is in the top
            state = State(grants, metadata, undecodable, None, sum(isinstance(g, Grant) for g in grants.values()))
            state.generation = generation
            state.epoch = epoch
            if total is None and len(grants) > MERGE_AFTER:  # a big store of the first format: the first base
                state = self._upgrade(state)
            return state
        state = State(grants, metadata, undecodable, base.decode(), int(total) if total and total.isdigit() else
                      sum(isinstance(g, Grant) for g in grants.values()), generation)
        state.epoch = epoch
        return state

    def _upgrade(self, state: State) -> State:
        """A one-file store (the first format) of many grants: the file itself becomes the base,
        by a hard link, and the first commit writes a top of its own."""
        inode = os.stat(self.path).st_ino
        prefix = f"{os.path.basename(self.path)}.base-"
        linked = [entry.name for entry in os.scandir(self.directory)  # by a load before that changed nothing
                  if entry.name.startswith(prefix) and entry.inode() == inode]
        name = linked[0] if linked else f"{prefix}{os.urandom(8).hex()}"
        if not linked:
            os.link(self.path, f"{self.directory}/{name}")
            _fsync_directory(self.directory)
        log.info("%s: %d grants become the base %s", self.path, state.total, name)
        upgraded = State({}, state.metadata, {}, name, state.total)
        upgraded.afresh = True
        upgraded.epoch = os.urandom(8).hex().encode()
        return upgraded

    def _still_published(self, published: State) -> bool:
        # The generation tells another writer's top apart (a file identity alone can recur,
        # inodes being reused); the identity catches a program writing in place.
        try:
            if _identity(os.stat(self.path)) != published.identity:
                return False
            snapshot = open_snapshot(self.path, busy_timeout=1.0)
        except (OSError, StoreError):
            return False
        if snapshot is None:
            return False
        try:
            return snapshot.top.get(GENERATION_KEY) == published.generation
        except _gdbm.error:
            return False
        finally:
            snapshot.close()

    # --- publishing ----------------------------------------------------------------------------

    def _publish(self, state: State, base: Base, transaction: Transaction, *, replace: bool,
                 keep_damaged: bool) -> None:
        grants = transaction.grants
        cleared = grants.cleared
        total = len(grants)
        new = State({} if cleared else dict(state.grants), dict(transaction.metadata),
                    {} if replace else dict(state.undecodable), None if cleared else state.base_name, total)
        changed: dict[bytes, bytes | None] = {}  # the top's raw keys: new value, None to delete
        for address, grant in grants.changes.items():
            key = address.encode()
            if grant is not None:
                new.grants[address] = grant
                changed[key] = encode_grant(grant)
            elif new.base_name is not None and grants.base_value(address) is not None:
                new.grants[address] = None  # the base's grant is withdrawn
                changed[key] = TOMBSTONE
            else:
                new.grants.pop(address, None)
                changed[key] = None
            new.undecodable.pop(key, None)
        for name, addresses in transaction.users.changes.items():
            key = name.encode("utf-8", "surrogateescape")
            if addresses:
                value = " ".join(addresses).encode()
                new.grants[name] = changed[key] = value
            elif new.base_name is not None and grants.base_value(name) is not None:
                new.grants[name] = None
                changed[key] = TOMBSTONE
            else:
                new.grants.pop(name, None)
                changed[key] = None
        for name in state.metadata.keys() - new.metadata.keys():
            changed[(METADATA_PREFIX + name).encode()] = None
        for name, text in new.metadata.items():
            if state.metadata.get(name) != text:
                changed[(METADATA_PREFIX + name).encode()] = text.encode()
        new.epoch = state.epoch if not (cleared or replace) else os.urandom(8).hex().encode()
        merged = len(new.grants) > self.merge_after
        if merged:
            new.epoch = os.urandom(8).hex().encode()
            new.base_name = self._write_base(base if new.base_name else None, new.grants, changed)
            new.grants = {}
        self._changes_since_rewrite += len(changed)
        afresh = replace or cleared or state.afresh or merged or (
            new.base_name is None and self._changes_since_rewrite >= max(REWRITE_AFTER, len(new.grants)))
        background = self._publisher is not None and not (replace or cleared or merged or keep_damaged)
        if self._publisher is not None and not background:
            self._publisher.drain()  # on disk in the order made; old bases are removed below
        self._write_top(new, state, changed, afresh=afresh, keep_damaged=keep_damaged, background=background)
        if state.base_name != new.base_name:
            self._remove_old_bases(keep=(new.base_name, state.base_name))

    def _write_top(self, new: State, old: State, changed: dict[bytes, bytes | None], *, afresh: bool,
                   keep_damaged: bool = False, background: bool = False, before=None) -> None:
        """The new top made in memory, then installed as PATH: here, or with `background` by the
        publisher's thread (the state is the published one for this writer's next commit at once),
        which calls before() first."""
        new.generation = os.urandom(8).hex().encode()
        structure = {GENERATION_KEY: new.generation, GRANTS_KEY: b"%d" % new.total, EPOCH_KEY: new.epoch}
        if new.base_name is not None:
            structure[BASE_KEY] = new.base_name.encode()
        count = len(new.grants) + len(new.metadata) + len(new.undecodable) + len(structure)

        def fill(fd: int, path: str) -> None:
            if afresh or not self._write_into_copy(fd, path, changed, structure, old, count):
                self._changes_since_rewrite = 0
                os.ftruncate(fd, 0)
                _write_top_afresh(path, new, structure, count)

        memory = MemoryTop.create()
        if memory is None:  # no memory file to name: gdbm writes PATH.new itself
            self._install(new, fill, keep_damaged=keep_damaged)
            return
        try:
            try:
                fill(memory.fd, memory.path)
            except OSError as error:  # _gdbm.error too
                self._published = None
                raise StoreError(f"cannot write the grant store {self.path}: {_describe(error)} "
                                 "(writing the new top in memory)") from None
            if background:
                self._published = new
                self._publisher.enqueue(new, memory, before)
                memory = None  # the publisher's now
            else:
                self._install(new, lambda fd, path: memory.write_to(fd), keep_damaged=keep_damaged)
        finally:
            if memory is not None:
                memory.close()

    def _install(self, new: State, fill, *, keep_damaged: bool = False, background: bool = False) -> None:
        """PATH.new filled by fill(fd, path), fsynced and renamed over PATH. With `background`
        (the publisher's thread), the caller has made `new` the published state already and
        syncs the directory itself."""
        new_path = self.path + ".new"
        step = f"writing {new_path}"
        try:
            if os.path.lexists(new_path):
                os.unlink(new_path)  # left by a writer that crashed; we hold the lock
            fd = os.open(new_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, SNAPSHOT_MODE)
            try:
                fill(fd, new_path)
                os.fchmod(fd, SNAPSHOT_MODE)
                self._give_to_directory_owner(fd)
                os.fsync(fd)
                new.identity = _identity(os.fstat(fd))
            finally:
                os.close(fd)
            if keep_damaged and os.path.lexists(self.path):
                step = "keeping the damaged store aside"
                self._keep_aside()
            step = f"renaming {new_path} to {self.path}"
            os.replace(new_path, self.path)
        except OSError as error:
            if not background:
                self._published = None
            _remove_quietly(new_path)
            raise StoreError(f"cannot write the grant store {self.path}: {error.strerror or error} ({step})") from None
        self.durable_metadata = new.metadata
        if background:
            return
        self._published = new
        self._directory_sync_due = True
        if not self.defer_directory_sync:
            self.sync_directory()

    def sync_directory(self) -> None:
        """Make the last rename durable. A writer that defers it (poplock-reader) first tells the
        decisions waiting for the journal to be read that the new state is there: it is visible
        once renamed, and a crash before the sync only brings back a state the journal can mend."""
        if not self._directory_sync_due:
            return
        self._directory_sync_due = False
        try:
            _fsync_directory(self.directory)
        except OSError as error:  # published and visible already: not a failed commit
            log.warning("published %s, but could not sync its directory (%s): a crash now could bring back "
                        "the state before", self.path, error.strerror or error)

    def _keep_aside(self) -> None:
        """The damaged top, kept as PATH.damaged-TIME (the newest three of them) for a post-mortem."""
        aside = f"{self.path}.damaged-{int(time.time())}"
        if not os.path.lexists(aside):
            os.link(self.path, aside)
        prefix = os.path.basename(self.path) + ".damaged-"
        kept = sorted(name for name in os.listdir(self.directory) if name.startswith(prefix))
        for name in kept[:-3]:
            _remove_quietly(f"{self.directory}/{name}")

    def _write_into_copy(self, fd: int, path: str, changed: dict[bytes, bytes | None], structure: dict,
                         old: State, count: int) -> bool:
        """The new top in the file `fd` (named `path`), as a copy of the published top `old` with
        the changes written in; False if that failed. While the publisher has `old` queued, its
        memory file is copied: PATH may still be older."""
        queued = self._publisher.latest(old) if self._publisher is not None else None
        if queued is not None:
            try:
                queued.write_to(fd)
            except OSError as error:
                log.warning("cannot copy the new top in memory (%s); writing the new top afresh", _describe(error))
                return False
        elif not self._copy_published(fd):
            return False
        try:
            snapshot = _gdbm.open(path, "w")
            try:
                for key, value in changed.items():
                    if value is not None:
                        snapshot[key] = value
                    elif key in snapshot:
                        del snapshot[key]
                if old.base_name is not None and BASE_KEY not in structure:
                    del snapshot[BASE_KEY]
                for key, value in structure.items():
                    snapshot[key] = value
                snapshot[COUNT_KEY] = b"%d" % count
            finally:
                snapshot.close()
        except OSError as error:  # _gdbm.error too: a damaged copy, or the disk is full
            log.warning("cannot write the changes into a copy of %s (%s); writing the new top afresh",
                        self.path, _describe(error))
            return False
        return True

    def _copy_published(self, fd: int) -> bool:
        """PATH, as published, into the file `fd`; False if that failed."""
        try:
            published = open_snapshot(self.path, busy_timeout=1.0)
        except StoreError as error:
            log.warning("%s; writing the new top afresh", error)
            return False
        if published is None:
            return False
        try:  # copied under gdbm's read lock: no program can be writing it in place
            with open(self.path, "rb") as source:
                _send_whole(fd, source.fileno())
        except OSError as error:
            log.warning("cannot copy %s (%s); writing the new top afresh", self.path, _describe(error))
            return False
        finally:
            published.close()
        return True

    def _write_base(self, base: Base | None, top: dict[str, Grant | None],
                    encoded: dict[bytes, bytes | None] | None = None) -> str:
        """A new base holding `base` with `top` applied, fsynced under a name of its own; its name.
        `encoded`: raw values of top's keys made already (a catch-up's thousands of grants)."""
        name = f"{os.path.basename(self.path)}.base-{os.urandom(8).hex()}"
        path = f"{self.directory}/{name}"
        try:
            _write_base_file(path, base.path if base is not None else None, top, encoded=encoded)
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                self._give_to_directory_owner(fd)
            finally:
                os.close(fd)
        except OSError as error:
            _remove_quietly(path)
            _remove_quietly(path + ".new")
            raise StoreError(f"cannot write the store's base {path}: {_describe(error)}") from None
        return name

    # --- merging off the login path (poplock-reader) --------------------------------------------

    def merge_due(self) -> bool:
        """The top this writer published has grown past MERGE_AFTER, and no merge is running."""
        return self._merge is None and self._published is not None and len(self._published.grants) >= MERGE_AFTER

    def merge_in_background(self) -> int:
        """Start writing a new base in a child process; returns a descriptor that turns readable
        when the child is done (then call finish_merge)."""
        # The state published for this writer: with a publisher, maybe still queued (finish_merge's
        # top is queued after it, and dropped with it if it is not installed). The child only writes
        # the base file.
        state = self._published
        name = f"{os.path.basename(self.path)}.base-{os.urandom(8).hex()}"
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:  # the child: write the base, say how it went by the exit status, nothing else
            # It keeps none of the parent's descriptors: a copy of the store lock's (held while the
            # publisher installs) held the lock until the child exited, so the reader's next commit
            # waited for the whole merge (1.4 s at a million grants); a copy of a decision's
            # connection would keep it open after the parent closed it.
            os.closerange(3, write_fd)
            os.closerange(write_fd + 1, os.sysconf("SC_OPEN_MAX"))
            status = 1
            try:
                os.nice(10)  # the logins the parent commits meanwhile come first
                path = f"{self.directory}/{name}"
                # Left as NAME.new: only finish_merge, under the lock, gives it its name, so
                # that no other writer takes it for a base that no top names.
                _write_base_file(path, Base(self.path, state.base_name).path, state.grants, rename=False)
                if os.geteuid() == 0:
                    owner = os.stat(self.directory)
                    os.chown(path + ".new", owner.st_uid, owner.st_gid)
                status = 0
            except StoreCorruptError:
                status = MERGE_FOUND_DAMAGE
            except BaseException:  # noqa: BLE001 - the parent reports it, and the top keeps growing
                pass
            os._exit(status)
        os.close(write_fd)
        self._merge = (pid, read_fd, state, name)
        return read_fd

    def finish_merge(self) -> None:
        """Publish a top that names the new base, with what changed since the merge began."""
        pid, read_fd, merged, name = self._merge
        self._merge = None
        os.close(read_fd)
        _, status = os.waitpid(pid, 0)
        status = os.waitstatus_to_exitcode(status)
        path = f"{self.directory}/{name}"
        if status == MERGE_FOUND_DAMAGE:
            _remove_quietly(path + ".new")
            raise StoreCorruptError(f"the store's base {Base(self.path, merged.base_name).path} is damaged: "
                                    "found while merging the top into a new base")
        if status != 0:
            _remove_quietly(path + ".new")
            log.warning("could not merge the top of %s into a new base (status %d); will try again", self.path,
                        status)
            return
        publisher = self._publisher
        lock_fd = self._lock() if publisher is None else publisher.take_lock()
        try:
            state = self._load()  # with a publisher: the newest state queued, whose top is queued after it
            if state.epoch != merged.epoch:  # another writer flushed, replaced or merged meanwhile
                _remove_quietly(path + ".new")
                return
            # Named now, and made durable before a top names it (by the publisher, if there is one:
            # a directory sync right after the child's can take hundreds of milliseconds). A base that
            # no top names in the end (an install failed) is removed by the next merge.
            os.replace(path + ".new", path)
            if publisher is None:
                _fsync_directory(self.directory)
            new = State({}, dict(state.metadata), dict(state.undecodable), name, state.total)
            new.epoch = os.urandom(8).hex().encode()
            for address, grant in state.grants.items():
                if address in merged.grants and merged.grants[address] == grant:
                    continue  # in the new base now (a grant), or gone from it (a tombstone)
                new.grants[address] = grant
            for address, grant in merged.grants.items():
                if grant is not None and address not in state.grants:
                    new.grants[address] = None  # in the new base, but removed since the merge began
            if publisher is None:
                self._write_top(new, state, {}, afresh=True)
                self._remove_old_bases(keep=(name, merged.base_name))
            else:
                self._write_top(new, state, {}, afresh=True, background=True,
                                before=lambda: _fsync_directory(self.directory))
                publisher.then(lambda: self._remove_old_bases(keep=(name, merged.base_name)))
        finally:
            if publisher is None:
                os.close(lock_fd)
            else:
                publisher.release_lock()

    def _remove_old_bases(self, keep: tuple) -> None:
        """Remove the bases no top names, but the one just replaced: a reader that opened the
        previous top a moment ago may still be about to open it (then it starts again)."""
        prefix = os.path.basename(self.path) + ".base-"
        for name in os.listdir(self.directory):
            if name.startswith(prefix) and not name.endswith(".new") and name not in keep:
                _remove_quietly(f"{self.directory}/{name}")

    def cancel_merge(self) -> None:
        if self._merge is not None:
            pid, read_fd, _, name = self._merge
            self._merge = None
            os.close(read_fd)
            try:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
            except OSError:
                pass
            _remove_quietly(f"{self.directory}/{name}.new")

    def _give_to_directory_owner(self, fd: int) -> None:
        owner = os.stat(self.directory)
        if os.geteuid() == 0:
            os.fchown(fd, owner.st_uid, owner.st_gid)
        elif os.fstat(fd).st_gid != owner.st_gid and owner.st_mode & 0o020:
            try:  # a member of a group-writable directory's group: its files stay readable by that group
                os.fchown(fd, -1, owner.st_gid)
            except PermissionError:
                pass


def lock_mode(directory_mode: int) -> int:
    """The writers' lock file's mode: the directory's group may take it when it may write there."""
    return LOCK_MODE | (0o060 if directory_mode & 0o020 else 0)


def store_writers(path: str) -> frozenset[int]:
    """The users who can write the store at `path`: root, the owner of its directory, and the
    members of its group when the directory is group-writable."""
    try:
        status = os.stat(os.path.dirname(path) or ".")
    except OSError:
        return frozenset({0})
    writers = {0, status.st_uid}
    if status.st_mode & 0o020:
        import grp
        import pwd

        try:
            members = set(grp.getgrgid(status.st_gid).gr_mem)
        except KeyError:
            members = set()
        writers |= {user.pw_uid for user in pwd.getpwall() if user.pw_gid == status.st_gid or user.pw_name in members}
    return frozenset(writers)


class InstallError(StoreError):
    """A commit the publisher could not install (storewriter.Publisher): it, and those queued after
    it, are not in the store."""


class MemoryTop:
    """A new top, written by gdbm in a file in memory (memfd_create(2)) before it goes to PATH.new.

    gdbm syncs what it writes on close (an msync of its mapping), and CPython's module ignores
    what that returns; in memory that costs nothing, and write_to() then puts the whole top in
    PATH.new for the commit's one fsync to make durable and to report any error of. The file
    is never changed once written, so the publisher's thread may copy it while the next commit
    copies it too."""

    __slots__ = ("fd", "path")

    def __init__(self, fd: int):
        self.fd = fd
        self.path = f"/proc/self/fd/{fd}"  # gdbm opens files by name

    @classmethod
    def create(cls) -> MemoryTop | None:
        """A new empty one; None without memfd_create or a /proc to name it by."""
        try:
            fd = os.memfd_create("poplock-top", os.MFD_CLOEXEC)
        except (OSError, AttributeError):
            return None
        if not os.path.exists(f"/proc/self/fd/{fd}"):
            os.close(fd)
            return None
        return cls(fd)

    def duplicate(self) -> MemoryTop:
        return MemoryTop(os.dup(self.fd))

    def write_to(self, fd: int) -> None:
        _send_whole(fd, self.fd)

    def close(self) -> None:
        os.close(self.fd)


def _send_whole(target: int, source: int) -> None:
    """The whole file `source` into `target` (both at offset 0, which sendfile(2) leaves alone)."""
    size, copied = os.fstat(source).st_size, 0
    while copied < size:
        sent = os.sendfile(target, source, copied, size - copied)
        if sent == 0:
            raise OSError(errno.EIO, f"the file ended after {copied} of {size} bytes")
        copied += sent


class Publisher:
    """poplock-reader's commits installed in a thread of their own, so that a slow disk holds up no read.

    A commit makes its new top in memory (MemoryTop) and queues it here; the thread writes it to
    PATH.new, fsyncs it, renames it over PATH and fsyncs the directory. It installs the newest
    state queued, which holds the changes of all before it (each commit is made on top of the one
    before), so a disk that lags costs fewer syncs and no more memory than one top per commit
    queued meanwhile. The writer meanwhile goes on from the state queued: it holds the store's lock
    until the queue is empty, so that no other writer reads PATH while a newer state is in
    memory only. Decisions learn a commit's grants from the reader before it is installed (the
    early answer); the reader answers `ok` to a question only once the state that read made is
    installed (installed(), `wake_fd` turning readable when one is).

    If an install fails, those queued after it are dropped (each was made on top of it) and the
    next transaction, or installed(), raises the StoreError; the writer then starts again from
    what is on disk, and the caller from its position there (durable_metadata): the journal holds
    what was read since, so nothing is lost."""

    def __init__(self, writer: StoreWriter):
        self._writer = writer
        self._mutex = threading.Lock()
        self._changed = threading.Condition(self._mutex)  # queued, or installed
        self._queue: deque = deque()  # [number, state, MemoryTop, [then...], before], the one installed first
        self._latest: tuple[State, MemoryTop] | None = None  # the newest state queued and its top
        self._failure: InstallError | None = None
        self._lock_fd: int | None = None
        self._open_transactions = 0
        self.queued = 0  # the number of the last state queued
        self.installed_number = 0  # and of the last one installed
        self.wake_fd, self._wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._thread: threading.Thread | None = None
        self._stopping = False

    # --- the writer's side (the caller's thread)

    def take_lock(self) -> int:
        with self._mutex:
            self._open_transactions += 1
            if self._lock_fd is not None:
                return self._lock_fd
        try:
            fd = self._writer._lock()  # no install runs: none is queued while the lock is not held
        except BaseException:
            with self._mutex:
                self._open_transactions -= 1
            raise
        with self._mutex:
            self._lock_fd = fd
        return fd

    def release_lock(self) -> None:
        with self._mutex:
            self._open_transactions -= 1
            self._release_if_idle()

    def _release_if_idle(self) -> None:
        if not self._queue and self._open_transactions == 0 and self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def enqueue(self, state: State, memory: MemoryTop, before=None) -> None:
        """`state`, whose top is `memory`, to be installed after those queued; before() first."""
        with self._mutex:
            if self._failure is not None:  # made on top of a state that was not installed
                memory.close()
                return
            self.queued += 1
            self._queue.append([self.queued, state, memory.duplicate(), [], before])
            if self._latest is not None:
                self._latest[1].close()
            self._latest = (state, memory)
            if self._thread is None:
                self._thread = threading.Thread(target=self._install_queued, name="poplock-publisher", daemon=True)
                self._thread.start()
            self._changed.notify_all()

    def then(self, action) -> None:
        """action() once what is queued now is installed, in the thread (not if the install fails);
        at once when nothing is queued. For the writes that follow a commit (poplock-reader's cursor
        file): on a busy disk, even a rename waits for the filesystem's journal."""
        with self._mutex:
            if self._queue and self._failure is None:
                self._queue[-1][3].append(action)
                return
        action()

    def latest(self, state: State) -> MemoryTop | None:
        """The top of `state` in memory, if it is the newest state queued."""
        return self._latest[1] if self._latest is not None and self._latest[0] is state else None

    def busy(self) -> bool:
        """A state is queued and not installed yet."""
        with self._mutex:
            return bool(self._queue)

    def drain(self) -> None:
        """Wait until everything queued is installed (or dropped after a failure)."""
        with self._mutex:
            while self._queue:
                self._changed.wait()

    def raise_failure(self) -> None:
        """The StoreError of an install that failed since last asked, raised once; the writer then
        starts again from the store on disk."""
        with self._mutex:
            failure, self._failure = self._failure, None
            if failure is None:
                return
            if self._latest is not None:
                self._latest[1].close()
                self._latest = None
        self._writer._published = None
        raise failure

    def installed(self) -> int:
        """The number of the last state installed (wake_fd is emptied); raises an install's failure."""
        try:
            while os.read(self.wake_fd, 512):
                pass
        except BlockingIOError:
            pass
        self.raise_failure()
        return self.installed_number

    def close(self) -> None:
        """Install what is queued, then stop the thread."""
        self.drain()
        with self._mutex:
            self._stopping = True
            self._changed.notify_all()
            if self._latest is not None:
                self._latest[1].close()
                self._latest = None
        if self._thread is not None:
            self._thread.join()
        os.close(self.wake_fd)
        os.close(self._wake_write)

    # --- the thread

    def _install_queued(self) -> None:
        while True:
            with self._mutex:
                while not self._queue and not self._stopping:
                    self._changed.wait()
                if not self._queue:
                    return
                # The newest state queued holds every change of those before it (each was made on
                # top of the one before): only it is installed. A slow disk then costs fewer syncs,
                # and what waits in memory stays one top, however far the disk lags.
                taken = len(self._queue)
                number, state, memory, _, _ = self._queue[-1]
                befores = [entry[4] for entry in self._queue if entry[4] is not None]
            failure = None
            try:
                for before in befores:
                    try:
                        before()
                    except OSError as error:
                        raise StoreError(f"cannot write the grant store {self._writer.path}: "
                                         f"{error.strerror or error}") from None
                self._writer._install(state, lambda fd, path, memory=memory: memory.write_to(fd), background=True)
                try:
                    _fsync_directory(self._writer.directory)
                except OSError as error:  # installed and visible already: not a failed commit
                    log.warning("published %s, but could not sync its directory (%s): a crash now could bring "
                                "back the state before", self._writer.path, error.strerror or error)
            except StoreError as error:
                failure = InstallError(str(error))
            except BaseException as error:  # noqa: BLE001 - a thread that dies would leave the queue full
                failure = InstallError(f"cannot write the grant store {self._writer.path}: {error}")
            with self._mutex:
                then = []
                for _ in range(taken):
                    entry = self._queue.popleft()
                    entry[2].close()
                    then.extend(entry[3])
                if failure is None:
                    self.installed_number = number
                else:
                    self._failure = failure
                    while self._queue:  # each was made on top of the one that failed
                        self._queue.popleft()[2].close()
                self._release_if_idle()
                self._changed.notify_all()
            try:
                os.write(self._wake_write, b".")
            except BlockingIOError:  # the reader has not emptied it yet: it will look anyway
                pass
            for action in then if failure is None else ():  # once the decisions waiting are told
                try:
                    action()
                except Exception:  # the thread must go on installing
                    log.exception("after installing %s", self._writer.path)


def _write_top_afresh(path: str, state: State, structure: dict, count: int) -> None:
    snapshot = _gdbm.open(path, "nf", SNAPSHOT_MODE)
    try:
        for key, value in state.undecodable.items():
            snapshot[key] = value
        for address, grant in state.grants.items():
            snapshot[address.encode("utf-8", "surrogateescape")] = _encode(grant)
        for name, text in state.metadata.items():
            snapshot[(METADATA_PREFIX + name).encode()] = text.encode()
        for key, value in structure.items():
            snapshot[key] = value
        snapshot[COUNT_KEY] = b"%d" % count
    finally:
        snapshot.close()


def _write_base_file(path: str, old_base: str | None, top: dict[str, Grant | None], *,
                     rename: bool = True, encoded: dict[bytes, bytes | None] | None = None) -> None:
    """`old_base` with `top` applied (tombstones remove), written to PATH.new and fsynced, then
    (with `rename`) renamed to PATH, the directory synced."""
    new_path = path + ".new"
    fd = os.open(new_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, SNAPSHOT_MODE)  # see _write_top
    try:
        os.fchmod(fd, SNAPSHOT_MODE)  # whatever the umask: the SMTP side must be able to read it
        _fill_base(new_path, old_base, top, encoded or {})
        os.fsync(fd)
    finally:
        os.close(fd)
    if rename:
        os.replace(new_path, path)
        _fsync_directory(os.path.dirname(path) or ".")


def _fill_base(new_path: str, old_base: str | None, top: dict[str, Grant | None],
               encoded: dict[bytes, bytes | None]) -> None:
    snapshot = _gdbm.open(new_path, "nf", SNAPSHOT_MODE)
    count = 0
    keys = {address: address.encode("utf-8", "surrogateescape") for address in top}
    try:
        if old_base is not None:
            replaced = set(keys.values())
            source = _gdbm.open(old_base, "r")
            try:
                read, expected = 0, None
                key = source.firstkey()
                while key is not None:
                    if key == COUNT_KEY:
                        expected = source[key]
                    else:
                        read += 1
                        if key not in replaced and not key.startswith(b"#"):
                            snapshot[key] = source[key]
                            count += 1
                    key = source.nextkey(key)
                _check_base(source, old_base, read, expected)
            finally:
                source.close()
        for address, grant in top.items():
            if grant is not None:
                key = keys[address]
                snapshot[key] = encoded.get(key) or _encode(grant)
                count += 1
        snapshot[COUNT_KEY] = b"%d" % count
    finally:
        snapshot.close()


def _check_base(handle, path: str, read: int, expected: bytes | None) -> None:
    """A base read whole holds what it says it holds (store.py: damage is never fewer grants)."""
    try:
        if expected is None:
            len(handle)  # a base of the first format: gdbm's own check must do
            return
    except _gdbm.error as error:
        raise StoreCorruptError(f"the store's base {path} is damaged: {error}") from None
    if not expected.isdigit() or int(expected) != read:
        recorded = expected.decode(errors="replace")
        raise StoreCorruptError(f"the store's base {path} is damaged: {read} of its {recorded} entries are readable")


def _encode(value) -> bytes:
    """A top entry's raw value: a grant, a user index entry (bytes already), or a tombstone (None)."""
    if value is None:
        return TOMBSTONE
    return value if isinstance(value, bytes) else encode_grant(value)


def _identity(status: os.stat_result) -> tuple:
    return status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns


def _describe(error: OSError) -> str:
    """The error with the file it concerns, e.g. "Read-only file system: /var/lib/poplock/grants.db.new"."""
    text = error.strerror or str(error)
    return f"{text}: {error.filename}" if error.filename else text


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _fsync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
