"""Real Exim 4.96 (Debian's exim4-daemon-light, unpacked beside Postfix) asking poplock-socketmap with
${readsocket} from its RCPT ACL, with the ACL lines of poplock-socketmap(8)."""

import pytest
from support.mtas import Exim, SocketmapBehind, install_mtas, manual_snippet, send_local_mail, socket_permissions
from support.processes import reachable_by_everyone
from support.smtpservers import try_relay

pytestmark = [pytest.mark.system, pytest.mark.exim]

GRANTED = "127.0.0.5"
STRANGER = "127.0.0.6"
REMOVED = "127.0.0.7"
EXPIRED = "127.0.0.8"
GRANTED_IPV6 = "2001:db8::5"
FOREIGN = "someone@elsewhere.example"


@pytest.fixture(scope="module")
def exim(tmp_path_factory):
    install_mtas()
    directory = reachable_by_everyone(tmp_path_factory.mktemp("exim"))  # the ACL runs as Debian-exim
    socket_path = directory / "poplock-socketmap"
    drop_in = manual_snippet("Exim", "[Socket]")
    poplock = SocketmapBehind(directory / "poplock", socket_path, socket_permissions(drop_in))
    for address in (GRANTED, REMOVED, GRANTED_IPV6, "::1"):
        poplock.grant(address)
    with Exim(directory / "exim", manual_snippet("Exim", "readsocket"), socket_path) as server, poplock:
        yield server, poplock


def test_a_granted_client_relays_over_ipv4_and_ipv6(exim):
    server, poplock = exim
    assert try_relay("127.0.0.1", server.port, source=GRANTED) == (250, "Accepted")
    assert try_relay("::1", server.port, source="::1") == (250, "Accepted")
    assert f"relay allowed for {GRANTED}: manual grant (map poplock, asked as {GRANTED})" in poplock.output()
    assert "relay allowed for ::1: manual grant (map poplock, asked as ::1)" in poplock.output()


def test_exims_test_mode_asks_in_its_zero_padded_spelling_and_relays(exim):
    server, poplock = exim
    assert server.check_in_test_mode(GRANTED_IPV6, FOREIGN) == (250, "Accepted")
    assert "relay allowed for 2001:db8::5: manual grant (map poplock, asked as " \
           "2001:0db8:0000:0000:0000:0000:0000:0005)" in poplock.output()
    assert server.check_in_test_mode("2001:db8::6", FOREIGN) == (550, "relay not permitted")


def test_a_client_without_a_grant_is_refused(exim):
    server, poplock = exim
    assert try_relay("127.0.0.1", server.port, source=STRANGER) == (550, "relay not permitted")
    assert f"no relay for {STRANGER}: no grant" in poplock.output()


def test_a_removed_or_expired_grant_is_refused(exim):
    server, poplock = exim
    assert try_relay("127.0.0.1", server.port, source=REMOVED)[0] == 250
    poplock.remove(REMOVED)
    poplock.expired_grant(EXPIRED)
    for address in (REMOVED, EXPIRED):
        assert try_relay("127.0.0.1", server.port, source=address) == (550, "relay not permitted"), address
    assert f"no relay for {EXPIRED}: its grant expired" in poplock.output()


def test_with_poplock_stopped_relaying_is_refused_and_local_mail_is_still_taken(exim):
    server, poplock = exim
    with poplock.stopped():
        assert try_relay("127.0.0.1", server.port, source=GRANTED) == (451, "relay check unavailable, try again later")
        code, text = send_local_mail(server.port, source=STRANGER)
        assert code == 250 and text.startswith("OK id="), (code, text)
    assert try_relay("127.0.0.1", server.port, source=GRANTED)[0] == 250
