import pytest

from poplock.grants import (
    MAX_GRANT_LENGTH,
    Grant,
    GrantDecodeError,
    decode_grant,
    encode_grant,
    grant_for_login,
    merge_grant,
    split_expired,
    value_is_not_live,
)

LOGIN_AT = 1_795_699_814


def test_a_login_grants_until_its_time_plus_the_window():
    grant = grant_for_login("192.0.2.7", LOGIN_AT + 0.614, 1800, "dovecot")
    assert grant == Grant("192.0.2.7", LOGIN_AT + 1800, LOGIN_AT, "dovecot")


def test_a_grant_is_live_until_the_second_it_expires():
    grant = Grant("192.0.2.7", LOGIN_AT + 1800, LOGIN_AT, "dovecot")
    assert grant.is_live(LOGIN_AT + 1799.9)
    assert not grant.is_live(LOGIN_AT + 1800)


def test_the_newer_login_says_whose_grant_it_is():
    old = grant_for_login("192.0.2.7", LOGIN_AT, 1800, "dovecot", "alice")
    new = grant_for_login("192.0.2.7", LOGIN_AT + 600, 1800, "dovecot", "bob")
    assert merge_grant(old, new, LOGIN_AT + 600).user == "bob"
    assert merge_grant(new, old, LOGIN_AT + 600).user == "bob"  # a late entry of alice's changes nothing


def test_a_newer_login_extends_a_grant():
    old = grant_for_login("192.0.2.7", LOGIN_AT, 1800, "dovecot")
    new = grant_for_login("192.0.2.7", LOGIN_AT + 600, 1800, "courier")
    assert merge_grant(old, new, LOGIN_AT + 600) == Grant("192.0.2.7", LOGIN_AT + 2400, LOGIN_AT + 600, "courier")


def test_an_older_login_never_shortens_a_grant():
    current = grant_for_login("192.0.2.7", LOGIN_AT + 600, 1800, "dovecot")
    late = grant_for_login("192.0.2.7", LOGIN_AT, 1800, "courier")
    assert merge_grant(current, late, LOGIN_AT + 600) == current


def test_a_longer_grant_by_hand_is_not_shortened_by_a_later_login():
    by_hand = Grant("192.0.2.7", LOGIN_AT + 7200, LOGIN_AT, "manual")
    login = grant_for_login("192.0.2.7", LOGIN_AT + 60, 1800, "dovecot")
    merged = merge_grant(by_hand, login, LOGIN_AT + 60)
    assert merged.expires_at == LOGIN_AT + 7200
    assert (merged.login_at, merged.source) == (LOGIN_AT + 60, "dovecot")


def test_re_reading_the_same_login_changes_nothing():
    grant = grant_for_login("192.0.2.7", LOGIN_AT, 1800, "dovecot")
    assert merge_grant(grant, grant_for_login("192.0.2.7", LOGIN_AT, 1800, "dovecot"), LOGIN_AT) == grant


def test_grants_are_stored_as_small_versioned_text():
    grant = Grant("2001:db8::7", LOGIN_AT + 1800, LOGIN_AT, "dovecot")
    assert encode_grant(grant) == b"2 1795701614 1795699814 dovecot "  # made by hand: no user
    assert decode_grant("2001:db8::7", encode_grant(grant)) == grant
    login = Grant("2001:db8::7", LOGIN_AT + 1800, LOGIN_AT, "dovecot", "alice")
    assert encode_grant(login) == b"2 1795701614 1795699814 dovecot alice"
    assert decode_grant("2001:db8::7", encode_grant(login)) == login


def test_grants_of_the_first_format_are_still_read_without_a_user():
    assert decode_grant("192.0.2.7", b"1 1795701614 1795699814 dovecot") == Grant(
        "192.0.2.7", LOGIN_AT + 1800, LOGIN_AT, "dovecot", None)


@pytest.mark.parametrize("user", ["alice smith", "1 2 3", "x\n2 9999999999 0 manual", "\udcff", "a" * 300])
def test_nothing_a_user_name_holds_changes_the_times_or_the_source(user):
    grant = Grant("192.0.2.7", LOGIN_AT + 1800, LOGIN_AT, "dovecot", user)
    decoded = decode_grant("192.0.2.7", encode_grant(grant))
    assert decoded == grant and (decoded.expires_at, decoded.login_at, decoded.source) == (
        LOGIN_AT + 1800, LOGIN_AT, "dovecot")


@pytest.mark.parametrize("value", [b"", b"2 1 2 x", b"1 soon 2 x", b"1 1 2", b"\xff\xfe", b"3 1 2 x y",
                                   b"2 1 2  alice"])
def test_a_value_of_another_format_is_refused_not_guessed(value):
    with pytest.raises(GrantDecodeError):
        decode_grant("192.0.2.7", value)


def test_expired_and_live_grants_are_told_apart_at_a_given_time():
    live = Grant("192.0.2.1", LOGIN_AT + 10, LOGIN_AT, "dovecot")
    expired = Grant("192.0.2.2", LOGIN_AT - 10, LOGIN_AT - 1810, "dovecot")
    assert split_expired([live, expired], LOGIN_AT) == ([live], [expired])


# Clock steps: expiry is an absolute time, so a grant must also not be live before its login.

def test_a_clock_stepped_back_a_day_does_not_keep_a_grant_for_a_day_more():
    grant = grant_for_login("192.0.2.7", LOGIN_AT, 1800, "dovecot")
    assert not grant.is_live(LOGIN_AT - 86400 + 60)
    assert grant.is_from_the_future(LOGIN_AT - 86400 + 60)


def test_a_grant_written_while_the_clock_ran_a_year_ahead_allows_nothing_once_it_is_corrected():
    ahead = grant_for_login("192.0.2.7", LOGIN_AT + 365 * 86400, 1800, "dovecot")
    assert not ahead.is_live(LOGIN_AT)
    assert split_expired([ahead], LOGIN_AT) == ([], [ahead])  # `poplock expire` purges it


def test_a_login_after_the_clock_was_stepped_back_replaces_the_grant_from_the_future():
    ahead = grant_for_login("192.0.2.7", LOGIN_AT + 86400, 1800, "dovecot")
    login = grant_for_login("192.0.2.7", LOGIN_AT, 1800, "dovecot")
    merged = merge_grant(ahead, login, LOGIN_AT)
    assert merged == login and merged.is_live(LOGIN_AT)


def test_a_grant_longer_than_any_poplock_writes_allows_nothing_and_is_replaced_by_a_login():
    damaged = Grant("192.0.2.7", LOGIN_AT + MAX_GRANT_LENGTH + 1, LOGIN_AT, "dovecot")
    assert not damaged.is_live(LOGIN_AT + 1)
    login = grant_for_login("192.0.2.7", LOGIN_AT + 1, 1800, "dovecot")
    assert merge_grant(damaged, login, LOGIN_AT + 1) == login


@pytest.mark.parametrize("grant", [
    Grant("192.0.2.7", LOGIN_AT + 1800, LOGIN_AT, "dovecot"),
    Grant("192.0.2.7", LOGIN_AT + 1800, LOGIN_AT, "dovecot", "alice"),
    Grant("192.0.2.7", LOGIN_AT + 7200, LOGIN_AT, "dovecot", "alice", (("dovecot:42/AB", LOGIN_AT),), LOGIN_AT + 1800),
    Grant("192.0.2.7", LOGIN_AT + MAX_GRANT_LENGTH + 1, LOGIN_AT, "manual"),  # longer than any grant can be
])
@pytest.mark.parametrize("offset", [-1, 0, 1, 1799, 1800, 7199, 7200, MAX_GRANT_LENGTH + 1])
def test_an_encoded_grant_is_live_exactly_when_its_decoded_grant_is(grant, offset):
    now = LOGIN_AT + offset
    assert value_is_not_live(encode_grant(grant), now) == (not grant.is_live(now))


@pytest.mark.parametrize("value", [b"", b"1", b"1 x 5 dovecot", b"9 99999999999 0", b"2 17 "])
def test_an_encoded_grant_that_cannot_be_read_is_not_live(value):
    assert value_is_not_live(value, LOGIN_AT) is True
