"""The follower's view of journal entries, on a real journal file."""

import subprocess

import pytest
from support.journald import JOURNAL_REMOTE, write_journal_file

from poplock.follow import JournalFollower, Position

AT = 1_790_000_000_123_456  # microseconds


@pytest.fixture
def journal(tmp_path):
    return write_journal_file(tmp_path / "entries.journal", [
        {"__REALTIME_TIMESTAMP": AT, "MESSAGE": "first", "SYSLOG_IDENTIFIER": "dovecot", "_UID": 0},
        {"__REALTIME_TIMESTAMP": AT + 1, "MESSAGE": b"bad \xff byte", "SYSLOG_IDENTIFIER": "dovecot", "_UID": 0},
        {"__REALTIME_TIMESTAMP": AT + 2, "MESSAGE": "not watched", "SYSLOG_IDENTIFIER": "cron", "_UID": 0},
    ])


def read_all(follower):
    return [(entry.get("MESSAGE"), entry["__REALTIME_TIMESTAMP"], dict(entry)) for entry in follower.read(100)]


def test_entries_read_as_mappings_of_text(journal):
    follower = JournalFollower(["SYSLOG_IDENTIFIER=dovecot"], files=[str(journal)])
    assert follower.seek(None, 0) == Position.NO_CURSOR
    entries = read_all(follower)
    assert [message for message, _, _ in entries] == ["first", "bad \ufffd byte"]
    message, realtime, fields = entries[0]
    assert realtime == str(AT)
    assert fields == {"__REALTIME_TIMESTAMP": str(AT), "MESSAGE": "first", "SYSLOG_IDENTIFIER": "dovecot",
                      "_UID": "0"}


def test_an_absent_field_is_missing_not_empty(journal):
    follower = JournalFollower(None, files=[str(journal)])
    follower.seek(None, 0)
    entry = next(follower.read(1))
    assert entry.get("_SYSTEMD_UNIT") is None and entry.get("_SYSTEMD_UNIT", "-") == "-"
    assert "_SYSTEMD_UNIT" not in entry and "MESSAGE" in entry
    with pytest.raises(KeyError):
        entry["_SYSTEMD_UNIT"]
    assert entry.get("__CURSOR") is None


def test_a_cursor_resumes_right_after_its_entry(journal):
    follower = JournalFollower(None, files=[str(journal)])
    follower.seek(None, 0)
    next(follower.read(1))
    cursor = follower.cursor()
    follower.close()
    resumed = JournalFollower(None, files=[str(journal)])
    assert resumed.seek(cursor, 0) == Position.RESUMED
    assert [message for message, _, _ in read_all(resumed)] == ["bad \ufffd byte", "not watched"]
    assert resumed.seek("s=nonsense", AT / 1e6 + 0.5) == Position.CURSOR_INVALID


def test_a_field_given_twice_reads_as_the_journals_own_lookup_gives_it(tmp_path):
    """A received journal's sender writes any entry it likes, a field twice included: the entry's
    value is the one sd_journal_get_data() finds, whatever else the entry holds."""
    from systemd import _reader
    path = tmp_path / "received.journal"
    stream = (f"__REALTIME_TIMESTAMP={AT}\n__MONOTONIC_TIMESTAMP={AT}\n_BOOT_ID={'0' * 28}beef\n"
              "MESSAGE=first\nMESSAGE=second\n_SYSTEMD_UNIT=dovecot.service\n_SYSTEMD_UNIT=evil.service\n"
              "_UID=0\n\n")
    subprocess.run([JOURNAL_REMOTE, "-o", str(path), "-"], input=stream.encode(), check=True, capture_output=True)
    follower = JournalFollower(None, files=[str(path)])
    follower.seek(None, 0)
    entry = next(follower.read(1))
    plain = _reader._Reader(flags=0, files=[str(path)])
    assert plain._next()
    for name in ("MESSAGE", "_SYSTEMD_UNIT", "_UID"):
        assert entry.get(name) == plain._get(name).decode()
    assert entry["MESSAGE"] == "first"
    plain.close()


def test_the_header_fields_are_the_entrys_own_and_are_read_for_each_entry(journal):
    follower = JournalFollower(["SYSLOG_IDENTIFIER=dovecot", "SYSLOG_IDENTIFIER=cron"], files=[str(journal)])
    follower.seek(None, 0)
    seen = [(entry["__REALTIME_TIMESTAMP"], entry.seconds(), entry.get("MESSAGE"), entry.get("__CURSOR"))
            for entry in follower.read(10)]
    assert seen == [(str(AT + step), (AT + step) / 1e6, message, None)
                    for step, message in enumerate(["first", "bad \ufffd byte", "not watched"])]
