"""A lost or damaged store is rebuilt from the journal, not emptied: logins granted, manual grants
kept, removals still removed. On a real journald, with the real reader and CLI.

Each test's source reads only its own SYSLOG_IDENTIFIER, and the administrative changes the
CLI journals name the test's own store (POPLOCK_STORE), so tests never see each other's.
"""

import json
import os
import subprocess
import time

import pytest
from support.journald import unique_tag, wait_for_entries
from support.poplock import ReaderProcess, Setup, command_for_everyone
from systemd import journal

from poplock import events

DAMAGED_SIZE = 12288  # a small store cut here is one gdbm cannot read whole ("Database needs recovery")


def login_line(address: str) -> str:
    # No session=<...>: a login alone, whose grant lasts the window (sessions: test_sessions_journal_files.py).
    return f"pop3-login: Login: user=<alice>, method=PLAIN, rip={address}, lip=127.0.0.1, mpid=4242"


@pytest.fixture
def tagged(journald, tmp_path):
    tag = unique_tag()
    setup = Setup(tmp_path, extra=f"Sources=dovecot\n\n[Source:dovecot]\nIdentifiers={tag}\n")
    setup.tag = tag
    return setup


def log_as_root(setup, address: str) -> None:
    journal.send(login_line(address), SYSLOG_IDENTIFIER=setup.tag)


def grants(setup) -> dict:
    shown = setup.run("show", "--json", check=True).stdout.splitlines()
    return {record["address"]: (record["expires"], record["source"])
            for record in map(json.loads, shown) if record["kind"] == "grant"}


def damage(setup) -> None:
    assert setup.store.stat().st_size > DAMAGED_SIZE
    os.truncate(setup.store, DAMAGED_SIZE)


def history(setup) -> dict:
    """Three logins, then a grant by hand and a removal: the state a rebuild must come back to."""
    for address in ("192.0.2.1", "192.0.2.2", "192.0.2.3"):
        log_as_root(setup, address)
    setup.run_reader(check=True)
    setup.run("add", "198.51.100.9", "--for", "2h", check=True)
    setup.run("remove", "192.0.2.1", check=True)
    for event in (events.GRANT_ADDED, events.GRANT_REMOVED):  # journald has them before the rebuild reads
        wait_for_entries({"MESSAGE_ID": event.message_id, "POPLOCK_STORE": str(setup.store)}, 1)
    state = grants(setup)
    assert sorted(state) == ["192.0.2.2", "192.0.2.3", "198.51.100.9"]
    return state


def test_a_damaged_store_never_hides_grants_from_show_remove_or_flush(tagged):
    # The reproduction: gdbm's whole-store reads stopped early on a cut file, so `show` said
    # "no grants", `remove` "no grant to remove" and `flush` "removed 0 grants", while
    # relaylock still let the client relay.
    tagged.run("add", "10.0.0.1", check=True)
    damage(tagged)
    shown = tagged.run("show")
    assert (shown.returncode, shown.stdout) == (74, "")
    assert f"poplock: error: the grant store {tagged.store} is damaged" in shown.stderr
    assert "`poplock rebuild` does it now" in shown.stderr and "Traceback" not in shown.stderr

    added = tagged.run("add", "192.0.2.1")  # a change rebuilds the store from the journal first
    assert added.returncode == 74, added.stderr  # made, and the status still says the store was damaged
    assert "rebuilding it from the journal" in added.stderr
    assert sorted(grants(tagged)) == ["10.0.0.1", "192.0.2.1"]
    assert tagged.run("remove", "192.0.2.1", check=True).stdout == "removed the grant for 192.0.2.1\n"
    relaylock = subprocess.run([command_for_everyone("relaylock"), "-c", str(tagged.config), "--", "sh", "-c",
                                "echo ${RELAYCLIENT-unset}"], env={"TCPREMOTEIP": "192.0.2.1", "PATH": "/usr/bin:/bin"},
                               capture_output=True, text=True, timeout=30)
    assert relaylock.stdout == "unset\n"
    damage(tagged)
    flushed = tagged.run("flush")
    assert (flushed.returncode, flushed.stdout) == (74, "removed 1 grant\n"), flushed.stderr
    assert not tagged.may_relay("10.0.0.1")


def test_a_store_damaged_under_a_running_reader_is_rebuilt_at_its_next_commit(tagged):
    state = history(tagged)
    with ReaderProcess(tagged) as reader:
        damage(tagged)
        log_as_root(tagged, "192.0.2.4")
        tagged.wait_until_allowed("192.0.2.4")
        reader.stop()
    rebuilt = grants(tagged)
    assert {address: rebuilt[address] for address in state} == state
    assert sorted(rebuilt) == ["192.0.2.2", "192.0.2.3", "192.0.2.4", "198.51.100.9"]
    assert "is damaged" in reader.output() and "rebuilding it from the journal" in reader.output()
    assert len(list(tagged.directory.glob("grants.db.damaged-*"))) == 1  # kept for a post-mortem


def test_a_removed_store_comes_back_as_it_was_when_the_reader_starts(tagged):
    state = history(tagged)
    tagged.store.unlink()
    tagged.run_reader(check=True)
    assert grants(tagged) == state


def test_poplock_rebuild_builds_the_same_store_from_the_journal(tagged):
    state = history(tagged)
    result = tagged.run("rebuild", check=True)
    assert result.stdout == f"rebuilt {tagged.store} from the journal: 3 grants\n"
    assert grants(tagged) == state


def test_a_flush_stays_in_force_for_the_logins_before_it(tagged):
    history(tagged)
    tagged.run("flush", check=True)
    log_as_root(tagged, "192.0.2.5")  # after the flush: this one counts
    wait_for_entries({"MESSAGE_ID": events.GRANTS_FLUSHED.message_id, "POPLOCK_STORE": str(tagged.store)}, 1)
    tagged.store.unlink()
    tagged.run_reader(check=True)
    assert sorted(grants(tagged)) == ["192.0.2.5"]


def test_a_reader_that_lags_behind_a_removal_does_not_bring_the_grant_back(tagged):
    log_as_root(tagged, "192.0.2.6")
    tagged.run("add", "192.0.2.7", check=True)
    tagged.run_reader(check=True)  # the reader's cursor is now past both
    log_as_root(tagged, "192.0.2.6")  # a new login the reader has not read yet...
    tagged.run("remove", "192.0.2.6", check=True)  # ...and a removal made after it
    wait_for_entries({"MESSAGE_ID": events.GRANT_REMOVED.message_id, "POPLOCK_STORE": str(tagged.store)}, 1)
    tagged.run_reader(check=True)
    assert sorted(grants(tagged)) == ["192.0.2.7"]


def test_changes_forged_by_a_user_who_cannot_write_the_store_are_not_replayed(tagged):
    history(tagged)
    forged = (
        "from systemd import journal\n"
        f"journal.send('granted 203.0.113.66 by hand', MESSAGE_ID={events.GRANT_ADDED.message_id!r}, "
        f"POPLOCK_STORE={str(tagged.store)!r}, POPLOCK_CLIENT_ADDRESS='203.0.113.66', "
        f"POPLOCK_EXPIRES='2099-01-01T00:00:00+00:00')\n"
        f"journal.send('flushed', MESSAGE_ID={events.GRANTS_FLUSHED.message_id!r}, "
        f"POPLOCK_STORE={str(tagged.store)!r})\n"
    )
    subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "/usr/bin/python3", "-c",
                    forged], check=True, cwd="/")
    wait_for_entries({"MESSAGE_ID": events.GRANTS_FLUSHED.message_id, "POPLOCK_STORE": str(tagged.store)}, 1)
    state = grants(tagged)
    tagged.store.unlink()
    tagged.run_reader(check=True)
    assert grants(tagged) == state
    assert not tagged.may_relay("203.0.113.66")


def test_a_grant_by_hand_older_than_the_window_survives_a_rebuild(tagged):
    tagged.write(window="2s", extra=f"Sources=dovecot\n\n[Source:dovecot]\nIdentifiers={tagged.tag}\n")
    tagged.run("add", "198.51.100.10", "--for", "1h", check=True)
    wait_for_entries({"MESSAGE_ID": events.GRANT_ADDED.message_id, "POPLOCK_STORE": str(tagged.store)}, 1)
    state = grants(tagged)
    time.sleep(3)  # the window (2s) passes: the grant's journal entry is now older than it
    tagged.store.unlink()
    tagged.run_reader(check=True)
    assert grants(tagged) == state


def test_a_rebuild_by_a_user_who_cannot_read_the_journal_is_refused_and_keeps_the_store(tagged):
    from support.processes import reachable_by_everyone

    history(tagged)
    state = grants(tagged)
    reachable_by_everyone(tagged.directory)
    os.chown(tagged.directory, 65534, 65534)  # nobody may write the store, but not read the journal
    for path in tagged.directory.iterdir():
        os.chown(path, 65534, 65534)
    result = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                             command_for_everyone("poplock"), "-c", str(tagged.config), "rebuild"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 66, result
    assert "no journal file could be opened" in result.stderr and "systemd-journal" in result.stderr
    assert grants(tagged) == state
