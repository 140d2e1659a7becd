"""One writer and several readers in separate processes, hammering the same store.

The guarantee under test: readers never see a torn or half-written state, and never
wait at all (they are given no retries, so a single EAGAIN would be an error).
"""

import multiprocessing
import os
import time

import pytest
from support.poplock import grant_keys

from poplock.grants import Grant, decode_grant
from poplock.store import open_snapshot
from poplock.storewriter import StoreWriter

TRANSACTIONS = 600
GRANTS_PER_TRANSACTION = 3  # a snapshot with a count that is not a multiple of 3 would be torn
READERS = 3
LOGIN_AT = 1_795_699_814


def address(index: int) -> str:
    return f"10.{index >> 16 & 255}.{index >> 8 & 255}.{index & 255}"


def write_grants(path: str, merge_after: int | None) -> None:
    writer = StoreWriter(path)
    if merge_after is not None:
        writer.merge_after = merge_after  # merged into a new base every few commits
    for transaction_number in range(TRANSACTIONS):
        with writer.transaction() as transaction:
            for offset in range(GRANTS_PER_TRANSACTION):
                index = transaction_number * GRANTS_PER_TRANSACTION + offset
                transaction.grants[address(index)] = Grant(address(index), LOGIN_AT + 1800 + index,
                                                           LOGIN_AT + index, "dovecot")


def read_until(path: str, done, results) -> None:
    problems, reads, slowest, counts_seen = [], 0, 0.0, 0
    last_count = 0
    while not done.is_set() or reads == 0:
        started = time.perf_counter()
        try:
            snapshot = open_snapshot(path, busy_timeout=0)
        except Exception as error:  # noqa: BLE001 - StoreBusyError included: readers must never wait
            problems.append(f"open failed: {error!r}")
            continue
        if snapshot is None:
            continue
        try:
            keys = grant_keys(snapshot)
            for key in keys:
                grant = decode_grant(key.decode(), snapshot[key])
                if grant.expires_at - grant.login_at != 1800:
                    problems.append(f"torn value for {key!r}")
        except Exception as error:  # noqa: BLE001 - any failure to read is what this test looks for
            problems.append(f"read failed: {error!r}")
            continue
        finally:
            snapshot.close()
        slowest = max(slowest, time.perf_counter() - started)
        reads += 1
        if len(keys) % GRANTS_PER_TRANSACTION:
            problems.append(f"half a transaction visible: {len(keys)} grants")
        if len(keys) < last_count:
            problems.append(f"grants went back from {last_count} to {len(keys)}")
        if len(keys) != last_count:
            counts_seen += 1
        last_count = len(keys)
    results.put((problems[:10], len(problems), reads, counts_seen, slowest))


@pytest.mark.parametrize("merge_after", [None, 100], ids=["one level", "merging into new bases"])
def test_readers_never_see_a_torn_store_and_never_wait_while_a_writer_commits(tmp_path, merge_after):
    path = str(tmp_path / "grants.db")
    context = multiprocessing.get_context("fork")
    done, results = context.Event(), context.Queue()
    readers = [context.Process(target=read_until, args=(path, done, results)) for _ in range(READERS)]
    for reader in readers:
        reader.start()
    writer = context.Process(target=write_grants, args=(path, merge_after))
    writer.start()
    writer.join(300)
    done.set()
    outcomes = [results.get(timeout=60) for _ in readers]
    for reader in readers:
        reader.join(60)
    assert writer.exitcode == 0
    for problems, problem_count, reads, counts_seen, slowest in outcomes:
        print(f"reader: {reads} reads, {counts_seen} distinct snapshots, slowest read {slowest * 1000:.1f}ms")
        assert problem_count == 0, problems
        assert counts_seen > 10  # the readers really ran while the writer was committing
    snapshot = open_snapshot(path, 0)
    assert len(grant_keys(snapshot)) == TRANSACTIONS * GRANTS_PER_TRANSACTION
    assert (snapshot.base_name is not None) == (merge_after is not None)
    snapshot.close()
    bases = [name for name in os.listdir(tmp_path) if ".base-" in name]
    assert len(bases) == (2 if merge_after is not None else 0)  # the current and the one before it
