"""`poplock stats`' counting and formats: journal entries as mappings, grants as the store yields them."""

import json
import re

from poplock import events
from poplock.grants import Grant
from poplock.logs import iso_time
from poplock.stats import (
    GrantCounts,
    Statistics,
    Tally,
    count_grants,
    format_json,
    format_prometheus,
    format_text,
    refusals_logged,
)

NOW = 1_795_699_814
DAY = 86400
TRUSTED = frozenset({0, 107})
WINDOW = 1800


def login_entry(event, address="192.0.2.10", at=NOW - 60, expires=None, uid="107", **fields) -> dict:
    """An entry as poplock-reader logs it (logs.log_event), with the fields journald adds."""
    base = {"MESSAGE_ID": event.message_id, "POPLOCK_EVENT": event.name, "SYSLOG_IDENTIFIER": "poplock-reader",
            "POPLOCK_CLIENT_ADDRESS": address, "POPLOCK_SOURCE": "dovecot", "_TRANSPORT": "journal", "_UID": uid,
            "__REALTIME_TIMESTAMP": str(int(at * 1_000_000))}
    if expires is not None:
        base["POPLOCK_EXPIRES"] = iso_time(expires)
    base.update(fields)
    return {name: value for name, value in base.items() if value is not None}


def relay_entry(event, program, at=NOW - 60, **fields) -> dict:
    base = {"MESSAGE_ID": event.message_id, "POPLOCK_EVENT": event.name, "SYSLOG_IDENTIFIER": program,
            "POPLOCK_CLIENT_ADDRESS": "192.0.2.10", "_TRANSPORT": "journal", "_UID": "106",
            "__REALTIME_TIMESTAMP": str(int(at * 1_000_000))}
    base.update(fields)
    return base


def tally_of(entries, since=NOW - DAY, until=NOW) -> Tally:
    tally = Tally(since, until, TRUSTED)
    for entry in entries:
        tally.add(entry)
    return tally


def statistics_of(entries, grants=None, logged=None) -> Statistics:
    return Statistics(NOW - DAY, NOW, grants or GrantCounts(), tally_of(entries),
                      logged or {"relaylock": True, "poplock-policy": True, "poplock-socketmap": True})


def test_each_login_event_counts_under_its_result():
    tally = tally_of([
        login_entry(events.LOGIN_GRANTED, "192.0.2.10", expires=NOW + 1000),
        login_entry(events.LOGIN_GRANTED, "192.0.2.11", expires=NOW + 1000),
        login_entry(events.GRANT_EXTENDED, "192.0.2.10", expires=NOW + 1200),
        login_entry(events.LOGIN_DENIED, "198.51.100.1"),
        login_entry(events.LOGIN_OVER_LIMIT, "198.51.100.2"),
        login_entry(events.LOGIN_TOO_OLD, "198.51.100.3"),
        login_entry(events.LOGIN_TOO_OLD, "198.51.100.4"),
    ])
    assert tally.logins == {"granted": 2, "extended": 1, "denied": 1, "over_limit": 1, "too_old": 2}


def test_login_entries_of_other_users_or_other_transports_count_for_nothing():
    tally = tally_of([
        login_entry(events.LOGIN_GRANTED, "203.0.113.1", expires=NOW + 1000, uid="1000"),  # a local user's forgery
        login_entry(events.LOGIN_GRANTED, "203.0.113.2", expires=NOW + 1000, _TRANSPORT="syslog"),
        login_entry(events.LOGIN_GRANTED, "203.0.113.3", expires=NOW + 1000, _TRANSPORT=None),
        login_entry(events.LOGIN_DENIED, "203.0.113.4", uid=None),
        login_entry(events.LOGIN_GRANTED, "192.0.2.10", expires=NOW + 1000, uid="0"),
    ])
    assert tally.logins["granted"] == 1 and tally.logins["denied"] == 0


def test_only_entries_inside_the_period_count_and_its_end_is_left_out():
    since, until = NOW - 3600, NOW
    tally = tally_of([
        login_entry(events.LOGIN_DENIED, at=since - 0.000001),
        login_entry(events.LOGIN_DENIED, at=since),
        login_entry(events.LOGIN_DENIED, at=until - 0.5),
        login_entry(events.LOGIN_DENIED, at=until),
        relay_entry(events.RELAY_ALLOWED, "relaylock", at=since - 1),
        relay_entry(events.RELAY_ALLOWED, "relaylock", at=until - 1),
        relay_entry(events.RELAY_ALLOWED, "relaylock", at=until + 1),
    ], since, until)
    assert tally.logins["denied"] == 2
    assert tally.relays["relaylock", "allowed"] == 1


def test_a_login_read_again_by_a_rebuild_of_the_store_is_counted_once():
    first = login_entry(events.LOGIN_GRANTED, "192.0.2.10", at=NOW - 600, expires=NOW - 600 + WINDOW)
    extended = login_entry(events.GRANT_EXTENDED, "192.0.2.10", at=NOW - 300, expires=NOW - 300 + WINDOW)
    # The rebuild reads both logins again from an empty store: the first is a new grant again.
    again = login_entry(events.LOGIN_GRANTED, "192.0.2.10", at=NOW - 100, expires=NOW - 600 + WINDOW)
    extended_again = login_entry(events.GRANT_EXTENDED, "192.0.2.10", at=NOW - 100, expires=NOW - 300 + WINDOW)
    tally = tally_of([first, extended, again, extended_again])
    assert tally.logins["granted"] == 1 and tally.logins["extended"] == 1


def test_logins_of_other_addresses_or_expiries_are_not_taken_for_repeats():
    tally = tally_of([
        login_entry(events.LOGIN_GRANTED, "192.0.2.10", expires=NOW + 1000),
        login_entry(events.LOGIN_GRANTED, "192.0.2.11", expires=NOW + 1000),
        login_entry(events.GRANT_EXTENDED, "192.0.2.10", expires=NOW + 1001),
        login_entry(events.LOGIN_GRANTED, "192.0.2.12"),  # no expiry to tell repeats by: counted each time
        login_entry(events.LOGIN_GRANTED, "192.0.2.12"),
    ])
    assert tally.logins["granted"] == 4 and tally.logins["extended"] == 1


def test_many_logins_are_remembered_only_while_their_grants_live():
    entries = [login_entry(events.LOGIN_GRANTED, f"10.0.{n // 256}.{n % 256}", at=NOW - DAY + n,
                           expires=NOW - DAY + n + WINDOW) for n in range(25000)]
    tally = tally_of(entries)
    assert tally.logins["granted"] == 25000
    assert len(tally._granted) < 25000 - 10000  # pruned of grants that had expired when it pruned


def test_relay_decisions_count_by_program_and_other_identifiers_are_left_out():
    tally = tally_of([
        relay_entry(events.RELAY_ALLOWED, "relaylock"),
        relay_entry(events.RELAY_REFUSED, "relaylock"),
        relay_entry(events.RELAY_REFUSED, "relaylock"),
        relay_entry(events.RELAY_ALLOWED, "poplock-policy"),
        relay_entry(events.RELAY_ALLOWED, "poplock-policy"),
        relay_entry(events.RELAY_ALLOWED, "poplock-socketmap"),
        relay_entry(events.RELAY_ALLOWED, "anything-else"),
        relay_entry(events.RELAY_ALLOWED, "relaylock", __REALTIME_TIMESTAMP="not a time"),
        relay_entry(events.STORE_BUSY, "relaylock"),
    ])
    assert tally.relays == {
        ("relaylock", "allowed"): 1, ("relaylock", "refused"): 2,
        ("poplock-policy", "allowed"): 2, ("poplock-policy", "refused"): 0,
        ("poplock-socketmap", "allowed"): 1, ("poplock-socketmap", "refused"): 0,
    }


def test_grants_are_counted_live_or_expired_from_the_stores_entries():
    entries = [
        ("generation", None, b"x"),
        ("grant", "192.0.2.1", Grant("192.0.2.1", NOW + 60, NOW - 60, "dovecot", "alice")),
        ("grant", "192.0.2.2", Grant("192.0.2.2", NOW - 1, NOW - 1800, "dovecot")),
        ("grant", "192.0.2.3", Grant("192.0.2.3", NOW + 60, NOW + 30, "dovecot")),  # login in the future
        ("grant", "192.0.2.4", Grant("192.0.2.4", NOW, NOW - 1800, "manual")),  # expires now
        ("user", "alice", ["192.0.2.1"]),
        ("metadata", "cursor:/var/lib/poplock/cursor", "s=..."),
        ("undecodable", b"x", b"y"),
    ]
    counts = count_grants(iter(entries), NOW)
    assert (counts.live, counts.expired) == (1, 3)


def test_refusals_the_configuration_does_not_log_are_unknown_not_zero():
    class Config:
        policy_log_refused = False
        socketmap_log_refused = True

    logged = refusals_logged(Config())
    assert logged == {"relaylock": True, "poplock-policy": False, "poplock-socketmap": True}
    statistics = statistics_of([relay_entry(events.RELAY_REFUSED, "relaylock")], logged=logged)
    assert statistics.relays_by_program("refused") == {"relaylock": 1, "poplock-policy": None,
                                                        "poplock-socketmap": 0}
    assert statistics.relays_by_program("allowed") == {"relaylock": 0, "poplock-policy": 0, "poplock-socketmap": 0}
    record = json.loads(format_json(statistics, iso_time))
    assert record["relays"]["refused"] == {"relaylock": 1, "poplock-policy": None, "poplock-socketmap": 0}
    prometheus = format_prometheus(statistics)
    assert 'poplock_period_relays{program="relaylock",decision="refused"} 1' in prometheus.splitlines()
    assert 'program="poplock-policy",decision="refused"' not in prometheus
    assert 'program="poplock-policy",decision="allowed"' in prometheus
    assert "poplock-policy not logged ([Policy] LogRefused=no)" in format_text(statistics, iso_time)


def test_the_text_is_aligned_lines_with_totals_and_what_they_are_made_of():
    statistics = statistics_of([
        login_entry(events.LOGIN_GRANTED, "192.0.2.10", expires=NOW + 1000),
        login_entry(events.GRANT_EXTENDED, "192.0.2.10", expires=NOW + 1001),
        login_entry(events.LOGIN_DENIED, "198.51.100.1"),
        *[relay_entry(events.RELAY_ALLOWED, "poplock-policy") for _ in range(12)],
        relay_entry(events.RELAY_REFUSED, "relaylock"),
    ], grants=GrantCounts(live=3, expired=1))
    lines = format_text(statistics, iso_time).splitlines()
    assert lines[0] == f"period          {iso_time(NOW - DAY)} to {iso_time(NOW)}"
    assert lines[1:] == [
        "live grants      3",
        "expired grants   1  not yet purged",
        "logins granted   2  1 new, 1 extended",
        "logins refused   1  1 by the deny list, 0 over an account's limit, 0 read after their window",
        "relays allowed  12  relaylock 0, poplock-policy 12, poplock-socketmap 0",
        "relays refused   1  relaylock 1, poplock-policy 0, poplock-socketmap 0",
    ]


LABEL = r'[a-z_]+="[^"\\\n]*"'
SAMPLE = re.compile(rf"^([a-z_:][a-z0-9_:]*)(\{{{LABEL}(?:,{LABEL})*\}})? (-?[0-9]+(?:\.[0-9]+)?)$")


def test_the_prometheus_text_declares_each_metric_once_before_its_samples():
    statistics = statistics_of([
        login_entry(events.LOGIN_GRANTED, "192.0.2.10", expires=NOW + 1000),
        relay_entry(events.RELAY_ALLOWED, "relaylock"),
    ], grants=GrantCounts(live=5, expired=2))
    text = format_prometheus(statistics)
    assert text.endswith("\n") and not text.endswith("\n\n")
    declared: dict[str, str] = {}
    samples: dict[tuple[str, str], str] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name = line.split()[2]
            assert name not in declared and len(line.split(" ", 3)[3]) > 10
            declared[name] = ""
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert name in declared and declared[name] == "" and kind == "gauge"
            declared[name] = kind
        else:
            match = SAMPLE.match(line)
            assert match, line
            name, labels, value = match.groups()
            assert declared.get(name) == "gauge" and name.startswith("poplock_") and not name.endswith("_total")
            assert (name, labels or "") not in samples
            samples[name, labels or ""] = value
    assert samples["poplock_grants", '{state="live"}'] == "5"
    assert samples["poplock_grants", '{state="expired"}'] == "2"
    assert samples["poplock_period_seconds", ""] == "86400"
    assert samples["poplock_period_end_timestamp_seconds", ""] == str(NOW)
    assert samples["poplock_period_logins", '{result="granted"}'] == "1"
    assert samples["poplock_period_logins", '{result="too_old"}'] == "0"
    assert samples["poplock_period_relays", '{program="relaylock",decision="allowed"}'] == "1"
    assert len([key for key in samples if key[0] == "poplock_period_relays"]) == 6
