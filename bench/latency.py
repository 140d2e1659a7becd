"""Delay from a login entry being sent to the journal until the client may relay, on a real journald.

A running poplock-reader follows the journal, with 5,000 live grants already in its
store (a busy site: each commit must not cost what the store holds); 500 Dovecot login
lines are sent one at a time (as root, like Dovecot's log process); after each, the
answer `poplock check` gives is polled in-process (poplock.access.check_relay_in_files,
the function behind the command) until it says yes; as for a client, a refusal first asks
the reader to read the journal up to now (on its [Store] ReaderSocket=, for at most
ReaderWait=). Baselines, in the same run, for the same kind of entry: a follower that
waits on the journal's change notification (as `journalctl -f` does), and the moment the
entry can be read back at all (a reader re-reading in a tight loop).
Goal: p99 at most 20 ms (log watchers that poll wake every 1 to 10 seconds).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from common import Setup, bench_setup, fill_store, grant_address, median, percentile
from support.journald import ensure_journald, unique_tag
from support.poplock import ReaderProcess
from systemd import journal

from poplock.access import check_relay_in_files
from poplock.config import load_config

LOGINS = int(__import__("os").environ.get("LOGINS", "500"))
STORED_GRANTS = 5000
LOGIN_TIMEOUT = 30.0


def login_line(address: str) -> str:
    # A user of its own for each client: one user's logins open at most MaxAddressesPerUser relays.
    return (f"pop3-login: Login: user=<user-{address}>, method=PLAIN, rip={address}, lip=127.0.0.1, mpid=4242, "
            f"session=<b7aS8S1hfbZ/AAAF>")


def journal_delivery(tag: str, *, notified: bool, logins: int) -> list[float]:
    """Send an entry, wait until a journal reader sees it: on the journal's notification, or re-reading.

    A notified reader waits at most a second for each notification, so that this
    baseline ends even when journald's notifications come late or not at all."""
    reader = journal.Reader()
    reader.add_match(SYSLOG_IDENTIFIER=tag)
    reader.seek_tail()
    reader.get_previous()
    reader.fileno()  # sets up the notification before the first entry is sent
    delays = []
    for index in range(logins):
        message = login_line(f"10.99.{index >> 8}.{index & 255}")
        started = time.perf_counter()
        journal.send(message, SYSLOG_IDENTIFIER=tag)
        while reader.get_next() == {}:
            if notified:
                reader.wait(1)
            else:
                time.sleep(0.0002)
                reader.process()  # notices a rotated journal file, as any follower must
                if time.perf_counter() - started > HELD_BACK_AFTER and _newest(tag) == message:
                    # systemd 252's reader with matches sometimes keeps the newest entry back until
                    # another comes (follow.py): readable all the same, as a fresh reader shows.
                    reader.seek_tail()
                    reader.get_previous()
                    break
            if time.perf_counter() - started > 10:
                raise RuntimeError(f"an entry sent 10s ago is not readable: {message}")
        delays.append(time.perf_counter() - started)
    reader.close()
    return delays


HELD_BACK_AFTER = 0.05  # seconds: then a fresh reader looks too (journal_delivery)


def _newest(tag: str) -> str | None:
    """The MESSAGE of the newest entry of `tag`, as a fresh reader finds it."""
    fresh = journal.Reader()
    try:
        fresh.add_match(SYSLOG_IDENTIFIER=tag)
        fresh.seek_tail()
        entry = fresh.get_previous()
        return entry.get("MESSAGE") if entry else None
    finally:
        fresh.close()


def login_delay(tag: str, config, address: str) -> tuple[float, float]:
    """Send one login from `address`; (when it was sent, when `poplock check` first said yes), in
    perf_counter seconds. A login still refused after LOGIN_TIMEOUT seconds is an error, not a figure."""
    started = time.perf_counter()
    journal.send(login_line(address), SYSLOG_IDENTIFIER=tag)
    while not check_relay_in_files(config, address, time.time()).allowed:
        if time.perf_counter() - started > LOGIN_TIMEOUT:
            raise RuntimeError(f"a login from {address} was sent {LOGIN_TIMEOUT:.0f}s ago, and it may not relay yet")
        time.sleep(0.0002)
    return started, time.perf_counter()


def poplock_delay(tag: str, setup: Setup, logins: int = LOGINS, network: str = "10.98") -> list[float]:
    config = load_config(str(setup.config))
    delays = []
    for index in range(logins):
        started, allowed = login_delay(tag, config, grant_address(network, index))
        delays.append(allowed - started)
    return delays


def main() -> None:
    ensure_journald()
    with tempfile.TemporaryDirectory(prefix="poplock-bench-") as scratch:
        tag = unique_tag("dovecot-bench")
        setup = bench_setup(Path(scratch), extra=f"\n[Source:dovecot]\nIdentifiers={tag}\n")
        readable = journal_delivery(tag + "-readable", notified=False, logins=LOGINS)
        # Fewer: each can take up to half a second, which is the point of measuring it.
        notified = journal_delivery(tag + "-notified", notified=True, logins=min(LOGINS, 100))
        fill_store(setup, "10.60", STORED_GRANTS)
        with ReaderProcess(setup):
            delays = poplock_delay(tag, setup)
    print(f"login-to-relay delay over {LOGINS} logins on a real journald ({len(notified)} for the woken follower), "
          f"{STORED_GRANTS} grants stored")
    for name, values in (("entry readable (tight re-reading)", readable),
                         ("follower woken by the journal", notified),
                         ("poplock: sent -> check says yes", delays)):
        print(f"  {name:34} p50 {median(values) * 1000:7.2f} ms   p99 {percentile(values, 0.99) * 1000:7.2f} ms"
              f"   max {max(values) * 1000:7.2f} ms")
    print(f"  poplock p99 / woken-by-the-journal p99: {percentile(delays, 0.99) / percentile(notified, 0.99):.2f}x")
    print("  goal: poplock p99 at most 20 ms")


if __name__ == "__main__":
    main()
