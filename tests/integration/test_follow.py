"""The follower's view of journal entries, on a real journal file."""

import pytest
from support.journald import write_journal_file

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
