"""Sessions on real journal files made with systemd-journal-remote, read by poplock-reader: an open
connection holds its grant, its end (a logout, a restart, PID 1 stopping the unit, the bound) releases it
for the window, `poplock remove` ends it, and restarts and rebuilds neither forget nor resurrect one."""

import json
import time
from pathlib import Path

import pytest
from support.journald import write_journal_file

from poplock.sessions import INDEX_PREFIX
from poplock.store import read_snapshot

WINDOW = 1800
HOUR = 3600


def login(address: str, pid: int, session: str, service: str = "imap", user: str = "alice") -> str:
    return (f"{service}-login: Login: user=<{user}>, method=PLAIN, rip={address}, lip=192.0.2.1, mpid={pid}, TLS, "
            f"session=<{session}>")


def logout(pid: int, session: str, service: str = "imap", user: str = "alice") -> str:
    return (f"{service}({user})<{pid}><{session}>: Disconnected: Logged out in=32 out=796 deleted=0 expunged=0 "
            "trashed=0 hdr_count=0 hdr_bytes=0 body_count=0 body_bytes=0")


def dovecot(message: str, at: float, **trusted) -> dict:
    """An entry as Dovecot's log process writes it under a plain journald (root, SYSLOG_IDENTIFIER=dovecot)."""
    fields = {"__REALTIME_TIMESTAMP": int(at * 1e6), "MESSAGE": message, "SYSLOG_IDENTIFIER": "dovecot",
              "_UID": 0, "_GID": 0, "_COMM": "log", "_PID": 801, "_TRANSPORT": "syslog", "PRIORITY": 6}
    fields.update(trusted)
    return fields


def pid_1(message_id: str, unit: str, at: float, **fields) -> dict:
    entry = {"__REALTIME_TIMESTAMP": int(at * 1e6), "MESSAGE": f"Stopping {unit} - Dovecot IMAP/POP3 email server...",
             "MESSAGE_ID": message_id, "UNIT": unit, "SYSLOG_IDENTIFIER": "systemd", "_PID": 1, "_UID": 0, "_GID": 0,
             "_COMM": "systemd", "_SYSTEMD_UNIT": "init.scope", "_TRANSPORT": "journal", "PRIORITY": 6}
    entry.update(fields)
    return entry


STOPPING = "de5b426a63be47a7b6ac3eaac82e2f6f"


def grants(setup, *arguments: str) -> dict:
    shown = setup.run("show", "--json", *arguments, check=True).stdout.splitlines()
    return {record["address"]: record for record in map(json.loads, shown) if record["kind"] == "grant"}


def index(setup) -> dict:
    """The store's session index (sessions.py): key -> "ADDRESS OPENED_AT"."""
    return {name[len("session:"):]: value for name, value in read_snapshot(str(setup.store), 1.0).metadata.items()
            if name.startswith(INDEX_PREFIX[:-1])}


def configure(setup, grants_settings: str) -> None:
    setup.config.write_text(setup.config.read_text().replace("[Grants]\n", f"[Grants]\n{grants_settings}"))


@pytest.fixture
def journal(tmp_path) -> Path:
    directory = tmp_path / "journal"
    directory.mkdir()
    return directory / "remote.journal"


def test_a_client_still_connected_long_after_its_login_relays_and_show_says_what_holds_it(setup, journal):
    now = time.time()
    write_journal_file(journal, [dovecot(login("192.0.2.10", 100, "AAAAAAAAAAAAAA10"), now - 3 * HOUR)])
    setup.run_reader("--file", str(journal))
    assert setup.may_relay("192.0.2.10")
    record = grants(setup)["192.0.2.10"]
    assert record["sessions"] == 1 and record["live"]
    # Live past its login's window, until its session's bound; the window is all it has once that ends.
    assert _seconds(record["released_expires"]) == int(now - 3 * HOUR) + WINDOW
    assert _seconds(record["expires"]) == int(now - 3 * HOUR) + 12 * HOUR + WINDOW
    table = setup.run("show", check=True).stdout
    assert "held open by 1 session, at most until" in table
    assert "held open by 1 session while connected" in setup.run("check", "192.0.2.10").stdout
    assert index(setup) == {"dovecot:100/AAAAAAAAAAAAAA10": f"192.0.2.10 {int(now - 3 * HOUR)}"}


def test_after_its_logout_a_client_relays_for_the_window_from_the_logout_and_then_not(setup, journal):
    now = time.time()
    write_journal_file(journal, [
        dovecot(login("192.0.2.11", 101, "AAAAAAAAAAAAAA11"), now - 3 * HOUR),
        dovecot(logout(101, "AAAAAAAAAAAAAA11"), now - 60),  # logged out a minute ago
        dovecot(login("192.0.2.12", 102, "AAAAAAAAAAAAAA12"), now - 3 * HOUR),
        dovecot(logout(102, "AAAAAAAAAAAAAA12"), now - WINDOW - 5),  # the window after it has passed
    ])
    result = setup.run_reader("--file", str(journal))
    shown = grants(setup, "--all")
    assert shown["192.0.2.11"]["sessions"] == 0 and shown["192.0.2.11"]["expires"] == _iso(now - 60 + WINDOW)
    assert setup.may_relay("192.0.2.11") and not setup.may_relay("192.0.2.12")
    assert "released 192.0.2.11: its last session ended" in result.stderr
    assert index(setup) == {}


def test_a_second_connection_keeps_the_grant_after_the_first_logs_out(setup, journal):
    now = time.time()
    write_journal_file(journal, [
        dovecot(login("192.0.2.13", 103, "AAAAAAAAAAAAAA13"), now - 3 * HOUR),
        dovecot(login("192.0.2.13", 104, "AAAAAAAAAAAAAB13"), now - 2 * HOUR),
        dovecot(logout(103, "AAAAAAAAAAAAAA13"), now - WINDOW - 60),
    ])
    setup.run_reader("--file", str(journal))
    assert setup.may_relay("192.0.2.13") and grants(setup)["192.0.2.13"]["sessions"] == 1
    write_journal_file(journal, [dovecot(logout(104, "AAAAAAAAAAAAAB13"), now - WINDOW - 10)])
    setup.run_reader("--file", str(journal))
    assert not setup.may_relay("192.0.2.13")


@pytest.mark.parametrize("restart", [
    dovecot("master: Dovecot v2.3.19.1 (9b53102964) starting up for pop3, imap (core dumps disabled)", 0, _PID=900),
    dovecot("master: Warning: Killed with signal 15 (by pid=1 uid=0 code=kill)", 0, _PID=700),
    pid_1(STOPPING, "dovecot.service", 0),
])
def test_a_dovecot_restart_ends_the_sessions_of_clients_still_connected(setup, journal, restart):
    now = time.time()
    write_journal_file(journal, [
        dovecot(login("192.0.2.14", 105, "AAAAAAAAAAAAAA14"), now - 3 * HOUR),
        dict(restart, __REALTIME_TIMESTAMP=int((now - WINDOW - 30) * 1e6)),
        dovecot(logout(105, "AAAAAAAAAAAAAA14"), now - 10),  # no Dovecot logs this after a restart; changes nothing
    ])
    result = setup.run_reader("--file", str(journal))
    assert not setup.may_relay("192.0.2.14")
    assert "dovecot restarted: 1 open sessions ended, 1 grants released" in result.stderr


@pytest.mark.parametrize("forgery", [
    {"_UID": 1000, "_COMM": "logger"},  # logger -t dovecot by a local user
    {"_SYSTEMD_UNIT": "cron.service"},
])
def test_end_lines_and_restarts_a_local_user_forged_end_nothing(setup, journal, forgery):
    now = time.time()
    write_journal_file(journal, [
        dovecot(login("192.0.2.15", 106, "AAAAAAAAAAAAAA15"), now - 3 * HOUR),
        dovecot(logout(106, "AAAAAAAAAAAAAA15"), now - WINDOW - 60, **forgery),
        dovecot("master: Dovecot v2.3.19.1 (9b53102964) starting up for pop3, imap", now - WINDOW - 50, **forgery),
        pid_1(STOPPING, "dovecot.service", now - WINDOW - 40, _PID=4242, **forgery),
    ])
    setup.run_reader("--file", str(journal))
    assert setup.may_relay("192.0.2.15") and grants(setup)["192.0.2.15"]["sessions"] == 1


def test_a_logout_never_extends_a_grant_no_trusted_login_opened(setup, journal):
    now = time.time()
    write_journal_file(journal, [
        dovecot(login("203.0.113.16", 107, "AAAAAAAAAAAAAA16"), now - 3 * HOUR, _UID=1000),  # forged login
        dovecot(logout(107, "AAAAAAAAAAAAAA16"), now - 10),  # the real server's end of that key, say
        dovecot(login("192.0.2.17", 108, "AAAAAAAAAAAAAA17", service="pop3").replace(", mpid=108", ""),
                now - WINDOW - 60),  # a login naming no connection: the window alone
        dovecot(logout(108, "AAAAAAAAAAAAAA17", service="pop3"), now - 10),
    ])
    setup.run_reader("--file", str(journal))
    assert not setup.may_relay("203.0.113.16") and not setup.may_relay("192.0.2.17")
    assert grants(setup, "--all") == {}


def test_poplock_remove_ends_the_sessions_at_once_and_their_end_lines_bring_nothing_back(setup, journal):
    now = time.time()
    write_journal_file(journal, [
        dovecot(login("192.0.2.18", 109, "AAAAAAAAAAAAAA18"), now - 3 * HOUR),
        dovecot(login("192.0.2.18", 110, "AAAAAAAAAAAAAB18"), now - 2 * HOUR),
    ])
    setup.run_reader("--file", str(journal))
    removed = setup.run("remove", "192.0.2.18", check=True)
    assert removed.stdout == "removed the grant for 192.0.2.18, ending its 2 open sessions\n"
    assert not setup.may_relay("192.0.2.18") and index(setup) == {}
    write_journal_file(journal, [dovecot(logout(109, "AAAAAAAAAAAAAA18"), now - 5)])
    setup.run_reader("--file", str(journal))
    assert grants(setup, "--all") == {}  # the logout of a removed grant's session grants nothing back


def test_the_reader_restarted_remembers_the_sessions_open_when_it_stopped(setup, journal):
    now = time.time()
    write_journal_file(journal, [dovecot(login("192.0.2.19", 111, "AAAAAAAAAAAAAA19"), now - 3 * HOUR)])
    setup.run_reader("--file", str(journal))
    write_journal_file(journal, [dovecot(logout(111, "AAAAAAAAAAAAAA19"), now - 30)])
    result = setup.run_reader("--file", str(journal))
    assert "resuming after the saved journal position" in result.stderr
    assert grants(setup)["192.0.2.19"]["expires"] == _iso(now - 30 + WINDOW)


def history(setup, journal, now: float) -> None:
    write_journal_file(journal, [
        dovecot("master: Dovecot v2.3.19.1 (9b53102964) starting up for pop3, imap", now - 11 * HOUR),
        dovecot(login("192.0.2.20", 112, "AAAAAAAAAAAAAA20"), now - 10 * HOUR),  # still connected
        dovecot(login("192.0.2.21", 113, "AAAAAAAAAAAAAA21"), now - 10 * HOUR),
        dovecot(logout(113, "AAAAAAAAAAAAAA21"), now - 9 * HOUR),  # closed long ago
        dovecot(login("192.0.2.22", 114, "AAAAAAAAAAAAAA22"), now - 2 * HOUR),
        dovecot(logout(114, "AAAAAAAAAAAAAA22"), now - 60),  # closed a minute ago
        dovecot(login("192.0.2.23", 115, "AAAAAAAAAAAAAA23"), now - 20 * 60),  # still connected
    ])


def live(setup) -> dict:
    return {address: (record["expires"], record["sessions"]) for address, record in grants(setup).items()}


def test_a_store_rebuilt_from_the_journal_has_the_same_sessions_open_and_none_that_ended(setup, journal):
    now = time.time()
    history(setup, journal, now)
    setup.run_reader("--file", str(journal))
    before = live(setup)
    assert {address: sessions for address, (_, sessions) in before.items()} == {
        "192.0.2.20": 1, "192.0.2.22": 0, "192.0.2.23": 1}
    rebuilt = setup.run("rebuild", "--file", str(journal), check=True)
    assert live(setup) == before, rebuilt.stderr
    assert sorted(index(setup)) == ["dovecot:112/AAAAAAAAAAAAAA20", "dovecot:115/AAAAAAAAAAAAAA23"]
    setup.store.unlink()  # lost: the reader rebuilds it at start
    setup.run_reader("--file", str(journal))
    assert live(setup) == before


def test_a_session_whose_end_was_lost_ends_max_session_length_after_its_login(setup, journal):
    configure(setup, "MaxSessionLength=1h\n")
    now = time.time()
    write_journal_file(journal, [
        dovecot(login("192.0.2.24", 116, "AAAAAAAAAAAAAA24"), now - HOUR - WINDOW - 10),
        dovecot(login("192.0.2.25", 117, "AAAAAAAAAAAAAA25"), now - HOUR + 60),
    ])
    setup.run_reader("--file", str(journal))
    assert not setup.may_relay("192.0.2.24") and setup.may_relay("192.0.2.25")
    assert grants(setup)["192.0.2.25"]["expires"] == _iso(int(now - HOUR + 60) + HOUR + WINDOW)


def test_with_max_session_length_0_a_login_lasts_its_window_alone(setup, journal):
    configure(setup, "MaxSessionLength=0\n")
    now = time.time()
    write_journal_file(journal, [dovecot(login("192.0.2.26", 118, "AAAAAAAAAAAAAA26"), now - WINDOW - 10),
                                 dovecot(login("192.0.2.27", 119, "AAAAAAAAAAAAAA27"), now - 10)])
    setup.run_reader("--file", str(journal))
    assert not setup.may_relay("192.0.2.26")
    assert grants(setup)["192.0.2.27"]["sessions"] == 0


def _iso(seconds: float) -> str:
    from poplock.logs import iso_time

    return iso_time(int(seconds))


def _seconds(text: str) -> float:
    import datetime

    return datetime.datetime.fromisoformat(text).timestamp()
