"""Following the journal: the thin shell over python-systemd's low-level reader.

Reads only the fields login parsing needs (fetching every field of every entry is
what makes the high-level Reader slow), resumes from a saved cursor, and waits for new
entries on the journal's inotify descriptor instead of polling. See sd_journal_open(3),
sd_journal_seek_cursor(3), sd_journal_wait(3).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

from systemd import journal

log = logging.getLogger("poplock.follow")

FIELDS = ("MESSAGE", "_UID", "_SYSTEMD_UNIT", "SYSLOG_IDENTIFIER", "_PID", "_COMM")


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
                 files: list[str] | None = None):
        self.matches = list(matches) if matches is not None else None
        self.directory = directory
        self.files = files
        self._reader = self._open()
        self._pending = False  # the current entry is positioned on but not yet read

    def _open(self) -> journal._Reader:
        # sd_journal_open_directory/_files take no flags: 0 must be given explicitly.
        if self.directory is not None:
            reader = journal._Reader(flags=0, path=self.directory)
        elif self.files is not None:
            reader = journal._Reader(flags=0, files=self.files)
        else:
            reader = journal._Reader(flags=journal.LOCAL_ONLY | journal.SYSTEM)
        for match in self.matches or ():
            reader.add_match(match)
            reader.add_disjunction()
        return reader

    def seek(self, cursor: str | None, fallback_realtime: float) -> str:
        """Position just after `cursor`, else at `fallback_realtime` (seconds); returns a Position."""
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

    def read(self, limit: int) -> Iterator[tuple[dict[str, str] | None, str]]:
        """Up to `limit` of the entries available now, as (fields, cursor).

        fields is None for an entry the journal could not read (corrupt data); its
        cursor is still given so the caller can move past it.
        """
        reader = self._reader
        for _ in range(limit):
            if self._pending:
                self._pending = False
            elif not reader._next():
                return
            try:
                cursor = reader._get_cursor()
            except OSError as error:
                log.warning("skipping a journal entry without a cursor: %s", error)
                continue
            try:
                fields = {"__REALTIME_TIMESTAMP": str(reader._get_realtime())}
                for name in FIELDS:
                    try:
                        fields[name] = reader._get(name).decode("utf-8", "replace")
                    except KeyError:
                        pass
            except OSError as error:
                log.warning("skipping an unreadable journal entry (%s): %s", cursor, error)
                fields = None
            yield fields, cursor

    def fileno(self) -> int:
        return self._reader.fileno()

    def process(self) -> None:
        """Consume the journal's inotify events after its descriptor turned readable."""
        self._reader.process()

    def wait(self, timeout: float) -> None:
        """Block until the journal changes or `timeout` seconds pass."""
        self._reader.wait(int(timeout * 1_000_000))

    def reopen(self, cursor: str | None, fallback_realtime: float) -> str:
        """Start over with a fresh journal handle (after errors reading the old one)."""
        self._reader.close()
        self._reader = self._open()
        self._pending = False
        return self.seek(cursor, fallback_realtime)

    def close(self) -> None:
        self._reader.close()
