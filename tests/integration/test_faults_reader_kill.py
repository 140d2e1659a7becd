"""Fault suite: poplock-reader killed with SIGKILL again and again under a stream of logins: nothing is
lost, replayed or left stale.

A sender thread logs distinct Dovecot logins to the real journald, as root and under this test's own
SYSLOG_IDENTIFIER, while a loop starts a reader, lets it run a random (seeded) short while and kills it
with SIGKILL, wherever it is: reading, committing, logging (the stream never runs more than a few dozen
logins ahead of the kills, so that it lasts until the last one). Between kills `poplock remove` withdraws the
newest committed grant now and then. A last reader then catches up, and:

  * nothing is lost: every address logged is granted, but the removed ones;
  * nothing is replayed: no reader says a login "changes nothing", and no address is "granted" twice
    across all the readers' logs (a killed reader may die between committing and logging, so lines may
    be missing, never doubled);
  * nothing is stale: the removed grants stay removed, and the store holds exactly (logged) - (removed).

POPLOCK_FAULT_SEED=N replays one sequence of run times.
"""

from __future__ import annotations

import os
import random
import re
import threading
import time
from collections import Counter

import pytest
from support.journald import unique_tag
from support.poplock import ReaderProcess, Setup
from systemd import journal

from poplock.store import read_snapshot

KILLS = 60
KILLS_UNDER_TRAFFIC = 50  # at least this many while logins kept coming
LONGEST_RUN = 0.2  # seconds a reader runs after READY=1, at most, before its SIGKILL
LOGIN_PACE = 0.005  # seconds between two logins
LOGINS_PER_KILL = 60  # the stream never runs ahead of the kills by more, so it lasts until the last one
REMOVE_EVERY = 10  # kills
SEED = int(os.environ.get("POPLOCK_FAULT_SEED", "20251202"))


def login_line(address: str) -> str:
    # A user of its own for each client: one user's logins open at most MaxAddressesPerUser relays.
    return (f"pop3-login: Login: user=<user-{address}>, method=PLAIN, rip={address}, lip=127.0.0.1, mpid=4242, "
            f"session=<b7aS8S1hfbZ/AAAF>")


@pytest.fixture
def tagged(journald, tmp_path):
    """A Setup whose dovecot source reads only this test's identifier."""
    tag = unique_tag()
    setup = Setup(tmp_path, extra=f"\n[Source:dovecot]\nIdentifiers={tag}\n")
    setup.tag = tag
    return setup


class LoginStream(threading.Thread):
    """Distinct logins, one every LOGIN_PACE seconds, as many as allow() lets through, until stopped."""

    def __init__(self, tag: str):
        super().__init__(daemon=True)
        self.tag = tag
        self.sent: list[str] = []  # in the order logged
        self._allowed = 0
        self._stopped = False
        self._changed = threading.Condition()

    def allow(self, count: int) -> None:
        with self._changed:
            self._allowed = count
            self._changed.notify_all()

    def run(self) -> None:
        for index in range(LOGINS_PER_KILL * (KILLS + 1)):  # bounded whatever happens
            with self._changed:
                self._changed.wait_for(lambda index=index: self._stopped or index < self._allowed)
                if self._stopped:
                    return
            address = f"10.99.{index >> 8}.{index & 255}"
            journal.send(login_line(address), SYSLOG_IDENTIFIER=self.tag)
            self.sent.append(address)
            with self._changed:
                self._changed.wait_for(lambda: self._stopped, timeout=LOGIN_PACE)

    def stop(self) -> None:
        with self._changed:
            self._stopped = True
            self._changed.notify_all()
        self.join(30)


def committed_grants(setup) -> dict:
    return read_snapshot(str(setup.store), busy_timeout=1.0).grants


def test_sixty_kill_9s_under_a_stream_of_logins_lose_nothing_replay_nothing_and_leave_nothing_stale(tagged):
    chance = random.Random(SEED)
    context = f"(POPLOCK_FAULT_SEED={SEED})"
    stream = LoginStream(tagged.tag)
    readers, removed = [], []
    kills_under_traffic = kills_after_progress = left_new = 0
    stored_before = 0
    stream.start()
    try:
        for kill in range(1, KILLS + 1):
            stream.allow((kill + 1) * LOGINS_PER_KILL)
            sent_before = len(stream.sent)
            reader = ReaderProcess(tagged, "--verbose")  # returns once it has sent READY=1
            try:
                time.sleep(chance.uniform(0, LONGEST_RUN))  # how long it runs is the fault's random part
                kills_under_traffic += len(stream.sent) > sent_before
                assert reader.process.poll() is None, f"a reader exited by itself:\n{reader.output()}"
                reader.kill()
            finally:
                reader.notify.close()
            readers.append(reader)
            mid_commit = os.path.exists(f"{tagged.store}.new")
            left_new += mid_commit
            stored = committed_grants(tagged)
            kills_after_progress += len(stored) + len(removed) > stored_before
            stored_before = len(stored) + len(removed)
            # Withdraw the newest committed grant, while no reader runs: every so often, and whenever the
            # kill came in the middle of a commit, where a cursor committed apart from its grants would
            # make the next reader grant it again.
            if kill % REMOVE_EVERY == 0 or mid_commit:
                newest = [address for address in list(stream.sent) if address in stored and address not in removed]
                if newest:
                    tagged.run("remove", newest[-1], check=True)
                    removed.append(newest[-1])
    finally:
        stream.stop()

    sentinel = "10.98.0.1"  # logged last: once it is granted, every login before it has been read
    journal.send(login_line(sentinel), SYSLOG_IDENTIFIER=tagged.tag)
    logged = [*stream.sent, sentinel]
    with ReaderProcess(tagged, "--verbose") as last:
        tagged.wait_until_allowed(sentinel, timeout=60)
        assert last.stop() == 0
    readers.append(last)

    print(f"\n{context} {KILLS} kills: {kills_under_traffic} with logins arriving while the reader ran, "
          f"{kills_after_progress} after the reader had committed something, {left_new} in the middle of a commit; "
          f"{len(logged)} logins, {len(removed)} grants removed")
    assert kills_under_traffic >= KILLS_UNDER_TRAFFIC, f"too few readers were killed under logins {context}"
    assert kills_after_progress >= KILLS // 3, f"most readers were killed before they did anything {context}"
    assert len(removed) >= KILLS // REMOVE_EVERY, context

    final = committed_grants(tagged)
    lost = [address for address in logged if address not in final and address not in removed]
    assert not lost, f"{len(lost)} logins lost, e.g. {lost[:5]} {context}"
    stale = [address for address in removed if address in final]
    assert not stale, f"removed grants came back: {stale} {context}"
    assert set(final) == set(logged) - set(removed), (
        f"grants nobody logged: {sorted(set(final) - set(logged))[:5]} {context}")

    logs = [reader.output() for reader in readers]
    replays = [line for log in logs for line in log.splitlines() if "changes nothing" in line]
    assert not replays, f"{len(replays)} logins read again, e.g. {replays[:3]} {context}"
    granted = [address for log in logs for address in re.findall(r"(?:granted|extended) (\S+) until", log)]
    doubled = sorted(address for address, times in Counter(granted).items() if times > 1)
    assert not doubled, f"granted more than once: {doubled[:5]} {context}"
    assert set(granted) <= set(logged), context
