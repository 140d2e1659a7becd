"""The poplock command on a real store: show, add, remove, flush, expire, check, config."""

import json
import os
import subprocess
import time

import pytest

from poplock.grants import Grant
from poplock.storewriter import StoreWriter


def records(result) -> list[dict]:
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_a_grant_added_by_hand_lets_the_client_relay_until_it_is_removed(setup):
    added = setup.run("add", "192.0.2.7", "--for", "2h", check=True)
    assert added.stdout.startswith("192.0.2.7 may relay until ")
    check = setup.run("check", "192.0.2.7")
    assert check.returncode == 0 and "may relay: grant until" in check.stdout and "(by hand at" in check.stdout
    assert setup.run("remove", "192.0.2.7", check=True).stdout == "removed the grant for 192.0.2.7\n"
    after = setup.run("check", "192.0.2.7")
    assert after.returncode == 1
    assert after.stdout == "192.0.2.7 may not relay: no grant, and not in the static allow list\n"


def test_removing_a_grant_that_is_not_there_says_so(setup):
    result = setup.run("remove", "192.0.2.9")
    assert result.returncode == 1 and result.stderr == "192.0.2.9: no grant to remove\n"


def test_an_ipv4_mapped_address_is_the_same_client_everywhere(setup):
    setup.run("add", "::ffff:192.0.2.7", check=True)
    assert setup.run("check", "192.0.2.7").returncode == 0
    assert setup.run("check", "::FFFF:192.0.2.7").returncode == 0
    assert [r["address"] for r in records(setup.run("show", "--json"))] == ["192.0.2.7"]


def test_an_expired_grant_allows_nothing_even_before_it_is_purged(setup):
    now = int(time.time())
    with StoreWriter(str(setup.store)).transaction() as transaction:
        transaction.grants["192.0.2.20"] = Grant("192.0.2.20", now - 5, now - 1805, "dovecot")
        transaction.grants["192.0.2.21"] = Grant("192.0.2.21", now + 600, now - 1200, "dovecot")
    check = setup.run("check", "192.0.2.20")
    assert check.returncode == 1 and "its grant expired at" in check.stdout
    assert [r["address"] for r in records(setup.run("show", "--json"))] == ["192.0.2.21"]
    assert {r["address"]: r["live"] for r in records(setup.run("show", "--json", "--all"))} == {
        "192.0.2.20": False, "192.0.2.21": True}
    expire = setup.run("expire", check=True)
    assert expire.stdout == "purged 1 expired grant; 1 remains\n"  # singular and plural as they fall
    assert setup.run("expire", check=True).stdout == "purged 0 expired grants; 1 remains\n"
    assert [r["address"] for r in records(setup.run("show", "--json", "--all"))] == ["192.0.2.21"]


def test_flush_withdraws_every_grant(setup):
    for address in ("192.0.2.30", "192.0.2.31", "2001:db8::31"):
        setup.run("add", address, check=True)
    assert setup.run("flush", check=True).stdout == "removed 3 grants\n"
    assert records(setup.run("show", "--json")) == []


def test_static_entries_allow_relaying_and_are_shown_as_such(setup):
    setup.static.write_text("# office\n192.168.0.0/255.255.255.0\n2001:db8:1::/48\n")
    check = setup.run("check", "192.168.0.77")
    assert check.returncode == 0
    # Written in prefix form, as `show` writes it, however the file spells it.
    assert check.stdout == f"192.168.0.77 may relay: static network 192.168.0.0/24 ({setup.static})\n"
    assert setup.run("check", "2001:db8:1::5").returncode == 0
    assert setup.run("check", "192.168.1.1").returncode == 1
    shown = records(setup.run("show", "--json"))
    assert shown == [{"kind": "static", "address": "192.168.0.0/24", "file": str(setup.static)},
                     {"kind": "static", "address": "2001:db8:1::/48", "file": str(setup.static)}]
    text = setup.run("show").stdout
    assert "192.168.0.0/24" in text and "never (static)" in text


def test_a_bad_static_line_is_a_configuration_error_naming_file_and_line(setup):
    setup.static.write_text("192.168.0.0/24\n192.168.0.0/24/8\n")
    result = setup.run("check", "192.0.2.1")
    assert result.returncode == 78
    assert f"{setup.static}:2: " in result.stderr


def test_a_configuration_error_exits_78_with_every_problem(setup):
    setup.config.write_text("[Grants]\nWindow=forever\n[Store]\nPath=grants.db\n")
    result = setup.run("show")
    assert result.returncode == 78
    assert result.stderr.splitlines() == [
        "poplock: error: invalid configuration:",
        f"  {setup.config}:2: [Grants] Window=forever: expected a time span such as 30min or 1h 30min, not 'forever'",
        f"  {setup.config}:4: [Store] Path=grants.db: must be an absolute path",
    ]


def test_a_malformed_address_is_a_usage_error(setup):
    result = setup.run("check", "not-an-address")
    assert result.returncode == 64
    assert "not an IP address: 'not-an-address'" in result.stderr


def test_a_store_that_is_not_a_gdbm_file_is_an_io_error_for_reading_commands(setup):
    setup.store.write_bytes(b"garbage" * 100)
    result = setup.run("check", "192.0.2.1")
    assert result.returncode == 74
    assert result.stderr.startswith(f"poplock: error: the grant store {setup.store} is not a readable gdbm file")


def test_config_prints_the_settings_in_effect(setup):
    result = setup.run("config", check=True)
    assert "[Grants]\nWindow=30min\n" in result.stdout
    assert f"Path={setup.store}" in result.stdout
    assert "[Source:dovecot]\nIdentifiers=dovecot\nUnits=dovecot.service\nUsers=0\n" in result.stdout


def test_administrative_changes_reach_the_journal_with_their_message_ids(setup, journald):
    import random

    from support.journald import wait_for_entries

    address = f"198.18.{random.randrange(256)}.{random.randrange(1, 255)}"  # unique in the shared journal
    setup.run("add", address, check=True)
    setup.run("remove", address, check=True)
    added = wait_for_entries({"MESSAGE_ID": "5df0f3db55ae4c64a84d7d653d22380e", "POPLOCK_CLIENT_ADDRESS": address}, 1)
    removed = wait_for_entries({"MESSAGE_ID": "ecbec00bdae1438badd8459f38822a82", "POPLOCK_CLIENT_ADDRESS": address}, 1)
    assert added[-1]["SYSLOG_IDENTIFIER"] == "poplock" and added[-1]["POPLOCK_EXPIRES"]
    assert removed[-1]["MESSAGE"] == f"removed the grant for {address}"


def test_a_writer_that_cannot_get_the_lock_is_a_busy_store(setup):
    import fcntl

    from poplock.errors import StoreBusyError

    setup.run("add", "192.0.2.60", check=True)
    with open(f"{setup.store}.lock") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another writer in the middle of a transaction
        with pytest.raises(StoreBusyError, match="another writer held"):
            with StoreWriter(str(setup.store), lock_timeout=0.1).transaction():
                pass


def test_scan_takes_a_relative_since_written_the_natural_way(setup, tmp_path):
    result = setup.run("scan", "--file", str(tmp_path / "none.journal"), "--since", "-1h")
    assert result.returncode == 66
    assert "cannot open the journal" in result.stderr


def test_an_option_after_since_is_not_taken_for_its_value(setup):
    result = setup.run("scan", "--since", "--json")
    assert result.returncode == 64 and "--since: expected one argument" in result.stderr


def test_config_prints_booleans_in_systemd_words(setup):
    assert "\nLogRefused=no\n" in setup.run("config", check=True).stdout


# --- failures that must make noise (issue 14) -------------------------------------------------------

def test_a_store_whose_directory_does_not_exist_is_an_error_for_show_and_check(setup, tmp_path):
    setup.static.write_text("10.0.0.0/8\n")
    setup.config.write_text(setup.config.read_text().replace(f"Path={setup.store}", f"Path={tmp_path}/typo/grants.db"))
    for command in (["show"], ["check", "10.0.0.1"]):
        result = setup.run(*command)
        assert result.returncode == 74, result
        assert result.stdout == ""
        assert result.stderr.splitlines()[0] == (
            f"poplock: error: there is no grant store {tmp_path}/typo/grants.db: the directory {tmp_path}/typo "
            "does not exist")
        assert "Check [Store] Path=" in result.stderr


def test_a_store_not_made_yet_in_its_directory_is_a_warning_and_no_grants(setup):
    setup.static.write_text("10.0.0.0/8\n")
    result = setup.run("show")
    assert result.returncode == 0
    assert "10.0.0.0/8" in result.stdout
    assert result.stderr == (f"poplock: warning: there is no grant store {setup.store} yet: poplock-reader makes it "
                             "when it starts (systemctl status poplock-reader.service)\n")


def test_a_damaged_store_is_rebuilt_for_add_which_still_exits_with_the_store_error(setup):
    setup.store.write_bytes(b"garbage" * 100)
    result = setup.run("add", "192.0.2.40")
    assert result.returncode == 74, result
    assert result.stdout.startswith("192.0.2.40 may relay until ")
    assert f"poplock: warning: the grant store {setup.store} is not a readable gdbm file" in result.stderr
    assert setup.run("check", "192.0.2.40").returncode == 0  # the change was made all the same
    assert setup.run("add", "192.0.2.41").returncode == 0  # and the next one finds nothing wrong


def test_scan_of_a_directory_that_does_not_exist_names_it(setup, tmp_path):
    result = setup.run("scan", "-D", str(tmp_path / "nonexistent"))
    assert result.returncode == 66
    assert result.stderr == f"poplock: error: cannot open the journal: {tmp_path}/nonexistent: no such directory\n"
    (tmp_path / "empty").mkdir()
    result = setup.run("scan", "-D", str(tmp_path / "empty"))
    assert result.returncode == 66
    assert result.stderr == (f"poplock: error: cannot open the journal: no journal file in {tmp_path}/empty could "
                             "be opened\n")


@pytest.fixture
def shared_setup():
    """A Setup in a directory of its own under /tmp, which other users can reach: pytest's own
    directories are private to root, and each run of pytest makes them private again."""
    import shutil
    import tempfile
    from pathlib import Path

    from support.poplock import Setup

    directory = Path(tempfile.mkdtemp(prefix="poplock-test-"))
    directory.chmod(0o711)
    try:
        yield Setup(directory)
    finally:
        shutil.rmtree(directory)


def as_user(setup, user: str, *arguments: str) -> subprocess.CompletedProcess:
    """`poplock -c CONFIG ARGUMENTS...` as `user` with its groups (nobody: none at all)."""
    from support.poplock import command_for_everyone

    identity = ["--reuid=nobody", "--regid=nogroup", "--clear-groups"] if user == "nobody" else [
        f"--reuid={user}", f"--regid={user}", "--init-groups"]
    return subprocess.run(["setpriv", *identity, command_for_everyone("poplock"), "-c", str(setup.config),
                           *arguments], capture_output=True, text=True, timeout=60)


def test_scan_without_permission_to_read_the_journal_says_so_and_fails(shared_setup, journald):
    result = as_user(shared_setup, "nobody", "scan", "--since", "-1h")
    assert result.returncode == 66, result
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "poplock: error: cannot open the journal: no journal files were opened due to insufficient permissions",
        "Reading the system journal takes root or the systemd-journal group: run it with sudo, or add yourself to "
        "the group (adduser NAME systemd-journal) and log in again."]


def test_a_user_who_may_not_read_the_store_is_told_what_to_do(shared_setup):
    setup = shared_setup
    setup.run("add", "192.0.2.50", check=True)
    setup.directory.chmod(0o751)  # others may pass through to the configuration, not list or read the store
    os.chown(setup.store, 0, 0)
    setup.store.chmod(0o640)
    result = as_user(setup, "nobody", "show")
    assert result.returncode == 74, result
    assert result.stderr.splitlines()[-1].startswith("Reading the grants takes root, the user root or the group root")
    result = as_user(setup, "nobody", "add", "192.0.2.51")
    assert result.returncode == 74, result
    assert result.stderr.splitlines()[-1].startswith(
        "Changing the grants takes root or the user root: run it with sudo")


@pytest.fixture
def member():
    """A throwaway user (its own primary group) and a group it is a member of: (user, group)."""
    user, group = f"pl-m{os.getpid() % 100000}", f"pl-g{os.getpid() % 100000}"
    subprocess.run(["groupadd", "--system", group], check=True, capture_output=True)
    try:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "--user-group",
                        "--groups", group, user], check=True, capture_output=True)
        try:
            yield user, group
        finally:
            subprocess.run(["userdel", user], capture_output=True)
    finally:
        subprocess.run(["groupdel", group], capture_output=True)


def test_members_of_a_group_writable_store_directory_may_change_grants(shared_setup, member):
    import grp
    import pwd

    from poplock.storewriter import store_writers

    setup = shared_setup
    user, group = member
    gid = grp.getgrnam(group).gr_gid
    setup.run("add", "192.0.2.60", check=True)  # root first: the lock file exists, made 0600 before
    os.chown(setup.directory, 0, gid)
    setup.directory.chmod(0o770)
    setup.run("add", "192.0.2.61", check=True)  # a writer makes the lock follow the directory's mode
    assert os.stat(f"{setup.store}.lock").st_mode & 0o777 == 0o660

    def as_member(*arguments):
        return as_user(setup, user, *arguments)

    added = as_member("add", "192.0.2.62")
    assert added.returncode == 0, added
    assert as_member("remove", "192.0.2.60").returncode == 0
    assert sorted(r["address"] for r in records(setup.run("show", "--json"))) == ["192.0.2.61", "192.0.2.62"]
    # What the member wrote stays readable by the directory's group, not the member's own group.
    assert {os.stat(path).st_gid for path in setup.directory.glob("grants.db*")} == {gid}
    # ... and poplock-reader replays the member's changes from the journal, as it does root's.
    member_uid = pwd.getpwnam(user).pw_uid
    assert member_uid in store_writers(str(setup.store))

    setup.directory.chmod(0o750)  # the group may read only: the lock is the owner's again
    assert member_uid not in store_writers(str(setup.store))
    setup.run("add", "192.0.2.63", check=True)
    assert os.stat(f"{setup.store}.lock").st_mode & 0o777 == 0o600
    refused = as_member("add", "192.0.2.64")
    assert refused.returncode == 74
    assert refused.stderr.splitlines()[-1] == (
        f"Changing the grants takes root or the user root: run it with sudo (the group {group} may only read them "
        f"while {setup.directory} is not group-writable; see poplock(8), FILES).")
