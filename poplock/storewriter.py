"""The grant store, write side: one writer at a time publishes complete snapshots.

A transaction takes an exclusive flock on PATH.lock (writers only; readers never touch
it), starts from the current snapshot, and on success writes the new snapshot to
PATH.new, fsyncs it, renames it over PATH and fsyncs the directory. A crash at any
point leaves the previous snapshot in place. See store.py for the reader side.

A commit costs what it changes, not what the store holds (a busy site keeps thousands
of grants, and poplock-reader commits on every login): PATH.new starts as a copy of
the published file, which is never written after publication, and only the changed
keys are written into the copy. Every snapshot carries a random generation, so a
writer that published the current snapshot itself (same generation, same file) reuses
what it holds in memory instead of reading the file back. After as many changed keys as
the store holds, a snapshot is written afresh, which keeps the file compact.

If writing into the copy fails (the published file is damaged, or the disk is full),
the snapshot is written afresh from what the writer holds, which was read whole and
checked; if that fails too, the commit fails with StoreError and the old snapshot stays.
A damaged published snapshot makes a transaction raise StoreCorruptError: the caller
rebuilds the store from the journal (reader.py) and publishes it with replace=True,
which keeps the damaged file as PATH.damaged-TIME for a post-mortem.

The snapshot belongs to the owner and group of the store's directory, mode 0640, so
that a root `poplock add` leaves a file the reader daemon and the SMTP side can read.
"""

from __future__ import annotations

import _gdbm
import fcntl
import logging
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager

from poplock.errors import StoreBusyError, StoreError
from poplock.grants import Grant, encode_grant
from poplock.store import COUNT_KEY, GENERATION_KEY, METADATA_PREFIX, Snapshot, open_snapshot, read_snapshot

log = logging.getLogger("poplock.store")

SNAPSHOT_MODE = 0o640
LOCK_MODE = 0o600
REWRITE_AFTER = 1000  # changed keys before a fresh snapshot, at the least (see above)


class Transaction:
    """What is being changed: `grants` (address -> Grant) and `metadata` (name -> text)."""

    def __init__(self, grants: dict[str, Grant], metadata: dict[str, str]):
        self.grants = grants
        self.metadata = metadata


class StoreWriter:
    def __init__(self, path: str, *, lock_timeout: float = 10.0):
        self.path = path
        self.lock_timeout = lock_timeout
        # What this writer last published: (file identity, Snapshot with its generation).
        self._published: tuple[tuple, Snapshot] | None = None
        self._changes_since_rewrite = 0

    @contextmanager
    def transaction(self, *, replace: bool = False) -> Iterator[Transaction]:
        """Lock, load, let the caller change the grants, publish if anything changed.

        `replace`: start from nothing instead of the published snapshot (which may be
        damaged: it is not read) and publish the result afresh, keeping the old file
        as PATH.damaged-TIME. Raises StoreCorruptError when the published snapshot is
        damaged and `replace` is not given.
        """
        lock_fd = self._lock()
        try:
            current = Snapshot({}, {}, {}) if replace else self._load()
            transaction = Transaction(dict(current.grants), dict(current.metadata))
            yield transaction
            changes = _changed_keys(current, transaction)
            if changes or replace:
                self._publish(transaction, current, changes, replace=replace)
        finally:
            os.close(lock_fd)  # releases the flock

    def _lock(self) -> int:
        directory = os.path.dirname(self.path) or "."
        lock_path = self.path + ".lock"
        try:
            fd = os.open(lock_path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, LOCK_MODE)
        except OSError as error:
            raise StoreError(f"cannot open the store lock {lock_path}: {error.strerror}") from None
        try:
            self._give_to_directory_owner(fd, directory)
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

    def _load(self) -> Snapshot:
        """The current snapshot: the one this writer published, if the file is still that one."""
        if self._published is not None and self._still_published(*self._published):
            return self._published[1]
        self._published = None
        self._changes_since_rewrite = 0
        # Read afresh: another writer has published since (or this one never did).
        snapshot = read_snapshot(self.path, busy_timeout=1.0)
        if snapshot.undecodable:
            log.warning("%s: %d entries this version cannot read are kept as they are",
                        self.path, len(snapshot.undecodable))
        return snapshot

    def _still_published(self, identity: tuple, published: Snapshot) -> bool:
        # The generation tells another writer's snapshot apart (a file identity alone can
        # recur, inodes being reused); the identity catches a program writing in place.
        try:
            if _identity(os.stat(self.path)) != identity:
                return False
            snapshot = open_snapshot(self.path, busy_timeout=1.0)
        except (OSError, StoreError):
            return False
        if snapshot is None:
            return False
        try:
            return snapshot.get(GENERATION_KEY) == published.generation
        except _gdbm.error:
            return False
        finally:
            snapshot.close()

    def _publish(self, transaction: Transaction, current: Snapshot, changes: dict[bytes, bytes | None],
                 *, replace: bool) -> None:
        directory = os.path.dirname(self.path) or "."
        new_path = self.path + ".new"
        generation = os.urandom(8).hex().encode()
        count = _count(transaction, current.undecodable)
        self._changes_since_rewrite += len(changes)
        rewrite = replace or self._changes_since_rewrite >= max(REWRITE_AFTER, len(transaction.grants))
        try:
            if os.path.lexists(new_path):
                os.unlink(new_path)  # left by a writer that crashed; we hold the lock
            if rewrite or not self._write_into_copy(new_path, changes, generation, count):
                self._changes_since_rewrite = 0
                _write_afresh(new_path, transaction, current.undecodable, generation, changes, count)
            fd = os.open(new_path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fchmod(fd, SNAPSHOT_MODE)
                self._give_to_directory_owner(fd, directory)
                os.fsync(fd)
                identity = _identity(os.fstat(fd))
            finally:
                os.close(fd)
            if replace and os.path.lexists(self.path):
                aside = f"{self.path}.damaged-{int(time.time())}"
                if not os.path.lexists(aside):
                    os.link(self.path, aside)  # the old file, kept for a post-mortem
            os.replace(new_path, self.path)
            _fsync_directory(directory)
        except OSError as error:
            self._published = None
            _remove_quietly(new_path)
            raise StoreError(f"cannot write the grant store {self.path}: {_describe(error)}") from None
        self._published = (identity, Snapshot(dict(transaction.grants), dict(transaction.metadata),
                                              current.undecodable, generation))

    def _write_into_copy(self, new_path: str, changes: dict[bytes, bytes | None], generation: bytes,
                         count: int) -> bool:
        """PATH.new as a copy of the published file with `changes` written in; False if that failed."""
        try:
            published = open_snapshot(self.path, busy_timeout=1.0)
        except StoreError as error:
            log.warning("%s; writing the new snapshot afresh", error)
            return False
        if published is None:
            return False
        try:  # copied under gdbm's read lock: no program can be writing it in place
            shutil.copyfile(self.path, new_path)
        finally:
            published.close()
        try:
            _write_changes(new_path, changes, generation, count)
        except OSError as error:  # _gdbm.error too: a damaged copy, or the disk is full
            log.warning("cannot write the changes into a copy of %s (%s); writing the new snapshot afresh",
                        self.path, _describe(error))
            _remove_quietly(new_path)
            return False
        return True

    @staticmethod
    def _give_to_directory_owner(fd: int, directory: str) -> None:
        if os.geteuid() != 0:
            return
        owner = os.stat(directory)
        os.fchown(fd, owner.st_uid, owner.st_gid)


def store_writers(path: str) -> frozenset[int]:
    """The users who can write the store at `path`: root and the owner of its directory."""
    try:
        return frozenset({0, os.stat(os.path.dirname(path) or ".").st_uid})
    except OSError:
        return frozenset({0})


def _write_changes(path: str, changes: dict[bytes, bytes | None], generation: bytes, count: int) -> None:
    snapshot = _gdbm.open(path, "w")
    try:
        for key, value in changes.items():
            if value is not None:
                snapshot[key] = value
            elif key in snapshot:
                del snapshot[key]
        snapshot[GENERATION_KEY] = generation
        snapshot[COUNT_KEY] = b"%d" % count
    finally:
        snapshot.close()


def _write_afresh(path: str, transaction: Transaction, undecodable: dict[bytes, bytes], generation: bytes,
                  encoded: dict[bytes, bytes | None], count: int) -> None:
    """A new snapshot of everything; `encoded` has the changed grants' values already."""
    snapshot = _gdbm.open(path, "nf", SNAPSHOT_MODE)
    try:
        for key, value in undecodable.items():  # first: a grant written for the same key wins, as in a copy
            snapshot[key] = value
        for address, grant in transaction.grants.items():
            key = address.encode()
            value = encoded.get(key)
            snapshot[key] = value if value is not None else encode_grant(grant)
        for name, text in transaction.metadata.items():
            snapshot[(METADATA_PREFIX + name).encode()] = text.encode()
        snapshot[GENERATION_KEY] = generation
        snapshot[COUNT_KEY] = b"%d" % count
    finally:
        snapshot.close()


def _count(transaction: Transaction, undecodable: dict[bytes, bytes]) -> int:
    """How many keys the new snapshot holds besides "#count" (store.py's damage check)."""
    kept = 0
    for key in undecodable:  # those a grant or bookkeeping value now replaces are gone
        try:
            name = key.decode()
        except UnicodeDecodeError:
            kept += 1
            continue
        replaced = name[len(METADATA_PREFIX):] in transaction.metadata if name.startswith(METADATA_PREFIX) \
            else name in transaction.grants
        kept += not replaced
    return len(transaction.grants) + len(transaction.metadata) + kept + 1  # + "#generation"


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


def _changed_keys(before: Snapshot, after: Transaction) -> dict[bytes, bytes | None]:
    """Raw key -> new value (None: removed) for everything the transaction changed."""
    changes: dict[bytes, bytes | None] = {}
    for address, grant in after.grants.items():
        old = before.grants.get(address)
        if old is not grant and old != grant:  # most are the very objects loaded
            changes[address.encode()] = encode_grant(grant)
    for address in before.grants.keys() - after.grants.keys():
        changes[address.encode()] = None
    for name, text in after.metadata.items():
        if before.metadata.get(name) != text:
            changes[(METADATA_PREFIX + name).encode()] = text.encode()
    for name in before.metadata.keys() - after.metadata.keys():
        changes[(METADATA_PREFIX + name).encode()] = None
    return changes


def _fsync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
