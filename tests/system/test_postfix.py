"""Real Postfix asking poplock-policy whether a client may relay (check_policy_service)."""

import time

import pytest
from support.poplock import PolicyProcess
from support.ports import free_port
from support.postfix import PostfixInstance
from support.smtpservers import try_relay

from poplock.grants import Grant
from poplock.storewriter import StoreWriter

GRANTED = "127.0.0.5"
STRANGER = "127.0.0.6"


@pytest.fixture
def postfix(setup, tmp_path):
    """Postfix with the documented fail-closed policy settings, and poplock-policy behind it."""
    port = free_port()
    restriction = f"check_policy_service {{ inet:127.0.0.1:{port}, timeout=2s, try_limit=1, default_action=DUNNO }}"
    setup.run("add", GRANTED, check=True)
    with PostfixInstance(tmp_path / "postfix", restriction) as instance:
        policy = PolicyProcess(setup, f"127.0.0.1:{port}")
        try:
            yield instance, policy
        finally:
            if policy.process.poll() is None:
                policy.stop()


def test_a_granted_client_relays_and_a_stranger_is_refused(postfix, setup):
    instance, policy = postfix
    assert try_relay("127.0.0.1", instance.port, source=GRANTED) == (250, "2.1.5 Ok")
    code, text = try_relay("127.0.0.1", instance.port, source=STRANGER)
    assert code == 554 and text.endswith("Relay access denied")


def test_after_the_grant_is_removed_the_client_is_refused_again(postfix, setup):
    instance, policy = postfix
    assert try_relay("127.0.0.1", instance.port, source=GRANTED)[0] == 250
    setup.run("remove", GRANTED, check=True)
    assert try_relay("127.0.0.1", instance.port, source=GRANTED)[0] == 554


def test_after_the_grant_expires_the_client_is_refused_again(postfix, setup):
    instance, policy = postfix
    now = int(time.time())
    with StoreWriter(str(setup.store)).transaction() as transaction:
        transaction.grants[GRANTED] = Grant(GRANTED, now - 1, now - 1801, "dovecot")
    assert try_relay("127.0.0.1", instance.port, source=GRANTED)[0] == 554


def test_with_the_policy_service_stopped_postfix_fails_closed(postfix, setup):
    instance, policy = postfix
    policy.stop()
    code, text = try_relay("127.0.0.1", instance.port, source=GRANTED)
    assert code == 554 and text.endswith("Relay access denied")
    assert instance.wait_for_log("problem talking to server")
