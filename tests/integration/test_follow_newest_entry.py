"""No login stays unread: a follower with matches that polls while journald writes still returns
every entry once it is readable. (sd-journal of systemd 252 steps past an entry it met half
written, and never returns it, unless the reader looks afresh: follow.JournalFollower._look_again.)"""

import time
import uuid

from systemd import journal

from poplock.follow import JournalFollower

TRIALS = 150


def readable(message: str) -> bool:
    check = journal.Reader()
    check.add_match(MESSAGE=message)
    found = bool(list(check))
    check.close()
    return found


def test_every_entry_is_read_once_it_is_readable_even_when_polled_while_being_written(journald):
    tag = f"poplock-newest-{uuid.uuid4().hex[:8]}"
    follower = JournalFollower([f"SYSLOG_IDENTIFIER={tag}", "_SYSTEMD_UNIT=no-such-unit.service"])
    journal.send(f"{tag} first", SYSLOG_IDENTIFIER=tag)
    while not readable(f"{tag} first"):
        time.sleep(0.001)
    follower.seek(None, time.time() - 60)
    assert [entry["MESSAGE"] for entry in follower.read(None)] == [f"{tag} first"]
    hidden = []
    for index in range(TRIALS):
        message = f"{tag} {index}"
        journal.send(message, SYSLOG_IDENTIFIER=tag)
        seen = []
        deadline = time.monotonic() + 0.02
        while time.monotonic() < deadline and message not in seen:  # as a reader woken early polls
            seen += [entry["MESSAGE"] for entry in follower.read(None)]
        if message not in seen:
            while not readable(message):
                time.sleep(0.001)
            follower.process()
            seen += [entry["MESSAGE"] for entry in follower.read(None)]
        if message not in seen:
            hidden.append(index)
    follower.close()
    assert hidden == []


def sent_and_readable(message: str, tag: str) -> None:
    journal.send(message, SYSLOG_IDENTIFIER=tag)
    while not readable(message):
        time.sleep(0.001)


def test_looking_afresh_keeps_the_watching_handle_unless_it_stepped_past_an_entry(journald):
    """look_afresh (a decision waits, and the read found nothing) looks with a handle of its own and
    keeps the long-lived one, whose inotify descriptor took up to 24 ms to close while the decision
    waited, unless that one does not give the entry the fresh one finds next."""
    tag = f"poplock-afresh-{uuid.uuid4().hex[:8]}"
    follower = JournalFollower([f"SYSLOG_IDENTIFIER={tag}", "_SYSTEMD_UNIT=no-such-unit.service"], live=True)
    sent_and_readable(f"{tag} first", tag)
    follower.seek(None, time.time() - 60)
    assert [entry["MESSAGE"] for entry in follower.read(None)] == [f"{tag} first"]
    watching = follower._reader
    cursor = follower.cursor()

    follower.look_afresh(cursor, 0)  # nothing after the cursor
    assert follower._reader is watching and list(follower.read(None)) == []

    sent_and_readable(f"{tag} late", tag)  # came after the last read: the long-lived handle gives it
    follower.look_afresh(cursor, 0)
    assert follower._reader is watching
    assert [entry["MESSAGE"] for entry in follower.read(None)] == [f"{tag} late"]

    sent_and_readable(f"{tag} stepped past", tag)
    sent_and_readable(f"{tag} after it", tag)
    cursor = follower.cursor()
    assert watching._next()  # as sd-journal does when it meets an entry half written (see above)
    follower.look_afresh(cursor, 0)
    assert follower._reader is not watching
    assert [entry["MESSAGE"] for entry in follower.read(None)] == [f"{tag} stepped past", f"{tag} after it"]
    follower.close()
