"""The SMTP servers and launchers poplock works with, proved against the real programs.

These pin down what relaylock and the policy service rely on: which RELAYCLIENT values
each qmail-style server honours, what each launcher does with the environment, and that a
Postfix instance's relay decision is the restriction it was given, failing closed.
"""

from __future__ import annotations

import pytest
from support.ports import free_port
from support.postfix import PostfixInstance
from support.smtpservers import (
    FOREIGN_RECIPIENT,
    LOCAL_DOMAIN,
    SocketActivate,
    TcpServer,
    mailfront,
    qpsmtpd,
    send_message,
    try_relay,
)

REMOVE_RELAYCLIENT = ("/usr/bin/env", "-u", "RELAYCLIENT")
EMPTY_RELAYCLIENT = ("/usr/bin/env", "RELAYCLIENT=")
RELAYCLIENT_1 = ("/usr/bin/env", "RELAYCLIENT=1")

MAILFRONT_REFUSES = (550, "5.1.0 Mail system is not configured to accept that recipient")
MAILFRONT_ACCEPTS = (250, f"Recipient='{FOREIGN_RECIPIENT}'.")
QPSMTPD_REFUSES = (550, "Relaying denied (#5.7.1)")
QPSMTPD_ACCEPTS = (250, f"<{FOREIGN_RECIPIENT}>, recipient ok")
POSTFIX_ACCEPTS = (250, "2.1.5 Ok")
POSTFIX_REFUSES = (554, f"5.7.1 <{FOREIGN_RECIPIENT}>: Relay access denied")

LAUNCHERS = pytest.mark.parametrize(
    "launcher", [TcpServer, SocketActivate], ids=["tcpserver", "systemd-socket-activate"]
)


@pytest.fixture(scope="module")
def mailfront_server(tmp_path_factory):
    return mailfront(tmp_path_factory.mktemp("mailfront"))


@pytest.fixture(scope="module")
def qpsmtpd_server(tmp_path_factory):
    return qpsmtpd(tmp_path_factory.mktemp("qpsmtpd"))


# mailfront

@LAUNCHERS
def test_mailfront_refuses_relaying_without_relayclient(mailfront_server, launcher):
    with launcher(mailfront_server, wrapper=REMOVE_RELAYCLIENT) as server:
        assert try_relay(server.host, server.port, source="127.0.0.5") == MAILFRONT_REFUSES


@LAUNCHERS
def test_mailfront_relays_when_relayclient_is_the_empty_string(mailfront_server, launcher):
    with launcher(mailfront_server, wrapper=EMPTY_RELAYCLIENT) as server:
        assert try_relay(server.host, server.port, source="127.0.0.5") == MAILFRONT_ACCEPTS


def test_mailfront_accepts_local_recipients_without_relayclient(mailfront_server):
    with TcpServer(mailfront_server, wrapper=REMOVE_RELAYCLIENT) as server:
        recipient = f"postmaster@{LOCAL_DOMAIN}"
        assert try_relay(server.host, server.port, source="127.0.0.5", recipient=recipient) == (
            250, f"Recipient='{recipient}'.")


def test_mailfront_appends_the_value_of_relayclient_to_the_recipient(mailfront_server):
    # qmail semantics: RELAYCLIENT is a suffix for the address, so only "" leaves it intact.
    with TcpServer(mailfront_server, wrapper=RELAYCLIENT_1) as server:
        assert try_relay(server.host, server.port, source="127.0.0.5") == (
            250, f"Recipient='{FOREIGN_RECIPIENT}1'.")


def test_mailfront_takes_a_whole_relayed_message(mailfront_server):
    message = "Subject: poplock test\n\nmailfront body\n"
    with TcpServer(mailfront_server, wrapper=EMPTY_RELAYCLIENT) as server:
        code, text = send_message(server.host, server.port, source="127.0.0.5", message=message)
    # The echo back end delivers nothing and only reports the size.
    assert code == 250 and text.startswith("Received ")


def test_an_inherited_relayclient_passes_through_tcpserver(mailfront_server):
    # Why relaylock must remove RELAYCLIENT for clients without a grant, not merely not set it.
    with TcpServer(mailfront_server, environment={"RELAYCLIENT": ""}) as server:
        assert try_relay(server.host, server.port, source="127.0.0.5") == MAILFRONT_ACCEPTS


def test_a_wrapper_that_removes_relayclient_undoes_an_inherited_one(mailfront_server):
    with TcpServer(mailfront_server, environment={"RELAYCLIENT": ""}, wrapper=REMOVE_RELAYCLIENT) as server:
        assert try_relay(server.host, server.port, source="127.0.0.5") == MAILFRONT_REFUSES


def test_socket_activation_wipes_an_inherited_relayclient(mailfront_server):
    with SocketActivate(mailfront_server, environment={"RELAYCLIENT": ""}) as server:
        assert try_relay(server.host, server.port, source="127.0.0.5") == MAILFRONT_REFUSES


def test_socket_activation_passes_relayclient_given_with_setenv(mailfront_server):
    with SocketActivate(mailfront_server, setenv={"RELAYCLIENT": ""}) as server:
        assert try_relay(server.host, server.port, source="127.0.0.5") == MAILFRONT_ACCEPTS


# qpsmtpd

@LAUNCHERS
def test_qpsmtpd_refuses_relaying_without_relayclient(qpsmtpd_server, launcher):
    with launcher(qpsmtpd_server, wrapper=REMOVE_RELAYCLIENT) as server:
        assert try_relay(server.host, server.port, source="127.0.0.5") == QPSMTPD_REFUSES


@LAUNCHERS
def test_qpsmtpd_ignores_an_empty_relayclient(qpsmtpd_server, launcher):
    with launcher(qpsmtpd_server, wrapper=EMPTY_RELAYCLIENT) as server:
        assert try_relay(server.host, server.port, source="127.0.0.5") == QPSMTPD_REFUSES


@LAUNCHERS
def test_qpsmtpd_relays_when_relayclient_is_1(qpsmtpd_server, launcher):
    with launcher(qpsmtpd_server, wrapper=RELAYCLIENT_1) as server:
        assert try_relay(server.host, server.port, source="127.0.0.5") == QPSMTPD_ACCEPTS


def test_qpsmtpd_accepts_local_recipients_without_relayclient(qpsmtpd_server):
    with TcpServer(qpsmtpd_server, wrapper=REMOVE_RELAYCLIENT) as server:
        recipient = f"postmaster@{LOCAL_DOMAIN}"
        assert try_relay(server.host, server.port, source="127.0.0.5", recipient=recipient) == (
            250, f"<{recipient}>, recipient ok")


def test_qpsmtpd_delivers_a_relayed_message_into_its_maildir(qpsmtpd_server):
    with TcpServer(qpsmtpd_server, wrapper=RELAYCLIENT_1) as server:
        message = "Subject: poplock test\n\nqpsmtpd body\n"
        assert send_message(server.host, server.port, source="127.0.0.5", message=message) == (250, "Queued!")
    delivered = [path.read_text() for path in (qpsmtpd_server.directory / "maildir" / "new").iterdir()]
    assert any("qpsmtpd body" in message for message in delivered)


def test_qpsmtpd_sees_the_client_address_without_tcpserver_variables(qpsmtpd_server):
    # Under socket activation there is no TCPREMOTEIP: qpsmtpd asks the socket on fd 0.
    with SocketActivate(qpsmtpd_server) as server:
        try_relay(server.host, server.port, source="127.0.0.6")
    assert "Connection from [127.0.0.6]" in server.log.read_text()


# Postfix

def _client_table(directory, text):
    table = directory / "clients.cidr"
    table.write_text(text)
    return table


def test_postfix_relays_only_for_clients_its_cidr_table_allows(tmp_path):
    table = _client_table(tmp_path, "127.0.0.5 OK\n")
    with PostfixInstance(tmp_path / "postfix", f"check_client_access cidr:{table}") as postfix:
        assert try_relay("127.0.0.1", postfix.port, source="127.0.0.5") == POSTFIX_ACCEPTS
        assert try_relay("127.0.0.1", postfix.port, source="127.0.0.6") == POSTFIX_REFUSES
        assert "RCPT from unknown[127.0.0.6]: 554 5.7.1" in postfix.wait_for_log("NOQUEUE: reject")


def test_postfix_discards_a_relayed_message(tmp_path):
    table = _client_table(tmp_path, "127.0.0.5 OK\n")
    with PostfixInstance(tmp_path / "postfix", f"check_client_access cidr:{table}") as postfix:
        code, text = send_message("127.0.0.1", postfix.port, source="127.0.0.5")
        assert code == 250 and text.startswith("2.0.0 Ok: queued as ")
        queue_id = text.rsplit(" ", 1)[1]
        assert "status=sent (poplock-test)" in postfix.wait_for_log(f"{queue_id}: to=<{FOREIGN_RECIPIENT}>")


def test_postfix_instances_run_side_by_side_with_their_own_restrictions(tmp_path):
    table = _client_table(tmp_path, "127.0.0.5 OK\n")
    with PostfixInstance(tmp_path / "allowing", f"check_client_access cidr:{table}") as allowing, \
            PostfixInstance(tmp_path / "rejecting", "reject") as rejecting:
        assert try_relay("127.0.0.1", allowing.port, source="127.0.0.5") == POSTFIX_ACCEPTS
        assert try_relay("127.0.0.1", rejecting.port, source="127.0.0.5") == (
            554, f"5.7.1 <{FOREIGN_RECIPIENT}>: Recipient address rejected: Access denied")
        # permit_mynetworks comes before the restriction.
        assert try_relay("127.0.0.1", rejecting.port, source="127.0.0.1") == POSTFIX_ACCEPTS


def test_postfix_refuses_relaying_when_the_policy_service_is_down(tmp_path):
    closed_port = free_port()
    # default_action=DUNNO hands the decision on to reject_unauth_destination: fail closed.
    # try_limit=1 saves the second attempt, which Postfix makes a second later.
    restriction = (f"check_policy_service {{ inet:127.0.0.1:{closed_port}, "
                   "timeout=2s, try_limit=1, default_action=DUNNO }")
    with PostfixInstance(tmp_path / "postfix", restriction) as postfix:
        assert try_relay("127.0.0.1", postfix.port, source="127.0.0.5") == POSTFIX_REFUSES
        problem = postfix.wait_for_log(f"problem talking to server 127.0.0.1:{closed_port}")
        assert "Connection refused" in problem


def test_postfix_defers_when_the_policy_service_is_down_without_a_default_action(tmp_path):
    closed_port = free_port()
    restriction = f"check_policy_service {{ inet:127.0.0.1:{closed_port}, try_limit=1 }}"
    with PostfixInstance(tmp_path / "postfix", restriction) as postfix:
        assert try_relay("127.0.0.1", postfix.port, source="127.0.0.5") == (
            451, f"4.3.5 <{FOREIGN_RECIPIENT}>: Recipient address rejected: Server configuration problem")


def test_a_stopped_postfix_instance_leaves_its_directory_to_the_next(tmp_path):
    directory = tmp_path / "postfix"
    with PostfixInstance(directory, "reject"):
        pass
    # A master still holding the directory's lock would make this start fail.
    table = _client_table(tmp_path, "127.0.0.5 OK\n")
    with PostfixInstance(directory, f"check_client_access cidr:{table}") as postfix:
        assert try_relay("127.0.0.1", postfix.port, source="127.0.0.5") == POSTFIX_ACCEPTS


def test_a_restriction_list_postfix_rejects_fails_start_with_its_reason(tmp_path):
    # `permit` makes the reject_unauth_destination after it unreachable, which smtpd refuses.
    with pytest.raises(RuntimeError, match="specify at least one working instance"):
        with PostfixInstance(tmp_path / "postfix", "permit"):
            pass
