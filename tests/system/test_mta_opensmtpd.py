"""Real OpenSMTPD 6.8 (Debian's opensmtpd, unpacked beside Postfix, in a mount namespace of its own) with
poplock-smtpd-filter asking poplock-socketmap at RCPT TO, with the smtpd.conf lines of poplock-socketmap(8)."""

import pytest
from support.mtas import (
    MANUAL_SOCKET,
    OpenSmtpd,
    SocketmapBehind,
    install_mtas,
    manual_snippet,
    send_local_mail,
    socket_permissions,
)
from support.poplock import command_for_everyone
from support.processes import reachable_by_everyone
from support.smtpservers import LOCAL_DOMAIN, try_relay

pytestmark = [pytest.mark.system, pytest.mark.opensmtpd]

GRANTED = "127.0.0.5"
STRANGER = "127.0.0.6"
REMOVED = "127.0.0.7"
EXPIRED = "127.0.0.8"
ACCEPTED = (250, "2.1.5 Destination address valid: Recipient ok")
REFUSED = (550, "5.7.1 Relaying denied")


@pytest.fixture(scope="module")
def opensmtpd(tmp_path_factory):
    install_mtas()
    directory = reachable_by_everyone(tmp_path_factory.mktemp("opensmtpd"))  # the filter runs as opensmtpd
    socket_path = directory / "poplock-socketmap"
    drop_in = manual_snippet("OpenSMTPD", "[Socket]")
    poplock = SocketmapBehind(directory / "poplock", socket_path, socket_permissions(drop_in))
    for address in (GRANTED, REMOVED, "::1"):
        poplock.grant(address)
    replacements = {"/usr/bin/poplock-smtpd-filter": command_for_everyone("poplock-smtpd-filter"),
                    MANUAL_SOCKET: str(socket_path), "example.org": LOCAL_DOMAIN}
    with OpenSmtpd(directory / "opensmtpd", manual_snippet("OpenSMTPD", "proc-exec"), replacements) as server, \
            poplock:
        yield server, poplock


def test_a_granted_client_relays_over_ipv4_and_ipv6(opensmtpd):
    server, poplock = opensmtpd
    assert try_relay("127.0.0.1", server.port, source=GRANTED) == ACCEPTED
    assert try_relay("::1", server.port, source="::1") == ACCEPTED
    assert f"relay allowed for {GRANTED}: manual grant (map poplock, asked as {GRANTED})" in poplock.output()
    assert "relay allowed for ::1: manual grant (map poplock, asked as ::1)" in poplock.output()


def test_a_client_without_a_grant_is_refused(opensmtpd):
    server, poplock = opensmtpd
    assert try_relay("127.0.0.1", server.port, source=STRANGER) == REFUSED
    assert f"no relay for {STRANGER}: no grant" in poplock.output()


def test_a_removed_or_expired_grant_is_refused(opensmtpd):
    server, poplock = opensmtpd
    assert try_relay("127.0.0.1", server.port, source=REMOVED) == ACCEPTED
    poplock.remove(REMOVED)
    poplock.expired_grant(EXPIRED)
    for address in (REMOVED, EXPIRED):
        assert try_relay("127.0.0.1", server.port, source=address) == REFUSED, address
    assert f"no relay for {EXPIRED}: its grant expired" in poplock.output()


def test_with_poplock_stopped_relaying_is_refused_and_local_mail_is_still_taken(opensmtpd):
    server, poplock = opensmtpd
    with poplock.stopped():
        assert try_relay("127.0.0.1", server.port, source=GRANTED) == (
            451, "4.3.0 Relay check unavailable, try again later")
        code, text = send_local_mail(server.port, source=STRANGER)
        assert code == 250 and "Message accepted for delivery" in text, (code, text)
        assert "cannot ask" in server.output() and "Connection refused; answering 451" in server.output()
    assert try_relay("127.0.0.1", server.port, source=GRANTED) == ACCEPTED
    assert server.running()  # the filter never died, nor smtpd with it
