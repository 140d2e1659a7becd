"""Real Sendmail 8.17 (Debian's sendmail-bin, unpacked beside Postfix) asking poplock-socketmap through a
`socket` map from Local_check_rcpt, with the .mc lines of poplock-socketmap(8)."""

import pytest
from support.mtas import Sendmail, SocketmapBehind, install_mtas, manual_snippet, send_local_mail, socket_permissions
from support.smtpservers import try_relay

pytestmark = [pytest.mark.system, pytest.mark.sendmail]

GRANTED = "127.0.0.5"
STRANGER = "127.0.0.6"
REMOVED = "127.0.0.7"
EXPIRED = "127.0.0.8"
GRANTED_IPV6 = "2001:db8::5"
FOREIGN = "someone@elsewhere.example"


@pytest.fixture(scope="module")
def sendmail(tmp_path_factory):
    install_mtas()
    directory = tmp_path_factory.mktemp("sendmail")
    socket_path = directory / "poplock-socketmap"
    drop_in = manual_snippet("Sendmail", "[Socket]")
    poplock = SocketmapBehind(directory / "poplock", socket_path, socket_permissions(drop_in))
    for address in (GRANTED, REMOVED, GRANTED_IPV6):
        poplock.grant(address)
    with Sendmail(directory / "sendmail", manual_snippet("Sendmail", "LOCAL_CONFIG"), socket_path) as server, \
            poplock:
        yield server, poplock


def test_a_granted_client_relays(sendmail):
    server, poplock = sendmail
    assert try_relay("127.0.0.1", server.port, source=GRANTED) == (250, f"2.1.5 <{FOREIGN}>... Recipient ok")
    assert f"relay allowed for {GRANTED}: manual grant (map poplock, asked as {GRANTED})" in poplock.output()


def test_an_ipv6_client_is_asked_for_in_sendmails_full_spelling_and_relays(sendmail):
    server, poplock = sendmail
    assert server.check_in_test_mode("IPv6:2001:db8:0:0:0:0:0:5", FOREIGN) == "$# RELAY"
    assert "relay allowed for 2001:db8::5: manual grant (map poplock, asked as 2001:db8:0:0:0:0:0:5)" \
           in poplock.output()
    assert server.check_in_test_mode("IPv6:2001:db8:0:0:0:0:0:6", FOREIGN).startswith("$# error")


def test_a_client_without_a_grant_is_refused(sendmail):
    server, poplock = sendmail
    code, text = try_relay("127.0.0.1", server.port, source=STRANGER)
    assert code == 550 and text.startswith(f"5.7.1 <{FOREIGN}>... Relaying denied"), (code, text)
    assert f"no relay for {STRANGER}: no grant" in poplock.output()


def test_a_removed_or_expired_grant_is_refused(sendmail):
    server, poplock = sendmail
    assert try_relay("127.0.0.1", server.port, source=REMOVED)[0] == 250
    poplock.remove(REMOVED)
    poplock.expired_grant(EXPIRED)
    for address in (REMOVED, EXPIRED):
        code, text = try_relay("127.0.0.1", server.port, source=address)
        assert code == 550 and "Relaying denied" in text, (address, code, text)
    assert f"no relay for {EXPIRED}: its grant expired" in poplock.output()


def test_with_poplock_stopped_relaying_is_refused_and_local_mail_is_still_taken(sendmail):
    server, poplock = sendmail
    with poplock.stopped():
        assert try_relay("127.0.0.1", server.port, source=GRANTED) == (
            451, "4.3.0 Relay check unavailable, try again later")
        code, text = send_local_mail(server.port, source=STRANGER)
        assert code == 250 and "accepted for delivery" in text, (code, text)
        # Clients Sendmail lets relay by themselves do not depend on poplock either.
        assert try_relay("127.0.0.1", server.port, source="127.0.0.1")[0] == 250
    assert try_relay("127.0.0.1", server.port, source=GRANTED)[0] == 250
