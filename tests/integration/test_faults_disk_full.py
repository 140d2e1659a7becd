"""Fault suite: a full disk at any write point of a commit leaves the old store or the new one whole, never torn.

enospc.c makes the Nth call that changes the disk fail with ENOSPC, in a writer process of its
own; N runs 1, 2, 3, ... until a commit goes through with nothing failed. After every run another
process, without the shim, reads the store: it must be exactly the old state or exactly the new one,
grant by grant and with its bookkeeping; a commit reported as done must be the new one; a failure
must be a StoreError naming the store; a following clean commit must succeed; nothing may be left
beside the store but PATH.lock (and PATH.new, until the next commit). The last test fills a real tmpfs.

What strace -f shows a commit calling (enospc.c watches these and more):
  into a copy: open PATH.lock (O_CREAT) and fchown it; open PATH.new (O_CREAT|O_EXCL); make a memory
    file (memfd) and sendfile PATH into it; gdbm opens it, writes the changes through mmap (write()s of
    zeros first when the file must grow) and msyncs it; sendfile the memory file to PATH.new; fchmod,
    fchown, fsync PATH.new; rename it over PATH; fsync the directory.
  afresh: as above, but gdbm creates the new top in the memory file: write()s of its header and first
    blocks, an fsync, more write()s as it grows, an msync.
Whichever way, the disk sees one data sync (PATH.new) and one directory sync: every scenario checks it.
"""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from support.faults import (
    PrivateTmpfs,
    WriterProcess,
    apply_change,
    build_enospc_shim,
    commit,
    describe_difference,
    read_state,
    shim_environment,
    stray_files,
    whole,
)

LOGIN_AT = 1_900_000_000
CURSOR = "cursor:/var/lib/poplock/cursor"
COMMITTED = {"outcome": "committed"}
RUNS_AT_ONCE = 3  # attempts are processes waiting on the disk as much as on the CPU


def grant_value(minutes: int = 30) -> list:
    return [LOGIN_AT + minutes * 60, LOGIN_AT, "dovecot"]


def addresses(prefix: str, count: int) -> list[str]:
    return [f"{prefix}.{index >> 8}.{index & 255}" for index in range(count)]


# 1000 grants: flushing them is a change to so many keys that the snapshot is written afresh (storewriter.py).
SEED = {"grants": {address: grant_value() for address in addresses("10.0", 1000)},
        "metadata": {CURSOR: "s=seed;i=1"}}
WARM_UP = {"grants": {"192.0.2.10": grant_value()}, "metadata": {CURSOR: "s=seed;i=2"}}
# One login and the cursor that covers it, as poplock-reader commits them: written into a copy.
ONE_LOGIN = {"grants": {"192.0.2.1": grant_value(31)}, "metadata": {CURSOR: "s=new;i=3"}}
# A burst of logins: written into a copy that must grow a few blocks, and written afresh if the copy cannot be.
BURST = {"grants": {address: grant_value(31) for address in addresses("10.3", 200)},
         "metadata": {CURSOR: "s=new;i=3"}}
# `poplock flush`, then a login: every key changed, so the snapshot is written afresh.
FLUSH = {"clear": True, "grants": {"192.0.2.1": grant_value(31)}, "metadata": {CURSOR: "s=new;i=3"}}
FOLLOW_UP = {"grants": {"192.0.2.99": grant_value(45)}, "metadata": {CURSOR: "s=follow;i=4"}}

COPY_CALLS = ("sendfile", "copy_file_range")
SYNC_CALLS = ("fsync", "fdatasync", "msync", "sync_file_range")
MEMORY_FILE = "/memfd:poplock-top"  # where gdbm writes a new top (storewriter.Scratch)
WRITE_CALLS = ("write", "pwrite", "pwrite64", "writev", "pwritev", "pwritev64", "pwritev2", "pwritev64v2")


class Scenario:
    def __init__(self, change: dict, *, long_lived: bool, copied: bool, grows: bool | None):
        self.change = change
        self.warm_up = WARM_UP if long_lived else None  # a first, clean commit by the same writer
        self.old = apply_change(SEED, WARM_UP) if long_lived else SEED
        self.new = apply_change(self.old, change)
        # The way a clean commit is meant to take: into a copy of the published file or afresh, and
        # whether the copy must grow (gdbm write()s zeros first; None: either).
        self.copied = copied
        self.grows = grows

    def check_path(self, write_points: list[str], store: Path) -> None:
        points = [line.split(maxsplit=2)[1:] for line in write_points]
        in_memory = [call for call, detail in points if detail.startswith(MEMORY_FILE)]
        copied = any(call.startswith(COPY_CALLS) for call in in_memory)
        grows = copied and any(call in WRITE_CALLS for call in in_memory)
        assert copied == self.copied and self.grows in (None, grows), (
            "the scenario no longer takes the commit path it is meant to cover (storewriter.py changed?); "
            "its write points were:\n" + "\n".join(write_points))
        disk_syncs = [f"{call} {detail}" for call, detail in points
                      if call in SYNC_CALLS and not detail.startswith(MEMORY_FILE)]
        assert disk_syncs == [f"fsync {store}.new", f"fsync {store.parent}"], (
            "a commit is one data sync (PATH.new) and one directory sync; its write points were:\n" +
            "\n".join(write_points))


SCENARIOS = {
    f"{what}, by a {who}": Scenario(change, long_lived=long_lived, copied=copied, grows=grows)
    for what, change, copied, grows in [("one login written into a copy", ONE_LOGIN, True, False),
                                        ("a burst of logins written into a copy that grows", BURST, True, True),
                                        ("a flush written afresh", FLUSH, False, None)]
    for who, long_lived in [("fresh writer", False), ("long-lived writer's second commit", True)]
}


@pytest.fixture(scope="module")
def shim(tmp_path_factory) -> Path:
    return build_enospc_shim(tmp_path_factory.mktemp("shim"))


@pytest.fixture(scope="module")
def seeded_store(tmp_path_factory) -> Path:
    """A store holding SEED, alone in its directory, made once and copied for every attempt."""
    store = tmp_path_factory.mktemp("seed") / "grants.db"
    assert commit(store, {**SEED, "clear": True}) == COMMITTED
    assert read_state(store) == SEED
    return store


@pytest.mark.parametrize("persist", [False, True], ids=["only that call fails", "the disk stays full"])
@pytest.mark.parametrize("name", list(SCENARIOS))
def test_a_disk_full_at_any_write_point_leaves_the_old_store_or_the_new_one_whole(
        name, persist, shim, seeded_store, tmp_path):
    scenario = SCENARIOS[name]
    reference = _attempt(scenario, 0, persist, shim, seeded_store, tmp_path / "clean")
    write_points = reference["log"]
    assert write_points and reference["outcome"] == "committed"
    scenario.check_path(write_points, tmp_path / "clean" / "store" / seeded_store.name)

    # N = 1 .. one past the last write point: the last attempt must go through with nothing failed.
    last = len(write_points) + 1
    with ThreadPoolExecutor(RUNS_AT_ONCE) as pool:
        runs = [pool.submit(_attempt, scenario, fail_at, persist, shim, seeded_store, tmp_path / f"n{fail_at}")
                for fail_at in range(1, last + 1)]
        results = [run.result() for run in runs]
    for fail_at, result in enumerate(results, start=1):
        assert result["injected"] == (fail_at < last), (fail_at, result["log"])
    assert results[-1]["outcome"] == "committed"
    print(f"\n{name}, {'the disk stays full' if persist else 'one call fails'}: {len(write_points)} write points")
    for result in results[:-1]:
        print(f"  {result['failed_point']}: {result['outcome']} {result.get('error', '')}, the {result['state']} state")


def _attempt(scenario: Scenario, fail_at: int, persist: bool, shim: Path, seeded_store: Path, run: Path) -> dict:
    """One commit with write point `fail_at` failing (0: none), and every check of what it left."""
    store = run / "store" / seeded_store.name
    shutil.copytree(seeded_store.parent, store.parent)  # with its base, should it have one
    log = run / "write-points.log"
    with WriterProcess(store, environment=shim_environment(shim, fail_at, persist=persist, log=log)) as writer:
        if scenario.warm_up is not None:
            assert writer.commit(scenario.warm_up) == COMMITTED
        writer.arm()
        outcome = writer.commit(scenario.change)
        points = writer.disarm() if outcome is not None else None
        written = log.read_text().splitlines() if log.exists() else []
        failed_point = next((line for line in written if line.endswith(" ENOSPC")), "nothing failed")
        where = f"with write point {fail_at} failing ({failed_point}); the write points:\n" + "\n".join(written)

        with WriterProcess(store) as other:  # another process, without the shim
            dumped = other.dump()
            found = whole(dumped)
            # Old or new and whole, whatever the writer says or however it ended.
            assert found in (scenario.old, scenario.new), (
                f"a torn store {where}\n"
                f"compared with the old state: {describe_difference(found, scenario.old)}\n"
                f"compared with the new state: {describe_difference(found, scenario.new)}")
            state = "new" if found == scenario.new else "old"
            assert outcome is not None, f"the writer died ({writer.crash()}) {where}\n{writer.stderr()}"
            if outcome["outcome"] == "committed":
                assert state == "new", f"a commit reported as done is not in the store {where}"
            else:
                # StoreError or a subclass of its own; damage and a busy lock would be false reasons.
                assert outcome["store_error"] and outcome["error"] not in ("StoreCorruptError", "StoreBusyError"), (
                    f"not a StoreError: {outcome} {where}")
                assert str(store) in outcome["message"], f"the error does not name the store: {outcome} {where}"
            assert stray_files(store, dumped) == [], where

            # The next commit goes through: by the same writer if it lives on (poplock-reader), else by another.
            follow_up = (writer if scenario.warm_up is not None else other).commit(FOLLOW_UP)
            assert follow_up == COMMITTED, f"a clean commit after the failure failed: {follow_up} {where}"
            dumped = other.dump()
            after, expected = whole(dumped), apply_change(found, FOLLOW_UP)
            assert after == expected, f"after the next commit {where}: {describe_difference(after, expected)}"
            assert stray_files(store, dumped) == [] and f"{store.name}.new" not in dumped["files"], where
    return {**outcome, "log": written, "failed_point": failed_point, "state": state,
            "injected": 0 < fail_at <= points}


# ---- a real full filesystem ----

# 40 grants make a gdbm file of 4 blocks, which BURST grows by a few: as the free space goes from none to
# enough, the copy runs out of room, then its growth, then the snapshot written afresh.
SMALL_SEED = {"grants": {address: grant_value() for address in addresses("10.1", 40)},
              "metadata": {CURSOR: "s=seed;i=1"}}
# In the namespace: a copy of the seeded store's directory, and a filler that leaves exactly N blocks free.
PREPARE = """
import glob, os, shutil, sys
template, directory, filler, free = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
for earlier in glob.glob(os.path.join(os.path.dirname(directory), "free-*")):
    shutil.rmtree(earlier)
shutil.copytree(template, directory)
room = os.statvfs(directory)
with open(filler, "wb") as file:
    file.write(b"x" * ((room.f_bavail - free) * room.f_frsize))
    os.fsync(file.fileno())
print(os.statvfs(directory).f_bavail)
"""


def test_a_commit_that_does_not_fit_on_a_full_filesystem_fails_naming_the_store_and_keeps_it_whole(tmp_path):
    new = apply_change(SMALL_SEED, BURST)
    results = []
    with PrivateTmpfs(tmp_path / "tmpfs", size="512k") as tmpfs:
        template = tmpfs.mount_point / "seed" / "grants.db"
        tmpfs.run("mkdir", str(template.parent))
        assert commit(template, {**SMALL_SEED, "clear": True}, prefix=tmpfs.prefix) == COMMITTED
        filler = tmpfs.mount_point / "filler"
        for free_blocks in range(0, 40):  # bounded: the commit fits long before
            where = f"with {free_blocks} blocks free"
            store = tmpfs.mount_point / f"free-{free_blocks}" / template.name
            left = tmpfs.python(PREPARE, str(template.parent), str(store.parent), str(filler), str(free_blocks))
            assert int(left.stdout) == free_blocks

            with WriterProcess(store, prefix=tmpfs.prefix) as writer:
                outcome = writer.commit(BURST)
                crash = writer.crash() if outcome is None else None
            with WriterProcess(store, prefix=tmpfs.prefix) as other:  # no shim here: a fresh process
                dumped = other.dump()
                found = whole(dumped)
                # Whatever became of the writer (gdbm maps its files: a full tmpfs could mean SIGBUS), the
                # store is whole.
                assert found in (SMALL_SEED, new), f"{where}: a torn store: {describe_difference(found, SMALL_SEED)}"
                assert outcome is not None, (f"{where} the writer died of {crash}, leaving the "
                                             f"{'old' if found == SMALL_SEED else 'new'} state whole:\n"
                                             f"{writer.stderr()}")
                if outcome["outcome"] == "committed":
                    assert found == new, where
                else:
                    assert found == SMALL_SEED, where
                    assert outcome["error"] == "StoreError", (where, outcome)
                    assert outcome["message"].startswith(f"cannot write the grant store {store}: "), (where, outcome)
                    assert "No space left on device" in outcome["message"], (where, outcome)
                assert stray_files(store, dumped) == [], where
                results.append(f"{free_blocks:2} blocks free: {outcome['outcome']} {outcome.get('message', '')}")
                if outcome["outcome"] == "committed":
                    break
                tmpfs.run("rm", str(filler))  # room again: the same commit goes through
                assert other.commit(BURST) == COMMITTED, where
                assert whole(other.dump()) == new, where
    print("\n" + "\n".join(results))
    assert results[0].startswith(" 0 blocks free: failed"), results
    assert len(results) > 3 and "committed" in results[-1], results
