"""Sessions with the other IMAP servers that run here, live: Courier imapd, Cyrus imapd and GNU mailutils
imap4d each log into a journald of their own, read by `poplock-reader --once` with the built-in source as
poplock ships it and a window of seconds. A client that stays connected relays past the window; once it has
logged out it relays for the window after, then not. (Dovecot: test_sessions_live.py, with Postfix.)
"""

from __future__ import annotations

import datetime
import json
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from support import popservers
from support.journald import PrivateJournald
from support.mailclients import imap_connection
from support.poplock import Setup

pytestmark = pytest.mark.system

WINDOW = 6  # seconds: each check runs the reader once more, which takes a while on a busy machine
USERS = {"alice": "alice-secret-1", "bob": "bob-secret-2"}
# mailutils' imap4d writes its login as the mail user (the first of them here): a plain journald
# needs LoginUsers= for it, as in test_pop_servers_live.py; its listener (root) logs the end.
SERVERS = {
    "courier": (popservers.Courier, ""),
    "cyrus": (popservers.Cyrus, ""),
    "mailutils": (popservers.Mailutils, f"[Source:mailutils]\nLoginUsers={popservers.Popa3d.FIRST_UID}\n"),
}


@pytest.fixture(params=list(SERVERS))
def server(request, journald, unpacked_servers):
    name = request.param
    support_class, settings = SERVERS[name]
    # Not under pytest's temporary folder, which any pytest starting meanwhile makes private again.
    directory = Path(tempfile.mkdtemp(prefix=f"poplock-sessions-{name}-"))
    directory.chmod(0o755)
    try:
        with PrivateJournald(directory / "journal") as journal, \
                support_class(directory / "server", USERS, journal_sockets=journal.sockets) as running:
            (directory / "poplock").mkdir()
            setup = Setup(directory / "poplock", window=f"{WINDOW}s", extra=f"Sources={name}\n{settings}")
            yield name, running, journal, setup
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def grant(setup: Setup, journal: PrivateJournald, address: str) -> dict | None:
    """The client's grant, once `poplock-reader --once` has read the server's journal as it is now."""
    setup.run_reader("-D", str(journal.storage))
    for line in setup.run("show", "--json", "--all", check=True).stdout.splitlines():
        record = json.loads(line)
        if record["kind"] == "grant" and record["address"] == address:
            return record
    return None


def wait_for_sessions(setup: Setup, journal: PrivateJournald, address: str, count: int,
                      timeout: float = 15.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        record = grant(setup, journal, address)
        if record is not None and record["sessions"] == count:
            return record
        if time.monotonic() > deadline:
            raise TimeoutError(f"{address}: {count} open sessions not read within {timeout}s: {record}")
        time.sleep(0.1)


def wait_past(text: str) -> None:
    deadline = datetime.datetime.fromisoformat(text).timestamp()
    while time.time() < deadline + 0.3:
        time.sleep(0.1)


def test_a_connected_imap_client_relays_past_the_window_and_after_its_logout_for_the_window_only(server):
    name, running, journal, setup = server
    client = imap_connection("127.0.0.1", running.imap_port, "alice", USERS["alice"], source="127.32.0.2")
    try:
        held = wait_for_sessions(setup, journal, "127.32.0.2", 1)
        wait_past(held["released_expires"])
        assert grant(setup, journal, "127.32.0.2")["live"], f"{name}: the open connection no longer holds the grant"
        assert setup.may_relay("127.32.0.2")
    finally:
        client.logout()
    released = wait_for_sessions(setup, journal, "127.32.0.2", 0)
    assert setup.may_relay("127.32.0.2")
    wait_past(released["expires"])
    assert not setup.may_relay("127.32.0.2")
