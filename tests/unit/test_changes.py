"""Administrative changes read back from journal entries, and replayed in journal order."""

import pytest

from poplock import events
from poplock.changes import ADD, FLUSH, REMOVE, Change, apply_change, parse_change
from poplock.grants import Grant
from poplock.logs import iso_time

STORE = "/var/lib/poplock/grants.db"
TRUSTED = frozenset({0, 107})
MACHINE = "5eed0000000000000000000000000001"
NOW = 1_795_699_814


def entry(event, **fields) -> dict:
    base = {"MESSAGE_ID": event.message_id, "POPLOCK_STORE": STORE, "_TRANSPORT": "journal", "_UID": "0",
            "__REALTIME_TIMESTAMP": str(NOW * 1_000_000), "_MACHINE_ID": MACHINE}
    base.update(fields)
    return {name: value for name, value in base.items() if value is not None}


def test_an_add_a_remove_and_a_flush_are_read_with_what_they_changed():
    added = entry(events.GRANT_ADDED, POPLOCK_CLIENT_ADDRESS="192.0.2.7", POPLOCK_EXPIRES=iso_time(NOW + 7200))
    assert parse_change(added, STORE, TRUSTED, MACHINE) == Change(ADD, "192.0.2.7", NOW + 7200, NOW)
    removed = entry(events.GRANT_REMOVED, POPLOCK_CLIENT_ADDRESS="192.0.2.7")
    assert parse_change(removed, STORE, TRUSTED, MACHINE) == Change(REMOVE, "192.0.2.7", None, NOW)
    assert parse_change(entry(events.GRANTS_FLUSHED), STORE, TRUSTED, MACHINE) == Change(FLUSH, None, None, NOW)


@pytest.mark.parametrize("fields", [
    {"_UID": "1000"},  # any user can send these fields and MESSAGE_IDs: only writers of the store count
    {"_UID": None},
    {"_TRANSPORT": "syslog"},  # not the native protocol
    {"_TRANSPORT": "stdout"},
    {"POPLOCK_STORE": "/srv/other/grants.db"},  # another store's change
    {"MESSAGE_ID": events.LOGIN_GRANTED.message_id},  # not an administrative change
    {"POPLOCK_CLIENT_ADDRESS": None},
    {"POPLOCK_EXPIRES": "soon"},
    {"__REALTIME_TIMESTAMP": "x"},
    {"_MACHINE_ID": "0123456789abcdef0123456789abcdef"},  # another host's root changed its own store
    {"_MACHINE_ID": None},
])
def test_entries_that_are_not_a_trusted_complete_change_of_this_store_change_nothing(fields):
    forged = entry(events.GRANT_ADDED, POPLOCK_CLIENT_ADDRESS="203.0.113.66", POPLOCK_EXPIRES=iso_time(NOW + 60))
    forged.update(fields)
    forged = {name: value for name, value in forged.items() if value is not None}
    assert parse_change(forged, STORE, TRUSTED, MACHINE) is None


def test_an_add_keeps_the_login_time_it_was_stored_with_but_never_one_after_its_entry():
    # `poplock add` stores the second it started in; the entry may be logged in the next one
    added = entry(events.GRANT_ADDED, POPLOCK_CLIENT_ADDRESS="192.0.2.7", POPLOCK_EXPIRES=iso_time(NOW + 7200),
                  POPLOCK_LOGIN_TIME=iso_time(NOW - 1))
    change = parse_change(added, STORE, TRUSTED, MACHINE)
    assert change == Change(ADD, "192.0.2.7", NOW + 7200, NOW, NOW - 1)
    grants: dict = {}
    assert apply_change(grants, change, NOW + 5)
    assert grants == {"192.0.2.7": Grant("192.0.2.7", NOW + 7200, NOW - 1, "manual")}
    later = dict(added, POPLOCK_LOGIN_TIME=iso_time(NOW + 3600))
    assert parse_change(later, STORE, TRUSTED, MACHINE).login_at == NOW
    garbled = dict(added, POPLOCK_LOGIN_TIME="yesterday")
    assert parse_change(garbled, STORE, TRUSTED, MACHINE) == Change(ADD, "192.0.2.7", NOW + 7200, NOW)


def test_changes_replayed_in_journal_order_end_as_the_administrator_left_them():
    grants = {"192.0.2.1": Grant("192.0.2.1", NOW + 1800, NOW, "dovecot"),
              "192.0.2.2": Grant("192.0.2.2", NOW + 1800, NOW, "dovecot")}
    assert apply_change(grants, Change(ADD, "192.0.2.9", NOW + 7200, NOW + 1), NOW + 2)
    assert apply_change(grants, Change(REMOVE, "192.0.2.1", None, NOW + 3), NOW + 4)
    assert not apply_change(grants, Change(REMOVE, "192.0.2.1", None, NOW + 5), NOW + 6)  # already gone
    assert sorted(grants) == ["192.0.2.2", "192.0.2.9"]
    assert grants["192.0.2.9"] == Grant("192.0.2.9", NOW + 7200, NOW + 1, "manual")
    assert apply_change(grants, Change(FLUSH, None, None, NOW + 7), NOW + 8)
    assert grants == {}


def test_an_add_the_store_already_holds_changes_nothing():
    grants = {"192.0.2.9": Grant("192.0.2.9", NOW + 7200, NOW, "manual")}
    assert not apply_change(grants, Change(ADD, "192.0.2.9", NOW + 7200, NOW + 0.4), NOW + 1)


def test_an_add_that_has_expired_or_is_longer_than_any_grant_grants_nothing():
    grants: dict = {}
    assert not apply_change(grants, Change(ADD, "192.0.2.9", NOW - 1, NOW - 3600), NOW)
    assert not apply_change(grants, Change(ADD, "192.0.2.9", NOW + 30 * 86400, NOW), NOW)
    assert grants == {}
