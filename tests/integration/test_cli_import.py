"""`poplock import`: grants loaded in one transaction from what `show --json` prints or ADDRESS [EXPIRES] lines."""

import json
import subprocess
import time

from support.journald import wait_for_entries
from support.poplock import command

from poplock import events
from poplock.logs import iso_time


def records(result) -> dict:
    return {record["address"]: record for record in map(json.loads, result.stdout.splitlines())
            if record["kind"] == "grant"}


def test_grants_move_between_stores_through_show_json_and_import(setup, tmp_path):
    setup.run("add", "192.0.2.1", "--for", "2h", check=True)
    setup.run("add", "2001:db8::1", check=True)
    setup.static.write_text("192.168.0.0/24\n")
    exported = tmp_path / "grants.jsonl"
    exported.write_text(setup.run("show", "--json", check=True).stdout)
    before = records(setup.run("show", "--json"))
    setup.run("flush", check=True)
    result = setup.run("import", str(exported), check=True)
    assert result.stdout == "imported 2 grants\n"  # the static entry is the allow list's, not a grant
    assert records(setup.run("show", "--json")) == before


def test_plain_lines_take_an_iso_time_a_time_span_or_the_window(setup, tmp_path):
    source = tmp_path / "list"
    source.write_text("# from the old tool\n192.0.2.1\n192.0.2.2 2h\n\n192.0.2.3 2099-01-01T00:00\n"
                      "192.0.2.4 2000-01-01T00:00\n")
    result = setup.run("import", str(source))
    assert result.returncode == 65
    assert result.stderr.splitlines() == [
        f"poplock: error: {source}:5: 192.0.2.3: a grant lasts at most 7d, not until "
        + result.stderr.split("not until ")[1].splitlines()[0],
        "poplock: nothing imported: 1 bad line (--skip-bad imports the others)"]
    assert records(setup.run("show", "--json")) == {}
    result = setup.run("import", "--skip-bad", str(source), check=True)
    assert result.stdout == "imported 2 grants; 1 expired left out; 1 bad line skipped\n"
    assert sorted(records(setup.run("show", "--json"))) == ["192.0.2.1", "192.0.2.2"]
    assert setup.may_relay("192.0.2.2")


def test_bad_lines_are_named_by_line_and_nothing_is_imported(setup):
    lines = '{"kind": "grant", "address": "10.0.0.1"}\nnot-an-address\n10.0.0.2 soon\n{"kind": "other"}\n10.0.0.3\n'
    result = subprocess.run([command("poplock"), "-c", str(setup.config), "import"], input=lines,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 65
    assert result.stderr.splitlines()[:4] == [
        "poplock: error: standard input:1: \"expires\" must be an ISO 8601 time, not None",
        "poplock: error: standard input:2: not an IP address: 'not-an-address'",
        "poplock: error: standard input:3: expected an ISO 8601 time or a time span such as 2h, not 'soon'",
        "poplock: error: standard input:4: expected \"kind\": \"grant\" (as `poplock show --json` prints), "
        "not 'other'",
    ]
    assert not setup.may_relay("10.0.0.3")


def test_imported_grants_are_journaled_so_that_a_rebuild_keeps_them(journald, setup, tmp_path):
    source = tmp_path / "list"
    source.write_text("198.51.100.7 3h\n")
    setup.run("import", str(source), check=True)
    entry = wait_for_entries({"MESSAGE_ID": events.GRANT_ADDED.message_id, "POPLOCK_STORE": str(setup.store)}, 1)[0]
    assert entry["POPLOCK_CLIENT_ADDRESS"] == "198.51.100.7"
    before = records(setup.run("show", "--json"))
    setup.store.unlink()
    setup.run("rebuild", check=True)
    assert records(setup.run("show", "--json")) == before


def test_a_missing_file_is_an_input_error(setup, tmp_path):
    result = setup.run("import", str(tmp_path / "missing"))
    assert result.returncode == 66
    assert result.stderr == f"poplock: error: cannot read {tmp_path / 'missing'}: No such file or directory\n"


def test_a_large_import_is_one_transaction_into_a_base_and_show_streams_it(setup, tmp_path):
    source = tmp_path / "list"
    source.write_text("".join(f"10.{index >> 16}.{index >> 8 & 255}.{index & 255}\n" for index in range(20000)))
    assert setup.run("import", "--no-journal", str(source), check=True).stdout == "imported 20000 grants\n"
    assert len(list(setup.directory.glob("grants.db.base-*"))) == 1
    shown = setup.run("show", check=True).stdout.splitlines()
    assert len(shown) == 20001 and shown[0].split() == ["ADDRESS", "EXPIRES", "SOURCE", "USER", "LOGIN"]
    assert setup.run("remove", "10.0.78.30", check=True)
    assert not setup.may_relay("10.0.78.30") and setup.may_relay("10.0.78.31")
    assert len(setup.run("show", "--json", check=True).stdout.splitlines()) == 19999


def test_with_ipv6_prefix_an_imported_address_is_stored_as_its_network_and_networks_move_as_they_are(setup, tmp_path):
    setup.write(extra="")
    setup.config.write_text(setup.config.read_text().replace("[Grants]\n", "[Grants]\nIPv6Prefix=64\n"))
    source = tmp_path / "list"
    source.write_text("2001:db8:5::7 1h\n")
    setup.run("import", str(source), check=True)
    assert setup.may_relay("2001:db8:5::99") and not setup.may_relay("2001:db8:6::7")
    exported = tmp_path / "grants.jsonl"
    exported.write_text(setup.run("show", "--json", check=True).stdout)
    setup.run("flush", check=True)
    assert setup.run("import", str(exported), check=True).stdout == "imported 1 grant\n"
    assert list(records(setup.run("show", "--json"))) == ["2001:db8:5::/64"]


def test_imported_grants_of_a_user_count_toward_the_addresses_that_user_may_hold(setup, tmp_path):
    from poplock.storewriter import StoreWriter

    now = int(time.time())
    listing = tmp_path / "grants.jsonl"
    listing.write_text("".join(json.dumps({"kind": "grant", "address": f"192.0.2.{index}", "user": "alice",
                                           "source": "dovecot", "expires": iso_time(now + 1800),
                                           "login_time": iso_time(now - 60)}) + "\n" for index in (1, 2)))
    setup.run("import", str(listing), check=True)
    with StoreWriter(str(setup.store)).transaction() as transaction:
        assert sorted(transaction.users.addresses("alice")) == ["192.0.2.1", "192.0.2.2"]
