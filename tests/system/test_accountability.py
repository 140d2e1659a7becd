"""Who opened each relay, and what one stolen password can do: real Dovecot logins, read by a running
poplock-reader, decided by real Postfix through poplock-policy.

alice logs in from three addresses with MaxAddressesPerUser=2: the first two relay, the third
does not and the warning is in the journal; `poplock remove --user alice` and both are refused
at once; a denied network's and a denied user's logins grant nothing; `journalctl
POPLOCK_USER=alice` lists her relays; with IPv6Prefix=64 a login from 2001:db8:1::5 lets
2001:db8:1::99 relay through Postfix and not 2001:db8:2::5 (in a private network namespace,
where those addresses are the loopback's).
"""

import json
import socket

import pytest
from support.dovecot import Dovecot
from support.journald import unique_tag, wait_for_entries
from support.mailclients import pop3_login
from support.netns import network_namespace
from support.poplock import PolicyProcess, ReaderProcess, Setup
from support.ports import free_port
from support.postfix import PostfixInstance
from support.smtpservers import try_relay

from poplock import events

USERS = {"alice": "secret", "bob": "secret", "carol": "secret"}


def configure(directory, tag: str, grants: str) -> Setup:
    setup = Setup(directory, extra=f"\n[Source:dovecot]\nIdentifiers={tag}\n")
    setup.config.write_text(setup.config.read_text().replace(
        "[Grants]\n", f"[Grants]\nDenyFile={directory / 'denied'}\n{grants}"))
    return setup


@pytest.fixture(scope="module")
def site(journald, tmp_path_factory):
    directory = tmp_path_factory.mktemp("accountability")
    tag = unique_tag("dovecot")
    setup = configure(directory, tag, "MaxAddressesPerUser=2\n")
    (directory / "denied").write_text("# abuse seen from here\n127.0.0.44\nuser carol\n")
    port = free_port()
    restriction = f"check_policy_service {{ inet:127.0.0.1:{port}, timeout=2s, try_limit=1, default_action=DUNNO }}"
    with Dovecot(directory / "dovecot", USERS, identifier=tag) as dovecot, \
            ReaderProcess(setup, journal=True) as reader, \
            PostfixInstance(directory / "postfix", restriction) as postfix, \
            PolicyProcess(setup, f"127.0.0.1:{port}", journal=True) as policy:
        yield setup, dovecot, reader, postfix, policy


def login(dovecot, user: str, source: str) -> None:
    assert pop3_login("127.0.0.1", dovecot.pop3_port, user, USERS[user], source=source)


def relays(postfix, source: str) -> bool:
    code, text = try_relay("127.0.0.1", postfix.port, source=source)
    assert code in (250, 554), text
    return code == 250


def grants(setup) -> dict:
    shown = setup.run("show", "--json", check=True).stdout.splitlines()
    return {record["address"]: record for record in map(json.loads, shown) if record["kind"] == "grant"}


def test_one_password_opens_at_most_max_addresses_per_user_relays_and_the_account_is_revoked_at_once(site):
    setup, dovecot, reader, postfix, policy = site
    login(dovecot, "alice", "127.0.0.41")
    login(dovecot, "alice", "127.0.0.42")
    setup.wait_until_allowed("127.0.0.42")
    login(dovecot, "alice", "127.0.0.43")  # a third address while the first two are live
    warning = wait_for_entries({"MESSAGE_ID": events.LOGIN_OVER_LIMIT.message_id, "_PID": str(reader.process.pid),
                                "POPLOCK_CLIENT_ADDRESS": "127.0.0.43"}, 1)[0]
    assert warning["POPLOCK_USER"] == "alice"
    assert "127.0.0.41" in warning["MESSAGE"] and "127.0.0.42" in warning["MESSAGE"]
    assert "alice" not in warning["MESSAGE"]  # the name is in the field, not in every log reader's view
    assert relays(postfix, "127.0.0.41") and relays(postfix, "127.0.0.42")
    assert not relays(postfix, "127.0.0.43")

    shown = grants(setup)
    assert shown["127.0.0.41"]["user"] == "alice" and shown["127.0.0.41"]["source"] == "dovecot"
    table = setup.run("show", "--user", "alice", check=True).stdout.splitlines()
    assert table[0].split() == ["ADDRESS", "EXPIRES", "SOURCE", "USER", "LOGIN"] and len(table) == 3
    users = setup.run("show", "--users", check=True).stdout.splitlines()
    assert any(line.split()[:4] == ["alice", "2", "127.0.0.41", "127.0.0.42"] for line in users), users

    # Every relay that account enabled is in the journal under its name.
    relayed = wait_for_entries({"MESSAGE_ID": events.RELAY_ALLOWED.message_id, "POPLOCK_USER": "alice",
                                "_PID": str(policy.process.pid)}, 2)
    assert {entry["POPLOCK_CLIENT_ADDRESS"] for entry in relayed} >= {"127.0.0.41", "127.0.0.42"}

    revoked = setup.run("remove", "--user", "alice", check=True)
    assert revoked.stdout == "removed 2 grants of alice: 127.0.0.41 127.0.0.42\n"
    assert not relays(postfix, "127.0.0.41") and not relays(postfix, "127.0.0.42")
    login(dovecot, "alice", "127.0.0.43")  # a new login after the revocation opens one relay again
    setup.wait_until_allowed("127.0.0.43")
    assert relays(postfix, "127.0.0.43")


def test_the_deny_list_refuses_a_network_and_a_user_whatever_they_log_in_with(site):
    setup, dovecot, reader, postfix, policy = site
    login(dovecot, "bob", "127.0.0.44")  # a denied network
    login(dovecot, "carol", "127.0.0.45")  # a denied user
    login(dovecot, "bob", "127.0.0.46")  # neither: granted, so the two before have been read
    setup.wait_until_allowed("127.0.0.46")
    assert not relays(postfix, "127.0.0.44") and not relays(postfix, "127.0.0.45")
    assert "127.0.0.44" not in grants(setup) and "127.0.0.45" not in grants(setup)
    denied = wait_for_entries({"MESSAGE_ID": events.LOGIN_DENIED.message_id, "POPLOCK_CLIENT_ADDRESS": "127.0.0.45",
                               "_PID": str(reader.process.pid)}, 1)[0]
    assert denied["POPLOCK_USER"] == "carol"
    # A line added now takes effect on the next decision, for a grant made before it.
    (setup.directory / "denied").write_text("127.0.0.44\nuser carol\nuser bob\n")
    assert not relays(postfix, "127.0.0.46")
    assert setup.run("check", "127.0.0.46").stdout.endswith("refused by the deny list (its user, "
                                                            f"{setup.directory / 'denied'})\n")
    assert "bob" not in denied["MESSAGE"] and "carol" not in denied["MESSAGE"]


def test_with_ipv6_prefix_64_a_login_lets_its_whole_network_relay_through_postfix_and_no_other(journald, tmp_path):
    tag = unique_tag("dovecot")
    setup = configure(tmp_path, tag, "IPv6Prefix=64\n")
    port = free_port()
    restriction = f"check_policy_service {{ inet:127.0.0.1:{port}, timeout=2s, try_limit=1, default_action=DUNNO }}"
    with network_namespace("2001:db8:1::5", "2001:db8:1::99", "2001:db8:2::5"):
        with Dovecot(tmp_path / "dovecot", USERS, identifier=tag) as dovecot, ReaderProcess(setup), \
                PostfixInstance(tmp_path / "postfix", restriction, ipv6=True) as postfix, \
                PolicyProcess(setup, f"127.0.0.1:{port}"):
            assert pop3_login("::1", dovecot.pop3_port, "alice", "secret", source="2001:db8:1::5")
            setup.wait_until_allowed("2001:db8:1::5")
            assert list(grants(setup)) == ["2001:db8:1::/64"]
            relayed = {client: try_relay("::1", postfix.port, source=client)[0]
                       for client in ("2001:db8:1::99", "2001:db8:1::5", "2001:db8:2::5")}
            with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
                connection.sendall(b"request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address=2001:db8:2::5\n\n")
                other_network = connection.makefile("rb").readline().decode().strip()
    assert relayed == {"2001:db8:1::99": 250, "2001:db8:1::5": 250, "2001:db8:2::5": 554}
    assert other_network == "action=DUNNO"
    assert setup.may_relay("2001:db8:1::abcd") and not setup.may_relay("2001:db8:2::5")
