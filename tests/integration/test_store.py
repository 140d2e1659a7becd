"""The grant store on real gdbm files: snapshots, atomic replacement, locks held by others, damage."""

import _gdbm
import os
import pwd
import threading
import time

import pytest
from support.poplock import grant_keys

from poplock.errors import StoreBusyError, StoreCorruptError
from poplock.grants import Grant
from poplock.store import lookup_grant, open_snapshot, read_snapshot
from poplock.storewriter import StoreWriter

NOW = int(time.time())


def grant(address: str, minutes: int = 30) -> Grant:
    return Grant(address, NOW + minutes * 60, NOW, "dovecot")


def test_a_committed_grant_can_be_looked_up(tmp_path):
    path = str(tmp_path / "grants.db")
    with StoreWriter(path).transaction() as transaction:
        transaction.grants["192.0.2.7"] = grant("192.0.2.7")
    assert lookup_grant(path, "192.0.2.7", 0.02) == grant("192.0.2.7")
    assert lookup_grant(path, "192.0.2.8", 0.02) is None


def test_without_a_store_there_are_no_grants(tmp_path):
    path = str(tmp_path / "grants.db")
    assert lookup_grant(path, "192.0.2.7", 0.02) is None
    assert read_snapshot(path, 0.02).grants == {}


def test_a_reader_keeps_the_snapshot_it_opened_while_a_writer_replaces_it(tmp_path):
    path = str(tmp_path / "grants.db")
    writer = StoreWriter(path)
    with writer.transaction() as transaction:
        transaction.grants["192.0.2.1"] = grant("192.0.2.1")
    before = open_snapshot(path, 0.02)
    with writer.transaction() as transaction:
        transaction.grants.clear()
        transaction.grants["192.0.2.2"] = grant("192.0.2.2")
    assert grant_keys(before) == [b"192.0.2.1"]
    before.close()
    assert read_snapshot(path, 0.02).grants == {"192.0.2.2": grant("192.0.2.2")}


def test_a_transaction_that_fails_publishes_nothing(tmp_path):
    path = str(tmp_path / "grants.db")
    writer = StoreWriter(path)
    with writer.transaction() as transaction:
        transaction.grants["192.0.2.1"] = grant("192.0.2.1")
    with pytest.raises(RuntimeError):
        with writer.transaction() as transaction:
            transaction.grants.clear()
            raise RuntimeError("the caller failed half way")
    assert list(read_snapshot(path, 0.02).grants) == ["192.0.2.1"]
    with writer.transaction() as transaction:  # and the writer itself starts from the published state
        assert list(transaction.grants) == ["192.0.2.1"]


def test_a_published_snapshot_is_never_opened_for_writing_so_readers_never_meet_its_lock(tmp_path):
    path = str(tmp_path / "grants.db")
    writer = StoreWriter(path)
    with writer.transaction() as transaction:
        transaction.grants["192.0.2.1"] = grant("192.0.2.1")
    inode_before = os.stat(path).st_ino
    with writer.transaction() as transaction:
        transaction.grants["192.0.2.2"] = grant("192.0.2.2")
        reader = open_snapshot(path, 0)  # no retries allowed: any lock would fail this
        assert grant_keys(reader) == [b"192.0.2.1"]
        reader.close()
    reader = open_snapshot(path, 0)  # and just after the commit
    assert sorted(grant_keys(reader)) == [b"192.0.2.1", b"192.0.2.2"]
    reader.close()
    assert os.stat(path).st_ino != inode_before


def test_a_program_writing_the_store_in_place_makes_readers_fail_closed_after_their_bound(tmp_path):
    path = str(tmp_path / "grants.db")
    with StoreWriter(path).transaction() as transaction:
        transaction.grants["192.0.2.1"] = grant("192.0.2.1")
    in_place = _gdbm.open(path, "w")  # what gdbmtool or a script would do
    try:
        started = time.monotonic()
        with pytest.raises(StoreBusyError, match="stayed locked by another program for more than 50ms"):
            lookup_grant(path, "192.0.2.1", 0.05)
        assert time.monotonic() - started >= 0.05
    finally:
        in_place.close()


def test_a_reader_retries_until_an_in_place_writer_lets_go(tmp_path):
    path = str(tmp_path / "grants.db")
    with StoreWriter(path).transaction() as transaction:
        transaction.grants["192.0.2.1"] = grant("192.0.2.1")
    in_place = _gdbm.open(path, "w")
    releaser = threading.Timer(0.05, in_place.close)
    releaser.start()
    try:
        assert lookup_grant(path, "192.0.2.1", 5.0) == grant("192.0.2.1")
    finally:
        releaser.join()


def test_a_file_that_is_not_a_gdbm_store_stops_a_writer_until_it_is_replaced_whole(tmp_path):
    path = tmp_path / "grants.db"
    path.write_bytes(b"this is not a gdbm file" * 100)
    with pytest.raises(StoreCorruptError, match="not a readable gdbm file"):
        lookup_grant(str(path), "192.0.2.1", 0.02)
    with pytest.raises(StoreCorruptError), StoreWriter(str(path)).transaction():
        pass  # a writer never builds on a store it cannot read whole
    with StoreWriter(str(path)).transaction(replace=True, keep_damaged=True) as transaction:  # a rebuild
        assert transaction.grants == {}
        transaction.grants["192.0.2.1"] = grant("192.0.2.1")
    assert lookup_grant(str(path), "192.0.2.1", 0.02) == grant("192.0.2.1")
    aside = list(tmp_path.glob("grants.db.damaged-*"))
    assert len(aside) == 1 and aside[0].read_bytes().startswith(b"this is not a gdbm file")


def _store_of(path, count: int) -> None:
    with StoreWriter(str(path)).transaction() as transaction:
        for index in range(count):
            address = f"10.0.{index >> 8}.{index & 255}"
            transaction.grants[address] = grant(address)
        transaction.metadata["cursor:/var/lib/poplock/cursor"] = "s=1;i=2"


def test_a_truncated_store_is_damaged_wherever_it_was_cut_never_fewer_grants(tmp_path):
    # gdbm's firstkey/nextkey end early without an error on a damaged file: a whole-store
    # read once showed no grants while relaylock still honoured them.
    whole = tmp_path / "whole.db"
    _store_of(whole, 1000)
    size = whole.stat().st_size
    cut = tmp_path / "grants.db"
    for offset in range(4096, size, 2048):
        cut.write_bytes(whole.read_bytes()[:offset])
        try:
            snapshot = read_snapshot(str(cut), 0.02)
        except StoreCorruptError as error:
            assert str(cut) in str(error)
            continue
        assert len(snapshot.grants) == 1000, offset  # read whole, or not at all


def test_random_damage_is_found_or_leaves_every_grant_readable(tmp_path):
    import random

    whole = tmp_path / "whole.db"
    _store_of(whole, 300)
    data = whole.read_bytes()
    damaged = tmp_path / "grants.db"
    generator = random.Random(8)
    found = 0
    for _ in range(200):
        blob = bytearray(data)
        start = generator.randrange(len(blob))
        blob[start:start + generator.randrange(1, 64)] = generator.randbytes(64)[:generator.randrange(1, 64)]
        damaged.write_bytes(bytes(blob[:len(data)]))
        try:
            snapshot = read_snapshot(str(damaged), 0.02)
        except StoreCorruptError:
            found += 1
            continue
        assert len(snapshot.grants) + len(snapshot.undecodable) >= 300  # nothing silently missing
    assert found  # the damage check is exercised, not only gdbm's header check


def test_a_store_written_before_entries_were_counted_is_checked_by_gdbm(tmp_path):
    whole = tmp_path / "whole.db"
    snapshot = _gdbm.open(str(whole), "n")
    for index in range(1000):
        snapshot[f"10.0.{index >> 8}.{index & 255}".encode()] = b"1 %d %d dovecot" % (NOW + 60, NOW)
    snapshot.close()
    cut = tmp_path / "grants.db"
    cut.write_bytes(whole.read_bytes()[:len(whole.read_bytes()) - 8192])
    with pytest.raises(StoreCorruptError, match="damaged"):
        read_snapshot(str(cut), 0.02)


def test_a_writer_whose_published_file_was_damaged_behind_its_back_will_not_build_on_it(tmp_path):
    path = tmp_path / "grants.db"
    _store_of(path, 1000)
    writer = StoreWriter(str(path))
    with writer.transaction() as transaction:
        transaction.grants["192.0.2.1"] = grant("192.0.2.1")
    os.truncate(path, 16384)
    with pytest.raises(StoreCorruptError), writer.transaction() as transaction:
        transaction.grants["192.0.2.2"] = grant("192.0.2.2")


def test_values_this_version_cannot_read_are_kept_across_writes(tmp_path):
    path = str(tmp_path / "grants.db")
    seed = _gdbm.open(path, "n")
    seed[b"192.0.2.9"] = b"2 some future format"
    seed.close()
    writer = StoreWriter(path)
    with writer.transaction() as transaction:
        assert "192.0.2.9" not in transaction.grants
        transaction.grants["192.0.2.1"] = grant("192.0.2.1")
    with writer.transaction() as transaction:
        transaction.grants.clear()  # every grant changed: a snapshot written afresh
    check = _gdbm.open(path, "r")
    assert check[b"192.0.2.9"] == b"2 some future format"
    assert grant_keys(check) == [b"192.0.2.9"]
    check.close()


@pytest.mark.parametrize("other_logins", [0, 1000])
def test_a_new_grant_replaces_a_value_this_version_cannot_read(tmp_path, other_logins):
    """Whether the snapshot is a copy with changes or (after many changes) written afresh, the new login wins."""
    path = str(tmp_path / "grants.db")
    seed = _gdbm.open(path, "n")
    seed[b"192.0.2.9"] = b"2 some future format"
    seed.close()
    with StoreWriter(path).transaction() as transaction:
        transaction.grants["192.0.2.9"] = grant("192.0.2.9")
        for index in range(other_logins):
            address = f"10.0.{index >> 8}.{index & 255}"
            transaction.grants[address] = grant(address)
    assert lookup_grant(path, "192.0.2.9", 0.02) == grant("192.0.2.9")


def test_a_long_lived_writer_sees_what_other_writers_published_in_between(tmp_path):
    """poplock-reader keeps one writer; `poplock remove` and `poplock add` publish between its commits."""
    path = str(tmp_path / "grants.db")
    daemon = StoreWriter(path)
    with daemon.transaction() as transaction:
        transaction.grants["192.0.2.1"] = grant("192.0.2.1")
        transaction.grants["192.0.2.2"] = grant("192.0.2.2")
    for _ in range(2):  # twice: the second time the daemon's own snapshot is the current one again
        with StoreWriter(path).transaction() as transaction:
            del transaction.grants["192.0.2.1"]
            transaction.grants["192.0.2.3"] = grant("192.0.2.3")
        with daemon.transaction() as transaction:
            assert sorted(transaction.grants) == ["192.0.2.2", "192.0.2.3"]
            transaction.grants["192.0.2.1"] = grant("192.0.2.1", minutes=5)
        assert read_snapshot(path, 0.02).grants == {
            "192.0.2.1": grant("192.0.2.1", minutes=5), "192.0.2.2": grant("192.0.2.2"),
            "192.0.2.3": grant("192.0.2.3")}


def test_a_writer_notices_a_program_that_changed_the_store_in_place(tmp_path):
    path = str(tmp_path / "grants.db")
    writer = StoreWriter(path)
    with writer.transaction() as transaction:
        transaction.grants["192.0.2.1"] = grant("192.0.2.1")
        transaction.grants["192.0.2.2"] = grant("192.0.2.2")
    in_place = _gdbm.open(path, "w")  # gdbmtool, a script: generation and all left as they were
    in_place[b"192.0.2.1"] = b"1 %d %d manual" % (NOW + 60, NOW)
    in_place.close()
    with writer.transaction() as transaction:
        assert transaction.grants["192.0.2.1"] == Grant("192.0.2.1", NOW + 60, NOW, "manual")
        transaction.grants["192.0.2.3"] = grant("192.0.2.3")
    assert sorted(read_snapshot(path, 0.02).grants) == ["192.0.2.1", "192.0.2.2", "192.0.2.3"]


def test_a_key_deleted_in_place_is_taken_for_damage_not_for_a_smaller_store(tmp_path):
    path = str(tmp_path / "grants.db")
    with StoreWriter(path).transaction() as transaction:
        transaction.grants["192.0.2.1"] = grant("192.0.2.1")
        transaction.grants["192.0.2.2"] = grant("192.0.2.2")
    in_place = _gdbm.open(path, "w")
    del in_place[b"192.0.2.1"]
    in_place.close()
    with pytest.raises(StoreCorruptError, match=r"damaged: (\d+) of its (?!\1)\d+ entries are readable"):
        read_snapshot(path, 0.02)


def test_a_commit_writes_what_changed_and_the_store_stays_compact(tmp_path):
    path = str(tmp_path / "grants.db")
    writer = StoreWriter(path)
    with writer.transaction() as transaction:
        for index in range(3000):
            address = f"10.0.{index >> 8}.{index & 255}"
            transaction.grants[address] = grant(address)
    full = os.stat(path).st_size
    for index in range(50):  # one login at a time, as poplock-reader commits them
        with writer.transaction() as transaction:
            transaction.grants["10.0.0.1"] = grant("10.0.0.1", minutes=31 + index)
            transaction.metadata["cursor:/x"] = f"s=1;i={index}"
    snapshot = read_snapshot(path, 0.02)
    assert len(snapshot.grants) == 3000 and snapshot.grants["10.0.0.1"] == grant("10.0.0.1", minutes=80)
    assert snapshot.metadata == {"cursor:/x": "s=1;i=49"}
    assert os.stat(path).st_size <= full * 1.1
    with writer.transaction() as transaction:
        transaction.grants.clear()  # `poplock flush`: written afresh, not 3000 holes in a copy
    assert os.stat(path).st_size < full / 4
    assert read_snapshot(path, 0.02).grants == {}


def test_metadata_is_committed_with_the_grants_and_is_not_a_grant(tmp_path):
    path = str(tmp_path / "grants.db")
    with StoreWriter(path).transaction() as transaction:
        transaction.grants["192.0.2.1"] = grant("192.0.2.1")
        transaction.metadata["cursor:/x"] = "s=1;i=2"
    snapshot = read_snapshot(path, 0.02)
    assert snapshot.metadata == {"cursor:/x": "s=1;i=2"}
    assert list(snapshot.grants) == ["192.0.2.1"]


def test_a_snapshot_belongs_to_the_owner_and_group_of_its_directory(tmp_path):
    nobody = pwd.getpwnam("nobody")
    directory = tmp_path / "store"
    directory.mkdir()
    os.chown(directory, nobody.pw_uid, nobody.pw_gid)
    path = str(directory / "grants.db")
    with StoreWriter(path).transaction() as transaction:  # as root, like `sudo poplock add`
        transaction.grants["192.0.2.1"] = grant("192.0.2.1")
    status = os.stat(path)
    assert (status.st_uid, status.st_gid, status.st_mode & 0o777) == (nobody.pw_uid, nobody.pw_gid, 0o640)


def test_a_temporary_file_left_by_a_crashed_writer_is_replaced(tmp_path):
    path = tmp_path / "grants.db"
    (tmp_path / "grants.db.new").write_bytes(b"half written")
    with StoreWriter(str(path)).transaction() as transaction:
        transaction.grants["192.0.2.1"] = grant("192.0.2.1")
    assert lookup_grant(str(path), "192.0.2.1", 0.02) == grant("192.0.2.1")
    assert not (tmp_path / "grants.db.new").exists()


def test_a_second_writer_waits_for_the_first(tmp_path):
    path = str(tmp_path / "grants.db")
    first = StoreWriter(path)
    second = StoreWriter(path, lock_timeout=0.05)
    with first.transaction() as transaction:
        transaction.grants["192.0.2.1"] = grant("192.0.2.1")
        with pytest.raises(Exception, match="another writer held"):
            with second.transaction():
                pass
    with second.transaction() as transaction:
        assert list(transaction.grants) == ["192.0.2.1"]


# --- two levels: a small top over a large immutable base -----------------------------------------

def _addresses(count: int, network: str = "10.20") -> list[str]:
    return [f"{network}.{index >> 8}.{index & 255}" for index in range(count)]


def test_a_commit_that_leaves_a_big_top_merges_it_into_a_base_and_nothing_is_lost(tmp_path):
    path = tmp_path / "grants.db"
    writer = StoreWriter(str(path))
    with writer.transaction() as transaction:
        for address in _addresses(5000):
            transaction.grants[address] = grant(address)
        transaction.metadata["cursor:/c"] = "s=1"
    opened = open_snapshot(str(path), 0.02)
    assert opened.base_name is not None and opened.base_name.startswith("grants.db.base-")
    assert opened.top.keys() and all(key.startswith(b"#") for key in opened.top.keys())  # only bookkeeping
    opened.close()
    base = _gdbm.open(str(tmp_path / opened.base_name), "r")  # stock gdbm reads it
    assert len([key for key in base.keys() if not key.startswith(b"#")]) == 5000
    base.close()
    with writer.transaction() as transaction:
        assert len(transaction.grants) == 5000
        del transaction.grants["10.20.0.1"]  # the base's grant: a tombstone in the top
        transaction.grants["192.0.2.1"] = grant("192.0.2.1")
    assert lookup_grant(str(path), "10.20.0.1", 0.02) is None
    assert lookup_grant(str(path), "10.20.0.2", 0.02) == grant("10.20.0.2")
    assert lookup_grant(str(path), "192.0.2.1", 0.02) == grant("192.0.2.1")
    snapshot = read_snapshot(str(path), 0.02)
    assert len(snapshot.grants) == 5000 and "10.20.0.1" not in snapshot.grants
    assert snapshot.metadata == {"cursor:/c": "s=1"}
    assert os.path.getsize(path) < 64 * 1024  # a one-login commit writes a small top, not the store


def test_a_flush_drops_the_base_and_its_file(tmp_path):
    path = tmp_path / "grants.db"
    with StoreWriter(str(path)).transaction() as transaction:
        for address in _addresses(5000):
            transaction.grants[address] = grant(address)
    with StoreWriter(str(path)).transaction() as transaction:
        transaction.grants.clear()
        transaction.grants["192.0.2.1"] = grant("192.0.2.1")
    assert sorted(read_snapshot(str(path), 0.02).grants) == ["192.0.2.1"]
    assert open_snapshot(str(path), 0.02).base_name is None
    assert len(list(tmp_path.glob("grants.db.base-*"))) == 1  # the one before, kept for a moment, then gone
    with StoreWriter(str(path)).transaction() as transaction:
        for address in _addresses(5000, "10.30"):
            transaction.grants[address] = grant(address)
    assert len(list(tmp_path.glob("grants.db.base-*"))) == 1


def test_a_big_store_of_the_first_format_becomes_the_base_and_loses_no_grant(tmp_path):
    path = tmp_path / "grants.db"
    legacy = _gdbm.open(str(path), "n")  # one file, as every store was before bases
    for address in _addresses(6000):
        legacy[address.encode()] = b"1 %d %d dovecot" % (NOW + 1800, NOW)
    legacy[b"#cursor:/var/lib/poplock/cursor"] = b"s=1;i=2"
    legacy.close()
    inode = path.stat().st_ino
    with StoreWriter(str(path)).transaction() as transaction:
        transaction.grants["192.0.2.1"] = grant("192.0.2.1")
    opened = open_snapshot(str(path), 0.02)
    assert (tmp_path / opened.base_name).stat().st_ino == inode  # linked, not copied
    opened.close()
    snapshot = read_snapshot(str(path), 0.02)
    assert len(snapshot.grants) == 6001
    assert snapshot.metadata == {"cursor:/var/lib/poplock/cursor": "s=1;i=2"}
    assert path.stat().st_size < 64 * 1024


@pytest.mark.parametrize("publish_in_background", [False, True], ids=["installed in the commit", "by the publisher"])
def test_a_merge_in_the_background_keeps_the_commits_made_meanwhile(tmp_path, publish_in_background):
    path = tmp_path / "grants.db"
    writer = StoreWriter(str(path), background_merges=True, publish_in_background=publish_in_background)
    with writer.transaction() as transaction:
        for address in _addresses(5000):
            transaction.grants[address] = grant(address)  # below MERGE_NOW_AFTER: stays in the top
    assert writer.merge_due()
    done = writer.merge_in_background()
    with writer.transaction() as transaction:  # while the child writes the base
        transaction.grants["192.0.2.1"] = grant("192.0.2.1")
        transaction.grants["10.20.0.5"] = grant("10.20.0.5", minutes=60)
        del transaction.grants["10.20.0.6"]
    os.read(done, 1)  # end of file: the child is done
    writer.finish_merge()
    assert not writer.merge_due()
    if publish_in_background:  # the new top is queued after the commits made meanwhile
        writer.publisher.close()
    opened = open_snapshot(str(path), 0.02)
    assert opened.base_name is not None
    top_grants = [key for key in opened.top.keys() if not key.startswith(b"#")]
    assert sorted(top_grants) == [b"10.20.0.5", b"10.20.0.6", b"192.0.2.1"]  # only what changed meanwhile
    opened.close()
    snapshot = read_snapshot(str(path), 0.02)
    assert len(snapshot.grants) == 5000 and "10.20.0.6" not in snapshot.grants
    assert snapshot.grants["10.20.0.5"] == grant("10.20.0.5", minutes=60)
    assert [name for name in os.listdir(tmp_path) if name.endswith(".new")] == []


def test_a_merge_that_another_writer_overtook_is_dropped(tmp_path):
    path = tmp_path / "grants.db"
    writer = StoreWriter(str(path), background_merges=True)
    with writer.transaction() as transaction:
        for address in _addresses(5000):
            transaction.grants[address] = grant(address)
    done = writer.merge_in_background()
    with StoreWriter(str(path)).transaction() as transaction:  # `poplock flush` meanwhile
        transaction.grants.clear()
    os.read(done, 1)
    writer.finish_merge()
    assert read_snapshot(str(path), 0.02).grants == {}
    assert list(tmp_path.glob("grants.db.base-*")) == []


def test_the_user_index_is_kept_in_the_top_and_the_base_and_is_no_grant(tmp_path):
    path = tmp_path / "grants.db"
    writer = StoreWriter(str(path))
    with writer.transaction() as transaction:
        for address in _addresses(5000):
            transaction.grants[address] = grant(address)
        transaction.users.set("alice", ["10.20.0.1", "10.20.0.2"])  # merged into the base with them
    with writer.transaction() as transaction:
        assert transaction.users.addresses("alice") == ["10.20.0.1", "10.20.0.2"]
        assert len(transaction.grants) == 5000
        transaction.users.set("alice", ["10.20.0.2"])
        transaction.users.set("bob", ["10.20.0.3"])
    with StoreWriter(str(path)).transaction() as transaction:  # read back by another writer
        assert transaction.users.addresses("alice") == ["10.20.0.2"]
        assert transaction.users.addresses("bob") == ["10.20.0.3"]
        transaction.users.set("alice", [])
    snapshot = read_snapshot(str(path), 0.02)
    assert len(snapshot.grants) == 5000 and not any(address.startswith("~") for address in snapshot.grants)
    with StoreWriter(str(path)).transaction() as transaction:
        assert transaction.users.addresses("alice") == []


def test_a_damaged_base_is_found_by_the_next_merge_and_by_a_whole_read_never_merged_away(tmp_path):
    path = tmp_path / "grants.db"
    writer = StoreWriter(str(path))
    with writer.transaction() as transaction:
        for address in _addresses(5000):
            transaction.grants[address] = grant(address)
    base = next(tmp_path.glob("grants.db.base-*"))
    os.truncate(base, base.stat().st_size // 2)
    with pytest.raises(StoreCorruptError, match="damaged"):
        read_snapshot(str(path), 0.02)
    with pytest.raises(StoreCorruptError, match="base .* is damaged"), writer.transaction() as transaction:
        for address in _addresses(5000, "10.40"):  # enough to merge
            transaction.grants[address] = grant(address)
    with pytest.raises(StoreCorruptError), writer.transaction() as transaction:
        list(transaction.grants.items())  # what expire and remove --user do: read the base whole


def test_salvage_never_brings_back_a_grant_the_top_withdrew(tmp_path):
    from poplock.store import salvage_snapshot

    path = tmp_path / "grants.db"
    with StoreWriter(str(path)).transaction() as transaction:
        for address in _addresses(5000):
            transaction.grants[address] = grant(address)
    with StoreWriter(str(path)).transaction() as transaction:
        del transaction.grants["10.20.0.1"]
        transaction.grants["10.20.0.2"] = grant("10.20.0.2", minutes=90)
    salvaged = salvage_snapshot(str(path)).grants
    assert "10.20.0.1" not in salvaged and salvaged["10.20.0.2"] == grant("10.20.0.2", minutes=90)


def test_a_base_is_readable_by_the_other_users_of_the_store_whatever_the_umask(tmp_path):
    path = tmp_path / "grants.db"
    old = os.umask(0o077)
    try:
        with StoreWriter(str(path)).transaction() as transaction:
            for address in _addresses(5000):
                transaction.grants[address] = grant(address)
    finally:
        os.umask(old)
    base = next(tmp_path.glob("grants.db.base-*"))
    assert base.stat().st_mode & 0o777 == 0o640


def test_the_grants_not_live_are_found_in_the_base_and_the_top_alike(tmp_path):
    """`poplock expire`'s scan decodes only the base's grants that are not live: it must find what
    decoding every grant finds."""
    path = tmp_path / "grants.db"
    writer = StoreWriter(str(path))
    now = time.time()
    with writer.transaction() as transaction:  # big enough to be merged into a base
        for index, address in enumerate(_addresses(5000)):
            login_at = int(now) - (3600 if index % 7 == 0 else 60)
            transaction.grants[address] = Grant(address, login_at + 1800, login_at, "dovecot", f"u{index}")
        transaction.grants["10.20.0.3"] = Grant("10.20.0.3", int(now) + 7200, int(now) + 3600, "dovecot")  # future
    with writer.transaction() as transaction:  # the top: a live grant over an expired base one, and the reverse
        transaction.grants["10.20.0.0"] = grant("10.20.0.0")
        transaction.grants["10.20.0.1"] = Grant("10.20.0.1", int(now) - 1, int(now) - 1801, "dovecot")
        transaction.grants["192.0.2.1"] = Grant("192.0.2.1", int(now) - 5, int(now) - 1805, "dovecot")
        del transaction.grants["10.20.0.14"]
    with writer.transaction() as transaction:
        found = sorted(grant.address for grant in transaction.grants.not_live(now))
        every = sorted(address for address, grant in transaction.grants.items() if not grant.is_live(now))
    assert found == every
    assert "10.20.0.3" in found and "10.20.0.1" in found and "192.0.2.1" in found
    assert "10.20.0.0" not in found and "10.20.0.14" not in found and "10.20.0.7" in found
    assert len(found) == len([index for index in range(5000) if index % 7 == 0]) - 2 + 3
