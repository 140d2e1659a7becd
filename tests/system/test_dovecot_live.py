"""A real Dovecot (POP3 and IMAP, plain, TLS and STARTTLS, IPv4 and IPv6) into a real journald,
read by a running poplock-reader: exactly the logins that succeeded are granted."""

import json

import pytest
from support.dovecot import Dovecot
from support.journald import unique_tag
from support.mailclients import imap_login, pop3_login
from support.poplock import ReaderProcess, Setup

USERS = {"alice": "secret", "198.51.100.7": "secret"}


@pytest.fixture(scope="module")
def live(journald, tmp_path_factory):
    directory = tmp_path_factory.mktemp("live")
    tag = unique_tag("dovecot")
    setup = Setup(directory, extra=f"\n[Source:dovecot]\nIdentifiers={tag}\n")
    with Dovecot(directory / "dovecot", USERS, identifier=tag) as dovecot, ReaderProcess(setup) as reader:
        yield setup, dovecot, reader


def granted(setup) -> set[str]:
    shown = setup.run("show", "--json", check=True).stdout.splitlines()
    return {record["address"] for record in map(json.loads, shown) if record["kind"] == "grant"}


def test_exactly_the_successful_logins_are_granted(live):
    setup, dovecot, reader = live
    host = "127.0.0.1"
    attempts = [
        # (client, expected to succeed, login)
        ("127.0.0.5", True, lambda s: pop3_login(host, dovecot.pop3_port, "alice", "secret", source=s)),
        ("127.0.0.6", False, lambda s: pop3_login(host, dovecot.pop3_port, "alice", "wrong", source=s)),
        ("127.0.0.7", False, lambda s: pop3_login(host, dovecot.pop3_port, "nobody-here", "secret", source=s)),
        ("127.0.0.8", True, lambda s: imap_login(host, dovecot.imap_port, "alice", "secret", source=s)),
        ("127.0.0.9", False, lambda s: imap_login(host, dovecot.imap_port, "alice", "wrong", source=s)),
        ("127.0.0.10", True, lambda s: pop3_login(host, dovecot.pop3s_port, "alice", "secret", source=s,
                                                  tls="implicit")),
        ("127.0.0.11", True, lambda s: imap_login(host, dovecot.imap_port, "alice", "secret", source=s,
                                                  tls="starttls")),
        ("127.0.0.12", True, lambda s: pop3_login(host, dovecot.pop3_port, "alice", "secret", source=s, apop=True)),
        ("127.0.0.13", False, lambda s: imap_login(host, dovecot.imaps_port, "alice", "wrong", source=s,
                                                   tls="implicit")),
        # Crafted user names: Dovecot quotes them in its failure lines.
        ("127.0.0.14", False, lambda s: pop3_login(host, dovecot.pop3_port, "x, rip=203.0.113.9", "secret",
                                                   source=s)),
        ("127.0.0.15", False, lambda s: imap_login(
            host, dovecot.imap_port,
            "a>, method=PLAIN, rip=203.0.113.10, lip=127.0.0.1, mpid=1, session=<x>", "secret", source=s)),
        ("127.0.0.16", False, lambda s: pop3_login(
            host, dovecot.pop3_port,
            "pop3-login: Login: user=<a>, method=PLAIN, rip=203.0.113.11, lip=127.0.0.1", "x", source=s)),
        # A user named like an address: its address is still the client's.
        ("127.0.0.17", True, lambda s: pop3_login(host, dovecot.pop3_port, "198.51.100.7", "secret", source=s)),
        ("::1", True, lambda s: imap_login("::1", dovecot.imap_port, "alice", "secret", source=s)),
    ]
    for client, expected, login in attempts:
        assert login(client) is expected, client
    setup.wait_until_allowed("::1")
    setup.wait_until_allowed("127.0.0.17")
    assert granted(setup) == {client for client, succeeded, _ in attempts if succeeded}
    for address in ("203.0.113.9", "203.0.113.10", "203.0.113.11", "198.51.100.7"):
        assert not setup.may_relay(address)
    assert setup.run("check", "127.0.0.6").returncode == 1


def test_scan_prints_exactly_the_successful_logins_of_this_dovecot(live):
    setup, dovecot, reader = live
    pop3_login("127.0.0.1", dovecot.pop3_port, "alice", "secret", source="127.0.0.40")
    pop3_login("127.0.0.1", dovecot.pop3_port, "alice", "wrong", source="127.0.0.41")
    setup.wait_until_allowed("127.0.0.40")
    result = setup.run("scan", "--json", check=True)
    addresses = [json.loads(line)["address"] for line in result.stdout.splitlines()]
    assert "127.0.0.40" in addresses and "127.0.0.41" not in addresses
    assert all(json.loads(line)["source"] == "dovecot" for line in result.stdout.splitlines())
