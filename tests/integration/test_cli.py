"""The poplock command on a real store: show, add, remove, flush, expire, check, config."""

import json
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
    assert expire.stdout == "purged 1 expired grants; 1 remain\n"
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
    assert check.stdout == f"192.168.0.77 may relay: static network 192.168.0.0/255.255.255.0 ({setup.static})\n"
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
