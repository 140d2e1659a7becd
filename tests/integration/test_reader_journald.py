"""poplock-reader as a daemon on a real journald: readiness, status, watchdog, stop, forgeries, crashes.

Each test gives its source a unique SYSLOG_IDENTIFIER and logs login lines as root
(Dovecot's log process runs as root), so other tests' entries in the machine-wide
journal never mix in.
"""

import json
import re
import subprocess
import threading
import time

import pytest
from support.journald import unique_tag
from support.poplock import ReaderProcess, Setup
from systemd import journal

from poplock.store import read_snapshot


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


def log_as_root(setup, message: str) -> None:
    journal.send(message, SYSLOG_IDENTIFIER=setup.tag)


def grants(setup) -> dict:
    shown = setup.run("show", "--json", check=True).stdout.splitlines()
    return {record["address"]: record for record in map(json.loads, shown) if record["kind"] == "grant"}


def test_the_reader_says_ready_then_grants_a_login_as_soon_as_it_is_logged(tagged):
    with ReaderProcess(tagged) as reader:
        assert reader.notify.wait_for("STATUS=").startswith("STATUS=watching dovecot")
        log_as_root(tagged, login_line("192.0.2.7"))
        tagged.wait_until_allowed("192.0.2.7")
        status = reader.notify.wait_for("STATUS=watching dovecot; 1 grants stored; last login 192.0.2.7")
        assert "at 20" in status
        assert reader.stop() == 0
        assert reader.notify.received("STOPPING=1")
    assert "granted 192.0.2.7 until" in reader.output()


def test_a_forged_entry_from_an_unprivileged_user_grants_nothing(tagged):
    with ReaderProcess(tagged) as reader:
        # What any local user can do: claim the identifier with logger(1).
        subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                        "logger", "-t", tagged.tag, login_line("203.0.113.66")], check=True)
        log_as_root(tagged, login_line("192.0.2.8"))  # a genuine one after it, to know the forgery was read
        tagged.wait_until_allowed("192.0.2.8")
        reader.stop()
    assert list(grants(tagged)) == ["192.0.2.8"]
    assert not tagged.may_relay("203.0.113.66")


def test_the_reader_pings_the_watchdog_when_the_unit_asks(tagged):
    with ReaderProcess(tagged, environment={"WATCHDOG_USEC": "200000"}) as reader:
        reader.notify.wait_for("WATCHDOG=1", timeout=5)
        first_count = len(reader.notify.received("WATCHDOG=1"))
        deadline = time.monotonic() + 5
        while len(reader.notify.received("WATCHDOG=1")) < first_count + 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(reader.notify.received("WATCHDOG=1")) >= first_count + 2  # keeps pinging while idle


def test_a_configuration_error_stops_start_up_with_exit_78_and_the_place(tmp_path):
    setup = Setup(tmp_path, extra="Sorces=dovecot\n")
    result = setup.run_reader(check=False)
    assert result.returncode == 78
    assert f"{setup.config}:11: [Reader] Sorces: unknown setting (did you mean Sources?)" in result.stderr


def test_restarts_between_batches_lose_nothing_and_replay_nothing(tagged):
    for batch in range(3):
        with ReaderProcess(tagged, "--verbose") as reader:
            for index in range(20):
                log_as_root(tagged, login_line(f"10.66.{batch}.{index}"))
            tagged.wait_until_allowed(f"10.66.{batch}.19")
            if batch == 0:
                tagged.run("remove", "10.66.0.3", check=True)
            reader.stop()
        assert "changes nothing" not in reader.output()
    found = grants(tagged)
    assert len(found) == 59 and "10.66.0.3" not in found


def test_kill_9_in_the_middle_of_a_burst_loses_nothing_and_replays_nothing(tagged):
    addresses = [f"10.77.{index >> 8}.{index & 255}" for index in range(1500)]

    def burst():  # about two seconds of logins, so the kill lands mid-burst
        for address in addresses:
            log_as_root(tagged, login_line(address))
            time.sleep(0.001)

    sender = threading.Thread(target=burst)
    first = ReaderProcess(tagged, "--verbose")
    sender.start()
    try:
        _wait_then_kill(tagged, first)
    finally:
        first.notify.close()

    committed = sorted(grants(tagged))
    removed = committed[:5]
    for address in removed:
        tagged.run("remove", address, check=True)
    sender.join()
    with ReaderProcess(tagged, "--verbose") as second:
        tagged.wait_until_allowed(addresses[-1], timeout=30)
        second.stop()
    found = grants(tagged)
    assert set(found) == set(addresses) - set(removed)  # nothing lost, removed ones stay removed
    log = first.output() + second.output()
    assert "changes nothing" not in log  # no login was read twice
    granted = re.findall(r"granted (\S+) until", log)
    # Each login granted once. (The killed reader may have died between committing a
    # batch and logging it, so its last lines can be missing, never doubled.)
    assert len(granted) == len(set(granted))
    assert 0 < len(committed) < len(addresses)  # the kill really came mid-burst


def _wait_then_kill(setup, reader) -> None:
    deadline = time.monotonic() + 30
    while len(read_snapshot(str(setup.store), 1.0).grants) < 300 and time.monotonic() < deadline:
        time.sleep(0.001)
    reader.kill()  # mid-burst, wherever it was


def test_a_journal_rotation_while_following_loses_nothing_and_replays_nothing(tagged):
    import subprocess as run

    with ReaderProcess(tagged, "--verbose") as reader:
        log_as_root(tagged, login_line("10.88.0.1"))
        tagged.wait_until_allowed("10.88.0.1")
        # journald rotates on SIGUSR2 (what `journalctl --rotate` asks for): new files, old ones archived.
        journald_pid = run.run(["pgrep", "-o", "-x", "systemd-journal"], capture_output=True, text=True,
                               check=True).stdout.split()[0]
        run.run(["kill", "-USR2", journald_pid], check=True)
        for index in range(2, 6):
            log_as_root(tagged, login_line(f"10.88.0.{index}"))
        tagged.wait_until_allowed("10.88.0.5")
        reader.stop()
    assert sorted(grants(tagged)) == [f"10.88.0.{index}" for index in range(1, 6)]
    assert "changes nothing" not in reader.output()


def test_logins_journald_archives_before_the_reader_has_read_them_are_read_all_the_same(tagged):
    """Caught up, the reader follows only the files journald writes (follow.py's live files): the file
    archived by a rotation is still read to its end, whatever it holds that the reader had not read yet."""
    import subprocess as run

    journald_pid = run.run(["pgrep", "-o", "-x", "systemd-journal"], capture_output=True, text=True,
                           check=True).stdout.split()[0]
    with ReaderProcess(tagged) as reader:
        log_as_root(tagged, login_line("10.89.0.1"))
        tagged.wait_until_allowed("10.89.0.1")  # read to the end: following the live files now
        for rotation in range(3):
            for index in range(40):
                log_as_root(tagged, login_line(f"10.89.{rotation + 1}.{index}"))
            run.run(["kill", "-USR2", journald_pid], check=True)  # while the reader may be reading them
        log_as_root(tagged, login_line("10.89.9.9"))
        tagged.wait_until_allowed("10.89.9.9")
        reader.stop()
    expected = {"10.89.0.1", "10.89.9.9"} | {f"10.89.{rotation + 1}.{index}" for rotation in range(3)
                                            for index in range(40)}
    assert set(grants(tagged)) == expected
    assert "changes nothing" not in reader.output()


def test_a_reader_restarted_after_rotations_goes_on_after_its_cursor_in_an_archived_file(tagged):
    """Its last entry is in a file journald archived since: it is not among the files followed once
    caught up (follow.py's live files), and seeking its cursor there must not read anything again."""
    import subprocess as run

    journald_pid = run.run(["pgrep", "-o", "-x", "systemd-journal"], capture_output=True, text=True,
                           check=True).stdout.split()[0]
    first_login = login_line("10.90.0.1").replace("mpid=4242", "mpid=4243").replace("AAAF>", "AAAG>")
    with ReaderProcess(tagged, "--verbose") as first:
        log_as_root(tagged, first_login)
        tagged.wait_until_allowed("10.90.0.1")
        first.stop()
    before = grants(tagged)
    for _ in range(2):
        run.run(["kill", "-USR2", journald_pid], check=True)
        time.sleep(0.3)  # journald rotates asynchronously
    with ReaderProcess(tagged, "--verbose") as second:
        log_as_root(tagged, login_line("10.90.0.2"))  # another session
        tagged.wait_until_allowed("10.90.0.2")
        second.stop()
    assert "10.90.0.1" not in second.output(), second.output()  # not read again
    assert grants(tagged)["10.90.0.1"] == before["10.90.0.1"]
