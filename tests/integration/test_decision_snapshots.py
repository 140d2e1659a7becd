"""decisions.Snapshots on a real store and real lists: a refusal the reader was asked about stands,
unmade again, only while nothing it was made from has changed."""

import time

import pytest

from poplock.access import needs_fresh_look
from poplock.config import load_config
from poplock.decisions import Snapshots
from poplock.grants import Grant

ADDRESS = "192.0.2.7"


@pytest.fixture
def snapshots(setup):
    setup.run("add", "192.0.2.200", check=True)  # a store to read, without a grant for ADDRESS
    snapshots = Snapshots(load_config(str(setup.config)))
    yield snapshots
    snapshots.close()


def refused_before_read(snapshots, now: float):
    decision = snapshots.decide(ADDRESS, now)
    assert needs_fresh_look(decision)
    return snapshots.before_read(decision)


def test_a_refusal_stands_after_a_read_that_changed_nothing(snapshots):
    now = time.time()
    earlier = refused_before_read(snapshots, now)
    snapshots.read_again({})  # the reader read, and made no grant
    assert snapshots.decide(ADDRESS, now, earlier) is earlier[1]


def test_a_grant_added_meanwhile_is_found(snapshots, setup):
    now = time.time()
    earlier = refused_before_read(snapshots, now)
    setup.run("add", ADDRESS, check=True)  # a new store file
    snapshots.read_again({})
    assert snapshots.decide(ADDRESS, time.time(), earlier).allowed


def test_a_grant_the_read_made_is_found_before_it_is_published(snapshots):
    now = time.time()
    earlier = refused_before_read(snapshots, now)
    snapshots.read_again({ADDRESS: Grant(ADDRESS, int(now) + 600, int(now), "dovecot", "alice")})
    decision = snapshots.decide(ADDRESS, now, earlier)
    assert decision.allowed and decision.grant.user == "alice"


def test_a_grant_the_read_made_for_another_client_leaves_the_refusal_to_be_made_again(snapshots):
    now = time.time()
    earlier = refused_before_read(snapshots, now)
    snapshots.read_again({"192.0.2.8": Grant("192.0.2.8", int(now) + 600, int(now), "dovecot")})
    decision = snapshots.decide(ADDRESS, now, earlier)
    assert decision is not earlier[1] and not decision.allowed


def test_a_static_list_changed_meanwhile_is_read(snapshots, setup):
    now = time.time()
    earlier = refused_before_read(snapshots, now)
    setup.static.write_text("192.0.2.0/24\n")
    snapshots.read_again({})
    assert snapshots.decide(ADDRESS, now, earlier).network is not None


def test_a_deny_list_changed_meanwhile_is_read(setup):
    denied = setup.directory / "denied"
    setup.config.write_text(setup.config.read_text().replace("[Grants]\n", f"[Grants]\nDenyFile={denied}\n", 1))
    setup.run("add", ADDRESS, check=True)
    snapshots = Snapshots(load_config(str(setup.config)))
    later = time.time() + 7200  # its grant has expired by then: a refusal a read could turn
    earlier = refused_before_read(snapshots, later)
    snapshots.read_again({})
    assert snapshots.decide(ADDRESS, later, earlier) is earlier[1]  # nothing changed: it stands
    denied.write_text(f"{ADDRESS}\n")
    snapshots.read_again({})
    decision = snapshots.decide(ADDRESS, later, earlier)
    assert decision is not earlier[1] and decision.denied is not None
    snapshots.close()


def test_a_refusal_for_a_grant_not_begun_yet_is_made_again_as_time_may_turn_it(snapshots, setup):
    setup.run("add", ADDRESS, check=True)
    before_the_login = time.time() - 3600  # as after the clock was stepped back
    earlier = refused_before_read(snapshots, before_the_login)
    snapshots.read_again({})
    assert snapshots.decide(ADDRESS, time.time(), earlier).allowed
