"""Real Postfix 3.7 asking poplock-socketmap through a socketmap: table, configured as poplock-socketmap(8) says."""

import pytest
from support.mtas import (
    REPOSITORY,
    PostfixWithLocalDomain,
    SocketmapBehind,
    manual_snippet,
    send_local_mail,
    socket_permissions,
)
from support.smtpservers import try_relay

pytestmark = [pytest.mark.system, pytest.mark.postfix]

GRANTED = "127.0.0.5"
STRANGER = "127.0.0.6"
REMOVED = "127.0.0.7"
EXPIRED = "127.0.0.8"


@pytest.fixture(scope="module")
def postfix(tmp_path_factory):
    directory = tmp_path_factory.mktemp("postfix-socketmap")
    instance = PostfixWithLocalDomain(directory / "postfix", manual_snippet("Postfix", "smtpd_relay_restrictions"))
    unit = (REPOSITORY / "units" / "poplock-socketmap.socket").read_text()  # postfix:postfix 0660
    poplock = SocketmapBehind(directory / "poplock", instance.socket, socket_permissions(unit))
    for address in (GRANTED, REMOVED):
        poplock.grant(address)
    with instance, poplock:
        yield instance, poplock


def test_a_granted_client_relays_and_postfix_asked_for_its_address(postfix):
    instance, poplock = postfix
    assert try_relay("127.0.0.1", instance.port, source=GRANTED) == (250, "2.1.5 Ok")
    assert f"relay allowed for {GRANTED}: manual grant (map poplock, asked as {GRANTED})" in poplock.output()
    assert "poplock b'unknown' is not an address" in poplock.output()  # the client's name, asked first


def test_a_client_without_a_grant_is_refused(postfix):
    instance, poplock = postfix
    assert try_relay("127.0.0.1", instance.port, source=STRANGER) == (
        554, "5.7.1 <someone@elsewhere.example>: Relay access denied")
    assert f"no relay for {STRANGER}: no grant" in poplock.output()


def test_a_removed_or_expired_grant_is_refused(postfix):
    instance, poplock = postfix
    assert try_relay("127.0.0.1", instance.port, source=REMOVED)[0] == 250
    poplock.remove(REMOVED)
    poplock.expired_grant(EXPIRED)
    for address in (REMOVED, EXPIRED):
        code, text = try_relay("127.0.0.1", instance.port, source=address)
        assert code == 554 and text.endswith("Relay access denied"), (address, code, text)
    assert f"no relay for {EXPIRED}: its grant expired" in poplock.output()


def test_with_poplock_stopped_relaying_is_refused_and_local_mail_is_still_taken(postfix):
    instance, poplock = postfix
    with poplock.stopped():
        code, text = try_relay("127.0.0.1", instance.port, source=GRANTED)
        assert (code, text) == (451, f"4.3.5 <unknown[{GRANTED}]>: Client host rejected: Server configuration error")
        code, text = send_local_mail(instance.port, source=STRANGER)
        assert code == 250 and "queued as" in text
        assert instance.wait_for_log("lookup error")
    assert try_relay("127.0.0.1", instance.port, source=GRANTED)[0] == 250  # and back when it is
