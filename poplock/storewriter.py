"""The grant store, write side: one writer at a time publishes complete snapshots.

A transaction takes an exclusive flock on PATH.lock (writers only; readers never touch
it), starts from the current snapshot, and on success writes the whole new set of
grants to PATH.new, fsyncs it, renames it over PATH and fsyncs the directory. A crash
at any point leaves the previous snapshot in place. See store.py for the reader side.

The snapshot belongs to the owner and group of the store's directory, mode 0640, so
that a root `poplock add` leaves a file the reader daemon and the SMTP side can read.
"""

from __future__ import annotations

import _gdbm
import fcntl
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager

from poplock.errors import StoreBusyError, StoreCorruptError, StoreError
from poplock.grants import Grant, encode_grant
from poplock.store import METADATA_PREFIX, Snapshot, read_snapshot

log = logging.getLogger("poplock.store")

SNAPSHOT_MODE = 0o640
LOCK_MODE = 0o600


class Transaction:
    """What is being changed: `grants` (address -> Grant) and `metadata` (name -> text)."""

    def __init__(self, grants: dict[str, Grant], metadata: dict[str, str]):
        self.grants = grants
        self.metadata = metadata


class StoreWriter:
    def __init__(self, path: str, *, lock_timeout: float = 10.0):
        self.path = path
        self.lock_timeout = lock_timeout

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """Lock, load, let the caller change the grants, publish if anything changed."""
        lock_fd = self._lock()
        try:
            current = self._load()
            transaction = Transaction(dict(current.grants), dict(current.metadata))
            yield transaction
            if transaction.grants != current.grants or transaction.metadata != current.metadata:
                self._publish(transaction, current.undecodable)
        finally:
            os.close(lock_fd)  # releases the flock

    def _lock(self) -> int:
        directory = os.path.dirname(self.path) or "."
        try:
            fd = os.open(self.path + ".lock", os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, LOCK_MODE)
        except OSError as error:
            raise StoreError(f"cannot open the store lock {self.path}.lock: {error.strerror}") from None
        self._give_to_directory_owner(fd, directory)
        deadline = time.monotonic() + self.lock_timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise StoreBusyError(
                        f"another writer held {self.path}.lock for more than {self.lock_timeout:.0f}s"
                    ) from None
                time.sleep(0.002)

    def _load(self) -> Snapshot:
        # Read afresh every time: another writer may have published since (a cache
        # keyed on inode and mtime can be fooled by inode reuse within a clock tick).
        try:
            snapshot = read_snapshot(self.path, busy_timeout=1.0)
        except StoreCorruptError as error:
            aside = f"{self.path}.corrupt-{int(time.time())}"
            os.replace(self.path, aside)
            log.error("%s; moved it aside to %s and started an empty store", error, aside)
            return Snapshot({}, {}, {})
        if snapshot.undecodable:
            log.warning("%s: %d entries this version cannot read are kept as they are",
                        self.path, len(snapshot.undecodable))
        return snapshot

    def _publish(self, transaction: Transaction, undecodable: dict[bytes, bytes]) -> None:
        directory = os.path.dirname(self.path) or "."
        new_path = self.path + ".new"
        try:
            if os.path.lexists(new_path):
                os.unlink(new_path)  # left by a writer that crashed; we hold the lock
            snapshot = _gdbm.open(new_path, "nf", SNAPSHOT_MODE)
            try:
                for address, grant in transaction.grants.items():
                    snapshot[address.encode()] = encode_grant(grant)
                for name, text in transaction.metadata.items():
                    snapshot[(METADATA_PREFIX + name).encode()] = text.encode()
                for key, value in undecodable.items():
                    snapshot[key] = value
            finally:
                snapshot.close()
            fd = os.open(new_path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fchmod(fd, SNAPSHOT_MODE)
                self._give_to_directory_owner(fd, directory)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(new_path, self.path)
            _fsync_directory(directory)
        except OSError as error:
            raise StoreError(f"cannot write the grant store {self.path}: {error}") from None

    @staticmethod
    def _give_to_directory_owner(fd: int, directory: str) -> None:
        if os.geteuid() != 0:
            return
        owner = os.stat(directory)
        os.fchown(fd, owner.st_uid, owner.st_gid)


def _fsync_directory(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
