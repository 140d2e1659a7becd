"""Which of a sender's received journal files its stream opens (received.files_after): only those that
can hold an entry after its position, as archived files pile up one a rotation."""

from poplock.follow import entry_number
from poplock.received import files_after

DIRECTORY = "/var/log/journal/remote"
ONLINE = f"{DIRECTORY}/remote-10.1.0.5.journal"
ARCHIVED = [f"{DIRECTORY}/remote-10.1.0.5@{name}.journal" for name in (
    "aaaa-0000000000000001-0005f1", "aaaa-0000000000000101-0005f2", "aaaa-0000000000000201-0005f3")]
FILES = ARCHIVED + [ONLINE]  # senders_in() sorts them so
LAST = {ARCHIVED[0]: ("aaaa", 0x100), ARCHIVED[1]: ("aaaa", 0x200), ARCHIVED[2]: ("aaaa", 0x300)}


def cursor(numbering: str, number: int) -> str:
    return f"s={numbering};i={number:x};b=5eed;m=1;t=5f1a2b3c4d5e6;x=77"


def test_a_cursor_names_its_sequence_number_id_and_number():
    assert entry_number(cursor("aaaa", 0x250)) == ("aaaa", 0x250)
    assert entry_number(None) is None and entry_number("not a cursor") is None


def test_a_stream_opens_the_file_of_its_position_and_those_after_it():
    assert files_after(FILES, cursor("aaaa", 0x250), LAST.get) == [ARCHIVED[2], ONLINE]
    assert files_after(FILES, cursor("aaaa", 0x200), LAST.get) == [ARCHIVED[1], ARCHIVED[2], ONLINE]  # its last
    assert files_after(FILES, cursor("aaaa", 0x301), LAST.get) == [ONLINE]


def test_without_a_position_or_where_the_numbering_cannot_be_told_every_file_is_opened():
    assert files_after(FILES, None, LAST.get) == FILES
    assert files_after(FILES, "not a cursor", LAST.get) == FILES
    other = {**LAST, ARCHIVED[0]: ("bbbb", 0x10)}  # journal-remote restarted: another numbering
    assert files_after(FILES, cursor("aaaa", 0x301), other.get) == [ARCHIVED[0], ONLINE]
    unreadable = {ARCHIVED[1]: None}
    assert files_after(FILES, cursor("aaaa", 0x301), lambda path: unreadable.get(path, LAST.get(path))) == [
        ARCHIVED[1], ONLINE]


def test_archived_files_alone_still_give_the_stream_the_newest():
    assert files_after(ARCHIVED, cursor("aaaa", 0x400), LAST.get) == [ARCHIVED[2]]
