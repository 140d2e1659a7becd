"""Open IMAP connections keep the relay: a real Dovecot logging into a real journald, a running
poplock-reader, real Postfix asking poplock-policy, and a window of seconds.

A client that stays connected relays long past the window; after it logs out it relays for the
window and then is refused; a second connection of the same client keeps the grant after the first
logs out; `poplock remove` ends the session at once; the reader killed with -9 resumes with the same
sessions; a Dovecot restart ends the sessions of clients still connected.
"""

import json
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from support.dovecot import Dovecot
from support.journald import unique_tag
from support.mailclients import imap_connection
from support.poplock import PolicyProcess, ReaderProcess, Setup
from support.ports import free_port
from support.postfix import PostfixInstance
from support.smtpservers import try_relay

WINDOW = 5  # seconds
USERS = {"alice": "secret"}


class Site:
    def __init__(self, setup, dovecot, postfix):
        self.setup = setup
        self.dovecot = dovecot
        self.postfix = postfix
        self.reader = ReaderProcess(setup)

    def connect(self, source: str):
        return imap_connection("127.0.0.1", self.dovecot.imap_port, "alice", "secret", source=source)

    def relays(self, source: str) -> bool:
        code, text = try_relay("127.0.0.1", self.postfix.port, source=source)
        assert code in (250, 554), text
        return code == 250

    def grant(self, address: str) -> dict | None:
        for line in self.setup.run("show", "--json", "--all", check=True).stdout.splitlines():
            record = json.loads(line)
            if record["kind"] == "grant" and record["address"] == address:
                return record
        return None

    def wait_for_sessions(self, address: str, count: int, timeout: float = 10.0) -> dict:
        """The grant once the reader has read its client's connections: `count` open."""
        deadline = time.monotonic() + timeout
        while True:
            record = self.grant(address)
            if record is not None and record["sessions"] == count:
                return record
            if time.monotonic() > deadline:
                raise TimeoutError(f"{address}: {count} open sessions not read within {timeout}s: {record}")
            time.sleep(0.05)


@pytest.fixture(scope="module")
def site(journald, tmp_path_factory):
    directory = tmp_path_factory.mktemp("sessions")
    tag = unique_tag("dovecot")
    setup = Setup(directory, window=f"{WINDOW}s", extra=f"\n[Source:dovecot]\nIdentifiers={tag}\n")
    port = free_port()
    restriction = f"check_policy_service {{ inet:127.0.0.1:{port}, timeout=2s, try_limit=1, default_action=DUNNO }}"
    # Dovecot's auth and mail processes run as other users: its files live outside pytest's
    # directory, which any pytest session starting meanwhile makes 0700 again.
    mail = Path(tempfile.mkdtemp(prefix="poplock-sessions-"))
    try:
        with Dovecot(mail / "dovecot", USERS, identifier=tag, tls=False) as dovecot, \
                PostfixInstance(directory / "postfix", restriction) as postfix, \
                PolicyProcess(setup, f"127.0.0.1:{port}"):
            site = Site(setup, dovecot, postfix)
            try:
                yield site
            finally:
                site.reader.stop()
                site.reader.notify.close()
    finally:
        shutil.rmtree(mail, ignore_errors=True)


def wait_past(deadline: float) -> None:
    """Wait until the wall clock has passed `deadline` (a grant's expiry, whole seconds)."""
    while time.time() < deadline + 0.3:
        time.sleep(0.1)


def seconds(text: str) -> float:
    import datetime

    return datetime.datetime.fromisoformat(text).timestamp()


def test_a_connected_client_relays_past_the_window_and_after_its_logout_for_the_window_only(site):
    client = site.connect("127.0.0.61")
    held = site.wait_for_sessions("127.0.0.61", 1)
    wait_past(seconds(held["released_expires"]))  # its login's own window is over
    assert site.relays("127.0.0.61")
    client.logout()
    released = site.wait_for_sessions("127.0.0.61", 0)
    assert seconds(released["expires"]) > seconds(held["released_expires"])  # the window runs from the logout
    assert site.relays("127.0.0.61")
    wait_past(seconds(released["expires"]))
    assert not site.relays("127.0.0.61")


def test_a_second_connection_of_the_client_keeps_the_grant_after_the_first_logs_out(site):
    first = site.connect("127.0.0.62")
    second = site.connect("127.0.0.62")
    held = site.wait_for_sessions("127.0.0.62", 2)
    first.logout()
    site.wait_for_sessions("127.0.0.62", 1)
    wait_past(max(seconds(held["released_expires"]), time.time() + WINDOW))  # the first logout's window too
    assert site.relays("127.0.0.62")
    second.logout()
    released = site.wait_for_sessions("127.0.0.62", 0)
    wait_past(seconds(released["expires"]))
    assert not site.relays("127.0.0.62")


def test_poplock_remove_ends_the_session_of_a_connected_client_at_once(site):
    client = site.connect("127.0.0.63")
    site.wait_for_sessions("127.0.0.63", 1)
    removed = site.setup.run("remove", "127.0.0.63", check=True)
    assert removed.stdout == "removed the grant for 127.0.0.63, ending its 1 open session\n"
    assert not site.relays("127.0.0.63")
    client.logout()  # its end line brings nothing back
    assert not site.relays("127.0.0.63")
    assert site.grant("127.0.0.63") is None


def test_the_reader_killed_with_9_while_sessions_are_open_resumes_with_the_same_sessions(site):
    client = site.connect("127.0.0.64")
    held = site.wait_for_sessions("127.0.0.64", 1)
    site.reader.kill()
    site.reader.notify.close()
    site.reader = ReaderProcess(site.setup)  # as systemd restarts it; READY=1 once in place
    assert site.grant("127.0.0.64") == held
    wait_past(seconds(held["released_expires"]))
    assert site.relays("127.0.0.64")
    client.logout()  # read by the new reader: it knew the session
    released = site.wait_for_sessions("127.0.0.64", 0)
    assert site.relays("127.0.0.64")
    wait_past(seconds(released["expires"]))
    assert not site.relays("127.0.0.64")


def test_a_dovecot_restart_ends_the_session_of_a_client_still_connected(site):
    client = site.connect("127.0.0.65")
    held = site.wait_for_sessions("127.0.0.65", 1)
    wait_past(seconds(held["released_expires"]))
    assert site.relays("127.0.0.65")
    site.dovecot.stop()  # its mail processes go without a logout line: Dovecot's own stop line ends them
    released = site.wait_for_sessions("127.0.0.65", 0)
    assert site.relays("127.0.0.65")  # for the window after the restart
    site.dovecot.start()
    wait_past(seconds(released["expires"]))
    assert not site.relays("127.0.0.65")
    client.shutdown()
