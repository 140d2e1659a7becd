"""poplock-reader on real journal files made with systemd-journal-remote: grants, trust, catch-up, resume."""

import json
import time
from pathlib import Path

import pytest
from support.journald import write_journal_file
from support.poplock import Setup, command, faketime

from poplock.logs import iso_time
from poplock.storewriter import StoreWriter

WINDOW = 1800


def login_line(address: str, user: str = "alice", service: str = "pop3") -> str:
    # No session=<...>: these tests are about logins alone. A login that names its connection opens
    # a session that holds the grant until its end line (tests/integration/test_sessions_journal_files.py).
    return (f"{service}-login: Login: user=<{user}>, method=PLAIN, rip={address}, lip=192.0.2.1, mpid=4242, "
            f"TLS")


def dovecot(message: str, at: float, **trusted) -> dict:
    """An entry as Dovecot's log process writes it under a plain journald (root, SYSLOG_IDENTIFIER=dovecot)."""
    fields = {"__REALTIME_TIMESTAMP": int(at * 1e6), "MESSAGE": message, "SYSLOG_IDENTIFIER": "dovecot",
              "_UID": 0, "_GID": 0, "_COMM": "log", "_PID": 801, "_TRANSPORT": "syslog", "PRIORITY": 6}
    fields.update(trusted)
    return fields


def grants(setup) -> dict:
    shown = setup.run("show", "--json", check=True).stdout.splitlines()
    return {record["address"]: record for record in map(json.loads, shown) if record["kind"] == "grant"}


@pytest.fixture
def journal(tmp_path) -> Path:
    directory = tmp_path / "journal"
    directory.mkdir()
    return directory / "remote.journal"


def test_logins_in_a_journal_file_become_grants_until_login_time_plus_window(setup, journal):
    now = time.time()
    write_journal_file(journal, [
        dovecot(login_line("192.0.2.10"), now - 60),
        dovecot(login_line("2001:db8::10", service="imap"), now - 30),
        dovecot(login_line("::ffff:198.51.100.10"), now - 10, _SYSTEMD_UNIT="dovecot.service", _UID=108),
        dovecot("pop3-login: Disconnected: Connection closed (auth failed, 1 attempts in 2 secs): user=<x>, "
                "method=PLAIN, rip=192.0.2.11, lip=192.0.2.1, session=<AAAA>", now - 5),
    ])
    setup.run_reader("--file", str(journal))
    found = grants(setup)
    assert sorted(found) == ["192.0.2.10", "198.51.100.10", "2001:db8::10"]
    assert setup.may_relay("192.0.2.10") and not setup.may_relay("192.0.2.11")
    status = setup.run("check", "192.0.2.10").stdout
    assert "grant until" in status and "dovecot login" in status


def test_forged_dovecot_entries_grant_nothing(setup, journal):
    now = time.time()
    write_journal_file(journal, [
        dovecot(login_line("203.0.113.66"), now - 10, _UID=1000, _COMM="logger"),  # logger -t dovecot
        dovecot(login_line("203.0.113.67"), now - 10, _UID=33, _COMM="php-fpm8.2"),  # a web script
        dovecot(login_line("203.0.113.68"), now - 10, _UID=0, _SYSTEMD_UNIT="cron.service"),
        dovecot(login_line("192.0.2.20"), now - 10),
    ])
    setup.run_reader("--file", str(journal))
    assert list(grants(setup)) == ["192.0.2.20"]


def test_a_login_read_after_its_window_has_passed_grants_nothing(setup, journal):
    now = time.time()
    write_journal_file(journal, [
        dovecot("master: Dovecot v2.3.19.1 starting up for pop3, imap", now - 3 * WINDOW),
        dovecot(login_line("192.0.2.30"), now - WINDOW - 60),
        dovecot(login_line("192.0.2.31"), now - WINDOW + 120),
    ])
    with StoreWriter(str(setup.store)).transaction() as transaction:  # the reader was down since then
        transaction.metadata[f"cursor:{setup.cursor}"] = _cursor_of_first_entry(journal)
    result = setup.run_reader("--file", str(journal))
    assert list(grants(setup)) == ["192.0.2.31"]
    assert "login from 192.0.2.30" in result.stderr and "older than the window" in result.stderr


def test_without_a_saved_cursor_the_reader_starts_one_window_back(setup, journal):
    now = time.time()
    write_journal_file(journal, [
        dovecot(login_line("192.0.2.40"), now - 3 * WINDOW),
        dovecot(login_line("192.0.2.41"), now - 60),
    ])
    result = setup.run_reader("--file", str(journal))
    assert list(grants(setup)) == ["192.0.2.41"]
    assert "no saved journal position; starting one window back" in result.stderr
    assert "192.0.2.40" not in result.stderr  # never even read


def test_the_reader_resumes_after_its_cursor_and_reads_nothing_twice(setup, journal):
    now = time.time()
    write_journal_file(journal, [dovecot(login_line("192.0.2.50"), now - 100)])
    first = setup.run_reader("--file", str(journal))
    assert "granted 192.0.2.50" in first.stderr
    setup.run("remove", "192.0.2.50", check=True)
    write_journal_file(journal, [dovecot(login_line("192.0.2.51"), now - 50)])  # appended, as journald would
    second = setup.run_reader("--file", str(journal))
    assert "resuming after the saved journal position" in second.stderr
    assert "192.0.2.50" not in second.stderr
    assert list(grants(setup)) == ["192.0.2.51"]  # the removed grant stays removed


def test_the_cursor_committed_with_the_grants_wins_over_an_older_cursor_file(setup, journal):
    """A crash between publishing the store and writing the cursor file leaves the file behind."""
    now = time.time()
    write_journal_file(journal, [dovecot(login_line("192.0.2.52"), now - 100)])
    setup.run_reader("--file", str(journal))
    behind = setup.cursor.read_text()
    write_journal_file(journal, [dovecot(login_line("192.0.2.53"), now - 80)])
    setup.run_reader("--file", str(journal))
    setup.cursor.write_text(behind)
    setup.run("remove", "192.0.2.53", check=True)
    result = setup.run_reader("--file", str(journal))
    assert "192.0.2.53" not in result.stderr
    assert list(grants(setup)) == ["192.0.2.52"]


def test_a_removed_store_is_rebuilt_from_the_logins_of_the_window(setup, journal):
    now = time.time()
    write_journal_file(journal, [dovecot(login_line("192.0.2.54"), now - WINDOW - 60),
                                 dovecot(login_line("192.0.2.55"), now - 100)])
    setup.run_reader("--file", str(journal))
    before = grants(setup)
    setup.store.unlink()  # lost; the cursor file is only a copy of the position, not of the grants
    write_journal_file(journal, [dovecot(login_line("192.0.2.56"), now - 50)])
    setup.run_reader("--file", str(journal))
    after = grants(setup)
    assert sorted(after) == ["192.0.2.55", "192.0.2.56"]
    assert after["192.0.2.55"] == before["192.0.2.55"]


def test_after_a_vacuum_removed_the_saved_entry_the_reader_continues_with_the_next_one(setup, tmp_path):
    now = time.time()
    directory = tmp_path / "journals"
    directory.mkdir()
    old = write_journal_file(directory / "old.journal", [dovecot(login_line("192.0.2.60"), now - 200)])
    setup.run_reader("--directory", str(directory))
    write_journal_file(directory / "new.journal", [dovecot(login_line("192.0.2.61"), now - 100)])
    old.unlink()  # journalctl --vacuum-time removed the file holding the saved entry
    result = setup.run_reader("--directory", str(directory))
    assert "the saved journal entry is gone (rotated or vacuumed); continuing with the next entry" in result.stderr
    assert sorted(grants(setup)) == ["192.0.2.60", "192.0.2.61"]


def test_the_cursor_file_is_a_copy_the_reader_never_resumes_from(setup, journal):
    now = time.time()
    write_journal_file(journal, [dovecot(login_line("192.0.2.70"), now - 100)])
    setup.cursor.write_text("garbage without any structure")
    result = setup.run_reader("--file", str(journal))
    # A cursor file without a store: there was a store, and it is lost.
    assert f"the grant store {setup.store} is missing; rebuilding it from the journal" in result.stderr
    assert list(grants(setup)) == ["192.0.2.70"]
    assert setup.cursor.read_text().startswith("s=")  # written anew after the commit


def test_a_cursor_from_another_journal_starts_one_window_back(setup, journal):
    now = time.time()
    write_journal_file(journal, [dovecot(login_line("192.0.2.75"), now - 100)])
    setup.cursor.write_text("s=0123456789abcdef0123456789abcdef;i=99;b=0123456789abcdef0123456789abcdef;"
                            "m=1;t=5;x=1\n")
    result = setup.run_reader("--file", str(journal))
    assert "192.0.2.75" in grants(setup)
    assert result.returncode == 0


def test_strange_entries_are_skipped_and_never_fatal(setup, journal):
    now = time.time()
    write_journal_file(journal, [
        dovecot(b"pop3-login: Login: user=<\xff\xfe>, method=PLAIN, rip=192.0.2.80, lip=192.0.2.1, mpid=1, "
                b"session=<AAAA>", now - 30),
        dovecot("x" * 100_000, now - 20),
        dovecot("pop3-login: Login: user=<a>, method=PLAIN, rip=999.1.1.1, lip=192.0.2.1, mpid=1, "
                "session=<AAAA>", now - 15),
        {k: v for k, v in dovecot(login_line("192.0.2.82"), now - 12).items() if k != "_UID"},
        dovecot("multi\nline\npop3-login: Login: user=<a>, method=PLAIN, rip=203.0.113.83, lip=192.0.2.1, "
                "mpid=1, session=<AAAA>", now - 11),
        dovecot(login_line("192.0.2.81"), now - 10),
    ])
    setup.run_reader("--file", str(journal))
    assert sorted(grants(setup)) == ["192.0.2.80", "192.0.2.81"]


def test_scan_prints_the_logins_of_a_journal_file_and_touches_nothing(setup, journal):
    now = time.time()
    write_journal_file(journal, [
        dovecot(login_line("192.0.2.90", user="bob"), now - 30),
        dovecot(login_line("203.0.113.91"), now - 20, _UID=1000),
    ])
    result = setup.run("scan", "--file", str(journal), "--json", check=True)
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["address"], r["user"], r["source"]) for r in records] == [("192.0.2.90", "bob", "dovecot")]
    assert records[0]["cursor"].startswith("s=") and records[0]["time"]
    everything = setup.run("scan", "--file", str(journal), "--json", "--all-sources", check=True)
    assert [json.loads(line)["address"] for line in everything.stdout.splitlines()] == ["192.0.2.90", "203.0.113.91"]
    assert not setup.store.exists() and not setup.cursor.exists()


def test_scan_since_skips_older_entries(setup, journal):
    now = time.time()
    write_journal_file(journal, [dovecot(login_line("192.0.2.95"), now - 7200),
                                 dovecot(login_line("192.0.2.96"), now - 60)])
    result = setup.run("scan", "--file", str(journal), "--since=-1h", "--json", check=True)
    assert [json.loads(line)["address"] for line in result.stdout.splitlines()] == ["192.0.2.96"]


def test_scan_prints_its_columns_aligned(setup, journal):
    now = time.time()
    write_journal_file(journal, [dovecot(login_line("192.0.2.9", user="bob"), now - 30),
                                 dovecot(login_line("2001:db8::99", user="carol"), now - 20),
                                 dovecot(login_line("192.0.2.100"), now - 10)])
    lines = setup.run("scan", "--file", str(journal), check=True).stdout.splitlines()
    assert [line.split() for line in lines] == [
        [iso_time(now - 30), "192.0.2.9", "dovecot", "user=bob"],
        [iso_time(now - 20), "2001:db8::99", "dovecot", "user=carol"],
        [iso_time(now - 10), "192.0.2.100", "dovecot", "user=alice"]]
    assert len({line.index("dovecot") for line in lines}) == 1
    assert len({line.index("user=") for line in lines}) == 1


def test_scan_all_sources_marks_the_lines_poplock_reader_would_not_trust(setup, journal):
    now = time.time()
    write_journal_file(journal, [
        dovecot(login_line("192.0.2.130"), now - 30),
        dovecot(login_line("203.0.113.131"), now - 20, _UID=1000, _COMM="logger"),  # logger -t dovecot
    ])
    text = setup.run("scan", "--file", str(journal), "--all-sources", check=True).stdout.splitlines()
    assert [line.split()[1:] for line in text] == [["192.0.2.130", "dovecot", "trusted", "user=alice"],
                                                  ["203.0.113.131", "dovecot", "UNTRUSTED", "user=alice"]]
    records = [json.loads(line) for line in setup.run("scan", "--file", str(journal), "--all-sources", "--json",
                                                      check=True).stdout.splitlines()]
    assert [(r["address"], r["trusted"]) for r in records] == [("192.0.2.130", True), ("203.0.113.131", False)]
    [watched] = [json.loads(line) for line in setup.run("scan", "--file", str(journal), "--json",
                                                        check=True).stdout.splitlines()]
    assert (watched["address"], watched["trusted"]) == ("192.0.2.130", True)


def _cursor_of_first_entry(journal: Path) -> str:
    from systemd import journal as systemd_journal

    reader = systemd_journal.Reader(files=[str(journal)])
    try:
        return reader.get_next()["__CURSOR"]
    finally:
        reader.close()


def drifted_line(address: str) -> str:
    # A Dovecot upgrade that added an element the pattern does not know.
    return (f"imap-login: Login: user=<alice>, method=PLAIN, rip={address}, lip=192.0.2.1, mpid=4242, TLS, "
            f"client_id=<thunderbird>, session=<b7aS8S1hfbZ/AAAF>")


def test_a_watched_server_logging_logins_no_pattern_reads_is_warned_about(setup, journal):
    setup.write(extra="UnmatchedWarningAfter=1min\n")
    now = time.time()
    write_journal_file(journal, [
        dovecot(login_line("192.0.2.100"), now - 600),
        dovecot(drifted_line("192.0.2.101"), now - 100),
        dovecot(drifted_line("192.0.2.102"), now - 90),
        dovecot(drifted_line("192.0.2.103"), now - 80),
        # A forgery that looks like a login is not the server's: no warning for it.
        dovecot(drifted_line("203.0.113.9"), now - 50, _UID=1000),
    ])
    result = setup.run_reader("--file", str(journal))
    warnings = [line for line in result.stderr.splitlines() if "no pattern reads" in line]
    assert len(warnings) == 1
    assert warnings[0].startswith("poplock-reader: warning: dovecot logged 3 lines since ")
    assert "the last login read was at" in warnings[0] and drifted_line("192.0.2.103") in warnings[0]
    assert list(grants(setup)) == ["192.0.2.100"]


def test_scan_unmatched_lists_the_login_looking_lines_no_pattern_reads(setup, journal):
    now = time.time()
    write_journal_file(journal, [
        dovecot(login_line("192.0.2.110"), now - 30),
        dovecot(drifted_line("192.0.2.111"), now - 20),
        dovecot("pop3-login: Disconnected: Connection closed (auth failed, 1 attempts in 2 secs): user=<a>, "
                "method=PLAIN, rip=192.0.2.112, lip=192.0.2.1, session=<AAAA>", now - 10),
    ])
    result = setup.run("scan", "--file", str(journal), "--unmatched", "--json", check=True)
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["source"], r["message"]) for r in records] == [("dovecot", drifted_line("192.0.2.111"))]


def test_scan_all_sources_tries_every_built_in_server(setup, journal):
    now = time.time()
    write_journal_file(journal, [
        dovecot(login_line("192.0.2.120"), now - 30),
        {"__REALTIME_TIMESTAMP": int((now - 20) * 1e6), "MESSAGE": "LOGIN, user=bob, ip=[::ffff:192.0.2.121], "
         "port=[4242]", "SYSLOG_IDENTIFIER": "pop3d", "_UID": 0, "_COMM": "courierlogger"},
    ])
    watched = setup.run("scan", "--file", str(journal), "--json", check=True)
    assert [json.loads(line)["address"] for line in watched.stdout.splitlines()] == ["192.0.2.120"]
    everything = setup.run("scan", "--file", str(journal), "--json", "--all-sources", check=True)
    found = [(json.loads(line)["address"], json.loads(line)["source"]) for line in everything.stdout.splitlines()]
    assert found == [("192.0.2.120", "dovecot"), ("192.0.2.121", "courier")]


def test_a_grant_by_hand_in_another_hosts_journal_is_not_replayed_here(setup, journal):
    # A received journal carries the other host's root entries: its changes are its own store's.
    now = time.time()
    write_journal_file(journal, [
        {"__REALTIME_TIMESTAMP": int((now - 60) * 1e6), "MESSAGE": "granted 203.0.113.9 until then by hand",
         "MESSAGE_ID": "5df0f3db55ae4c64a84d7d653d22380e", "POPLOCK_STORE": str(setup.store),
         "POPLOCK_CLIENT_ADDRESS": "203.0.113.9", "POPLOCK_EXPIRES": iso_time(now + 3600),
         "_UID": 0, "_TRANSPORT": "journal", "_MACHINE_ID": "0123456789abcdef0123456789abcdef"},
        dovecot(login_line("192.0.2.80"), now - 30),
    ])
    setup.run_reader("--file", str(journal))
    assert list(grants(setup)) == ["192.0.2.80"]


def test_a_store_another_program_holds_at_start_is_waited_for_not_replaced(setup, journal):
    import _gdbm

    now = time.time()
    write_journal_file(journal, [dovecot(login_line("192.0.2.81"), now - 30)])
    setup.run("add", "198.51.100.1", check=True)
    holder = _gdbm.open(str(setup.store), "w")  # gdbmtool, writing in place, for longer than the reader waits
    try:
        result = setup.run_reader("--file", str(journal), check=False)
    finally:
        holder.close()
    assert result.returncode == 75, result.stderr
    assert "stayed locked by another program" in result.stderr
    assert list(grants(setup)) == ["198.51.100.1"]  # not rebuilt away
    setup.run_reader("--file", str(journal))
    assert sorted(grants(setup)) == ["192.0.2.81", "198.51.100.1"]


def test_a_users_expired_addresses_do_not_count_toward_max_addresses_per_user(tmp_path, journal):
    """The user index is looked through only once it is full; then its dead addresses are dropped,
    so a user whose earlier grants have run out logs in from a new address and gets a grant."""
    setup = Setup(tmp_path, extra="\n[Grants]\nMaxAddressesPerUser=2\n")
    now = time.time()
    write_journal_file(journal, [dovecot(login_line(f"192.0.2.{60 + index}"), now - 100 + index * 10)
                                 for index in range(3)])
    first = setup.run_reader("--file", str(journal))
    assert "login from 192.0.2.62 granted nothing: its user already holds live grants for 2 addresses" in first.stderr
    assert sorted(grants(setup)) == ["192.0.2.60", "192.0.2.61"]

    # 41 minutes on, past the window of the first two: a login from a third address.
    write_journal_file(journal, [dovecot(login_line("192.0.2.63"), now + 40 * 60)])
    later = faketime("+41m", command("poplock-reader"), "-c", str(setup.config), "--once", "--file", str(journal))
    assert later.returncode == 0, later.stderr
    assert "granted 192.0.2.63" in later.stderr and "granted nothing" not in later.stderr
    checked = faketime("+41m", command("poplock"), "-c", str(setup.config), "check", "192.0.2.63")
    assert checked.returncode == 0, checked.stdout
