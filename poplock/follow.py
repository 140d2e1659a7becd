"""Following the journal: the thin shell over python-systemd's low-level reader.

Takes each entry's fields as bytes in one walk and decodes only those login parsing asks
for (converting every field is what makes the high-level Reader slow), resumes from a
saved cursor, and hands out the journal's inotify descriptor to wait on (reader.py says
why it also re-reads).
See sd_journal_open(3), sd_journal_seek_cursor(3), sd_journal_get_fd(3).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Iterator, Mapping

# The C module alone: systemd.journal's Python layer imports uuid, traceback and more, and
# start-up is most of a short catch-up.
from systemd import _reader as journal

log = logging.getLogger("poplock.follow")

FIELDS = ("MESSAGE", "_UID", "_SYSTEMD_UNIT", "SYSLOG_IDENTIFIER", "_PID", "_COMM")
# Where journald keeps this machine's system journal (runtime, then persistent); see systemd-journald(8).
JOURNAL_DIRECTORIES = ("/run/log/journal", "/var/log/journal")
ONLINE_FILE = "system.journal"
_HEADER_FIELDS = frozenset(("__REALTIME_TIMESTAMP", "__MONOTONIC_TIMESTAMP", "__CURSOR"))
_GONE = "gone"  # JournalFollower._first_after: the cursor's entry is not in the files followed


class JournalEntry(Mapping):
    """The follower's current entry as a read-only mapping of field name to text.

    Its data fields are fetched all at once, on the first look: sd-journal finds a field by
    walking the entry's fields, so the five or six a login needs (one or two of them fields
    the entry lacks, walked in full) cost more than one walk that takes them all.
    """

    __slots__ = ("_reader", "_fields", "sender")

    def __init__(self, reader, sender: str | None = None):
        self._reader = reader
        self._fields = None  # until the first look; read() clears it at each step
        # The POP host whose received journal holds the entry (received.py), None for this
        # host's own journal: the transport's word on who wrote it, never a field inside it.
        self.sender = sender

    def __getitem__(self, name: str) -> str:
        value = self.get(name)
        if value is None:
            raise KeyError(name)
        return value

    def get(self, name: str, default=None):
        if name in _HEADER_FIELDS:  # kept in the entry's header, never its data (even in a crafted file)
            return str(self._reader._get_realtime()) if name == "__REALTIME_TIMESTAMP" else default
        fields = self._fields
        if fields is None:
            fields = self._fields = self._reader._get_all()
        value = fields.get(name)
        if value is None:
            return default
        if value.__class__ is list:  # a field given more than once: the first, as sd_journal_get_data()
            value = value[0]
        return value.decode("utf-8", "replace")

    def __iter__(self):
        return iter(name for name in ("__REALTIME_TIMESTAMP",) + FIELDS if name in self)

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def __contains__(self, name) -> bool:
        return self.get(name) is not None

    def seconds(self) -> float:
        """__REALTIME_TIMESTAMP in seconds."""
        return self._reader._get_realtime() / 1e6

    @property
    def cursor(self) -> str:
        return self._reader._get_cursor()


class Position:
    """How the follower found its place: resumed at the cursor, or why it could not."""

    RESUMED = "resumed"  # right after the saved entry
    ENTRY_GONE = "entry-gone"  # the saved entry was rotated or vacuumed away: next one on
    CURSOR_INVALID = "cursor-invalid"  # unusable cursor: started at the fallback time
    NO_CURSOR = "no-cursor"  # first run: started at the fallback time


class JournalFollower:
    """Entries matching any of `matches` (FIELD=value), from the system journal by default.

    `directory` or `files` read other journals, as journalctl's --directory and --file
    do (aggregated journals from other hosts included).
    """

    def __init__(self, matches: Iterable[str] | None, *, directory: str | None = None,
                 files: list[str] | None = None, sender: str | None = None, live: bool = False):
        self.matches = list(matches) if matches is not None else None
        self.directory = directory
        self.files = files
        self.sender = sender
        # `live` (the system journal only): once it has read to the end, it follows only the files
        # journald still writes (live_files()). With matches, every step of sd-journal looks into
        # every file: at 78 files (a journal of 2 GB) a read for a decision took 3.4 ms at the
        # median, at 4 files 0.3 ms. Archived files get no new entries.
        self.live = live and directory is None and files is None
        self._live_files: list[str] | None = None  # the files followed, once it has caught up
        self._live_inodes: set[int] = set()  # theirs when opened: a rotation renames them
        self._live_since = 0.0  # and when they were opened
        self._fallback = 0.0  # the realtime sought last, for a reopen that has no entry to go on from
        self._reader = self._open()
        self._pending = False  # the current entry is positioned on but not yet read
        self._looked_again = False  # peek() already looked again in this pass
        self._consumed: str | None = None  # peek(): the cursor of the entry taken before the pending one
        self.handles_opened = 1  # each replacement gets a new descriptor, maybe of the same number

    def _open(self, *, watch: bool = True) -> journal._Reader:
        # sd_journal_open_directory/_files take no flags: 0 must be given explicitly.
        if self.directory is not None:
            reader = journal._Reader(flags=0, path=self.directory)
        elif self.files is not None:
            reader = journal._Reader(flags=0, files=self.files)
        elif self._live_files:
            reader = journal._Reader(flags=0, files=self._live_files)
        else:
            reader = journal._Reader(flags=journal.LOCAL_ONLY | journal.SYSTEM)
        for match in self.matches or ():
            reader.add_match(match)
            reader.add_disjunction()
        if self._live_files and watch:
            reader.fileno()  # sets up its inotify watches now: a rotation from here on is told (process())
        return reader

    def seek(self, cursor: str | None, fallback_realtime: float) -> str:
        """Position just after `cursor`, else at `fallback_realtime` (seconds); returns a Position."""
        self._pending = False
        self._consumed = cursor
        self._fallback = fallback_realtime
        if cursor is not None:
            try:
                self._reader.seek_cursor(cursor)
            except (OSError, ValueError):
                log.debug("cursor %r rejected by the journal", cursor)
            else:
                if not self._reader._next():
                    return Position.RESUMED  # nothing after the saved place yet
                if self._reader.test_cursor(cursor):
                    return Position.RESUMED
                self._pending = True  # positioned on the first entry after the gap
                return Position.ENTRY_GONE
        self._reader.seek_realtime(int(fallback_realtime * 1_000_000))
        return Position.NO_CURSOR if cursor is None else Position.CURSOR_INVALID

    def readable(self) -> bool:
        """Some journal file could be opened (reading the system journal takes permission)."""
        reader = self._reader
        return bool(reader.has_runtime_files() or reader.has_persistent_files() or
                    self.earliest_time() is not None)

    def read(self, limit: int | None) -> Iterator["JournalEntry"]:
        """Up to `limit` (None: all) of the entries available now.

        Each entry reads its fields from the journal when asked, and only while it is
        the current one: use it before taking the next.
        """
        catching_up = self.live and self._live_files is None
        # Before the end is found: see _follow_live.
        online, since = (_online_inodes(), time.time()) if catching_up else (None, 0.0)
        reader = self._reader
        entry = JournalEntry(reader, self.sender)
        count = 0
        looked_again = False
        while limit is None or count < limit:
            count += 1
            if self._pending:
                self._pending = False
            elif not reader._next():
                if looked_again or not self.matches or not self._look_again():
                    if catching_up and online:
                        self._follow_live(online, since, self._position())
                    return
                looked_again = True
                continue
            entry._fields = None  # a new entry: its fields are fetched on its first look
            yield entry

    def _follow_live(self, known: set[int], since: float, position: str | None) -> None:
        """At the end of the journal: go on with only the files journald writes, from here.

        Those are the system.journal files, and those journald archived since the inodes `known`
        were the system.journal files, at `since` (see live_files): the entries it wrote there
        meanwhile are still read. A reopen after a rotation (process()) keeps the same rule.
        Reading goes on after `position`, the cursor of the entry taken last."""
        files = live_files(known, since)
        if not files:
            return
        self._live_files = files
        self._live_inodes = {inode for inode in map(_inode, files) if inode is not None}
        self._live_since = time.time()
        self._reader.close()
        self._reader = self._open()
        self.handles_opened += 1
        if self.seek(position, self._fallback) == Position.ENTRY_GONE:
            self._skip_to_after(position)

    def _skip_to_after(self, cursor: str) -> None:
        """Step over what the pending entry is not after `cursor`: seeking a cursor that the files
        followed do not hold places the reader by what the cursor says (the sequence number, or the
        time when the entry is of another numbering), which can be before the entry itself. Reading
        an entry twice could bring back a grant removed after it."""
        fields = cursor_fields(cursor)
        try:
            numbering, number, realtime = fields["s"], int(fields["i"], 16), int(fields["t"], 16)
        except (KeyError, ValueError):
            return
        reader = self._reader
        while self._pending:
            here = cursor_fields(reader._get_cursor())
            same = here.get("s") == numbering
            if (int(here["i"], 16) > number) if same else (reader._get_realtime() > realtime):
                return  # after it: read it next
            if not reader._next():
                self._pending = False

    def start_pass(self) -> None:
        """Before a round of peek() and take(): peek() may look again once per round."""
        self._looked_again = False

    def peek(self) -> int | None:
        """Position on the next entry without taking it: its realtime (microseconds), None at
        the end. For reading several journals in time order (received.py)."""
        reader = self._reader
        if not self._pending:
            try:
                self._consumed = reader._get_cursor()  # the entry taken last: where a commit stops
            except OSError:
                pass  # nothing taken yet: the position is still the one sought
            while not reader._next():
                if self._looked_again or not self.matches or not self._look_again():
                    return None
                self._looked_again = True
            self._pending = True
        return reader._get_realtime()

    def take(self) -> JournalEntry:
        """The entry peek() positioned on; read it before peeking this follower again."""
        self._pending = False
        return JournalEntry(self._reader, self.sender)

    def taken_cursor(self) -> str | None:
        """The cursor of the last entry taken (None if none was since the last seek)."""
        if self._pending:
            return self._consumed
        try:
            return self._reader._get_cursor()
        except OSError:
            return None

    def _position(self) -> str | None:
        """Where reading goes on after: the entry taken last, else the cursor sought (a journal with
        nothing after it yet has no current entry)."""
        return self.taken_cursor() or self._consumed

    def _look_again(self) -> bool:
        """At the end: step back onto the last entry read, so that the next step looks afresh.

        With matches, sd-journal (systemd 252) sometimes steps past an entry that journald
        was still writing when it looked (the entry arrays of the match's field lag behind),
        and then never returns it, though any reader that looks afresh can read it: 29 of
        400 logins in a tight loop, measured. Seeking back to the last entry read makes the
        next sd_journal_next() walk from there again. True when positioned to read on.
        """
        reader = self._reader
        try:
            cursor = reader._get_cursor()  # the last entry read: sd_journal_next() did not move
            reader.seek_cursor(cursor)
            return bool(reader._next()) and reader.test_cursor(cursor)
        except OSError:  # no entry read yet, or it was vacuumed meanwhile
            return False

    def companion(self, matches: Iterable[str] | None) -> "JournalFollower":
        """Another follower of the same journal (directory, files or the system's), with other matches."""
        return JournalFollower(matches, directory=self.directory, files=self.files)

    def earliest_time(self) -> float | None:
        """When the oldest entry this journal still holds was written (seconds), None if it is empty."""
        oldest = self.companion(None)
        try:
            oldest._reader.seek_head()
            if not oldest._reader._next():
                return None
            return oldest._reader._get_realtime() / 1e6
        finally:
            oldest.close()

    def cursor(self) -> str | None:
        """The cursor of the entry last read, or None if the journal cannot give it."""
        try:
            return self._reader._get_cursor()
        except OSError as error:
            log.warning("cannot read the cursor of the current journal entry: %s", error)
            return None

    def fileno(self) -> int:
        return self._reader.fileno()

    def process(self) -> bool:
        """Consume the journal's inotify events after its descriptor turned readable; True when
        journal files were added or removed (following the live files, it then opens them anew)."""
        position = self._position() if self._live_files is not None else None
        changed = self._reader.process() == journal.INVALIDATE  # a file gone: its entries with it
        if changed and self._live_files is not None:
            self._follow_live(self._live_inodes, self._live_since, position)
        return changed

    def reopen(self, cursor: str | None, fallback_realtime: float) -> str:
        """Start over with a fresh journal handle (after errors reading the old one), over every
        file again: the cursor may lie anywhere in the journal."""
        self._live_files = None
        return self._replace_handle(cursor, fallback_realtime, None)

    def look_afresh(self, cursor: str | None, fallback_realtime: float) -> str:
        """For a decision waiting on a login that the last read did not find: see what the
        long-lived handle may have stepped past (_look_again catches most, not all). A handle of
        its own, opened afresh, looks after `cursor`; the long-lived one is replaced only when that
        finds an entry which it does not give next (or the files followed changed): closing a handle
        that watches with inotify waits for the kernel, up to 24 ms measured, while a decision waits."""
        files = self._live_files
        if files is not None:
            files = live_files(self._live_inodes, self._live_since) or None
        if files == self._live_files and not self._pending:
            found = self._first_after(cursor)
            if found is None:
                return Position.RESUMED  # nothing after it: nothing was stepped past
            if found is not _GONE and self._reader._next() and self._reader.test_cursor(found):
                self._pending = True  # it only came after the last read: read it next
                self._consumed = cursor
                return Position.RESUMED
        return self._replace_handle(cursor, fallback_realtime, files)

    def _replace_handle(self, cursor: str | None, fallback_realtime: float, live: list[str] | None) -> str:
        """A fresh handle on the files followed (`live`, when following the live files), after `cursor`."""
        if self._live_files is not None:
            self._live_files = live
            self._live_inodes = {inode for inode in map(_inode, live or ()) if inode is not None}
            self._live_since = time.time()
        self._reader.close()
        self._reader = self._open()
        self.handles_opened += 1
        self._pending = False
        return self.seek(cursor, fallback_realtime)

    def _first_after(self, cursor: str | None) -> str | None:
        """The cursor of the first entry after `cursor` (None: after the time sought last, nothing
        having been read since) that a fresh handle gives, None if there is none, _GONE if
        `cursor`'s entry is not there to go on from."""
        probe = self._open(watch=False)
        try:
            if cursor is None:
                probe.seek_realtime(int(self._fallback * 1_000_000))
            else:
                probe.seek_cursor(cursor)
                if not probe._next():
                    return None
                if not probe.test_cursor(cursor):
                    return _GONE
            return probe._get_cursor() if probe._next() else None
        except (OSError, ValueError):
            return _GONE
        finally:
            probe.close()  # it never watched: closed at once

    def close(self) -> None:
        self._reader.close()


def cursor_fields(cursor: str) -> dict[str, str]:
    """A cursor's fields: s (the sequence-number ID), i (its number), t (its realtime), in hex."""
    return dict(part.split("=", 1) for part in cursor.split(";") if "=" in part)


def entry_number(cursor: str | None) -> tuple[str, int] | None:
    """(sequence-number ID, number) of the entry a cursor names; None for none or an unreadable one."""
    if not cursor:
        return None
    fields = cursor_fields(cursor)
    try:
        return fields["s"], int(fields["i"], 16)
    except (KeyError, ValueError):
        return None


def last_entry_number(path: str) -> tuple[str, int] | None:
    """entry_number() of a journal file's last entry; None when the file cannot be read or is empty."""
    try:
        reader = journal._Reader(flags=0, files=[path])
    except (OSError, ValueError):
        return None
    try:
        reader.seek_tail()
        return entry_number(reader._get_cursor()) if reader._previous() else None
    except OSError:
        return None
    finally:
        reader.close()


def _machine_directories() -> list[str]:
    from systemd import id128

    machine = id128.get_machine().hex
    return [f"{base}/{machine}" for base in JOURNAL_DIRECTORIES]


def _online_inodes() -> set[int]:
    """The inodes of the system.journal files journald writes now."""
    found = (_inode(f"{directory}/{ONLINE_FILE}") for directory in _machine_directories())
    return {inode for inode in found if inode is not None}


def live_files(known: set[int], since: float) -> list[str]:
    """The system journal's files that may hold entries not read yet by a follower that had read all
    but the files `known` (inodes) at `since` (seconds): system.journal in each directory; the
    archived files (system@SEQNUM_ID-HEAD_SEQNUM-HEAD_REALTIME.journal) among `known`, which a
    rotation renamed; and those whose first entry came after `since` (less a second, for the clock),
    which were made and archived since, by rotations in a row."""
    files = []
    for directory in _machine_directories():
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue
        for entry in entries:
            name = entry.name
            if name == ONLINE_FILE:
                files.append(entry.path)
            elif name.startswith("system@") and name.endswith(".journal"):
                head = name[:-len(".journal")].rpartition("-")[2]
                try:
                    recent = int(head, 16) / 1e6 >= since - 1
                except ValueError:
                    recent = True  # a name of another form: read it rather than miss it
                if recent or entry.inode() in known:
                    files.append(entry.path)
    return files


def _inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None
