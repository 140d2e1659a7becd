"""Journals received from POP hosts ([Reader] Directory=), each sender followed on its own.

systemd-journal-remote --split-mode=host writes each sender's entries to files named
after the TCP peer's address: `remote-ADDRESS.journal`, rotated to
`remote-ADDRESS@SEQNUM_ID-FIRST-TIME.journal`. That address is the only word on who sent
an entry that the sender cannot forge: every field inside, _HOSTNAME, _UID and
_SYSTEMD_UNIT included, is what the sender's own journald (or whoever posed as it) wrote.
So each entry is handed on with the sender its file names (JournalEntry.sender), and the
trust rule asks that first ([Source:NAME] Hosts=, reader.py).

Entries of different senders arrive late and out of order. One sd-journal over the
whole directory interleaves its files by timestamp, and a position in it skips for good
an entry that lands in one sender's file behind a later-stamped entry already read from
another's. Here each sender's files are a journal of their own (one sequence-number ID
across its rotations, so one order), and the position is one cursor per sender: no
entry is skipped, whatever the order they arrive in. Between senders the entries
available are taken in time order, so two readers of the same files read them alike.
This host's own journal (administrative changes, local sources) is one more stream.

`ReceivedJournals` has JournalFollower's interface; the position it commits is the text
encode_positions() makes. See systemd-journal-remote(8), sd_journal_open_files(3).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import select
from collections.abc import Callable, Iterable, Iterator

from poplock.follow import JournalEntry, JournalFollower, Position, entry_number, last_entry_number

log = logging.getLogger("poplock.received")

LOCAL = "local"  # the stream of this host's own journal
_MAGIC = "received:1"


def sender_of(filename: str) -> str | None:
    """The sender's address a received journal file is named after (compressed), or None.

    >>> sender_of("remote-10.123.0.11@0f1e-0000000000000001-0005f1.journal")
    '10.123.0.11'
    """
    for suffix in (".journal", ".journal~"):
        if filename.endswith(suffix):
            stem = filename[:-len(suffix)]
            break
    else:
        return None
    if not stem.startswith("remote-"):
        return None
    name = stem[len("remote-"):].partition("@")[0]
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # an IPv4 sender to a dual-stack listener
    return str(address)


def encode_positions(positions: dict[str, str]) -> str:
    """One line for the store and the cursor file: each stream's cursor, streams sorted."""
    return " ".join([_MAGIC] + [f"{name}|{cursor}" for name, cursor in sorted(positions.items())])


def decode_positions(text: str | None) -> dict[str, str]:
    """encode_positions()'s inverse. A plain cursor (a reader that read this host's journal
    alone, before Directory= was set) is the local stream's position."""
    if not text:
        return {}
    words = text.split(" ")
    if words[0] != _MAGIC:
        return {LOCAL: text}
    positions = {}
    for word in words[1:]:
        name, separator, cursor = word.partition("|")
        if separator and name and cursor:
            positions[name] = cursor
    return positions


def senders_in(directory: str) -> dict[str, list[str]]:
    """sender address -> its files in `directory` (sorted); files named otherwise are not a sender's."""
    senders: dict[str, list[str]] = {}
    with os.scandir(directory) as entries:
        for item in entries:
            sender = sender_of(item.name)
            if sender is not None and item.is_file():
                senders.setdefault(sender, []).append(item.path)
    return {sender: sorted(files) for sender, files in senders.items()}


def files_after(files: list[str], cursor: str | None,
                last_entry: Callable[[str], tuple[str, int] | None]) -> list[str]:
    """Of one sender's files (sorted), those that can hold an entry after `cursor`, its stream's
    position: all of them without one; else all but the archived files whose last entry
    (`last_entry(path)`: its sequence-number ID and number, None when it cannot be told) comes
    before the cursor's in the same numbering. Archived files never change; journal-remote writes
    the online one. With matches, each read looks into every file open, and a sender's archived
    files pile up, one a rotation, until they are vacuumed."""
    position = entry_number(cursor)
    if position is None:
        return list(files)
    kept = []
    for path in files:
        last = None if "@" not in os.path.basename(path) else last_entry(path)
        if last is None or last[0] != position[0] or last[1] >= position[1]:
            kept.append(path)
    return kept or list(files[-1:])


class ReceivedJournals:
    """This host's journal plus each listed sender's received files, read as one in time order.

    `local` is this host's journal (a JournalFollower); `matches_for(sender)` gives the
    matches for a sender's files, None for a sender no source lists (its files are not read).
    """

    def __init__(self, directory: str, local: JournalFollower,
                 matches_for: Callable[[str], list[str] | None]):
        self.directory = directory
        self.local = local
        self.matches_for = matches_for
        self.matches = local.matches
        self._streams: dict[str, JournalFollower] = {LOCAL: local}
        self._files: dict[str, list[str]] = {}  # each sender's files
        self._opened: dict[str, list[str]] = {}  # and those its stream has open (files_after)
        self._last_entries: dict[tuple, tuple[str, int] | None] = {}  # archived files' (they never change)
        self._positions: dict[str, str] = {}  # streams' cursors, those of senders gone quiet included
        self._fallback = 0.0
        self._ignored: set[str] = set()  # unlisted senders already logged
        self._announced: set[str] = set()  # listed senders already logged
        # Woken by this host's journal and by any change in the directory (new entries, files).
        self._notifier = JournalFollower(None, directory=directory)
        self._poll = select.epoll()
        self._poll.register(local.fileno(), select.EPOLLIN)
        self._poll.register(self._notifier.fileno(), select.EPOLLIN)
        self._rescan()

    def _rescan(self) -> None:
        """Open new senders' files, reopen a sender whose files rotated or were removed."""
        try:
            found = senders_in(self.directory)
        except OSError as error:
            log.warning("cannot list the received journals in %s: %s", self.directory, error.strerror or error)
            return
        for sender, files in found.items():
            if files == self._files.get(sender):
                continue
            matches = self.matches_for(sender)
            if matches is None:
                if sender not in self._ignored:
                    self._ignored.add(sender)
                    log.warning("%s: journal files from %s, which no [Source:NAME] Hosts= lists: not read",
                                self.directory, sender)
                continue
            old = self._streams.get(sender)
            if old is not None:
                self._remember(sender, old)  # where it is now, before it is opened anew
            self._files[sender] = files
            self._open_stream(sender, matches, self._positions.get(sender), self._fallback)
            if sender not in self._announced:
                self._announced.add(sender)
                log.info("reading the journal received from %s", sender)
        for sender in [name for name in self._files if name not in found]:  # every file removed
            stream = self._streams.pop(sender)
            self._remember(sender, stream)
            stream.close()
            del self._files[sender], self._opened[sender]
        present = {path for files in found.values() for path in files}
        self._last_entries = {key: last for key, last in self._last_entries.items() if key[0] in present}

    def _open_stream(self, sender: str, matches: list[str], cursor: str | None, fallback_realtime: float) -> str:
        """A sender's stream, anew, on the files that can hold entries after `cursor`, and after it
        (its Position)."""
        old = self._streams.pop(sender, None)
        if old is not None:
            old.close()
        files = files_after(self._files[sender], cursor, self._last_entry)
        stream = JournalFollower(matches, files=files, sender=sender)
        self._streams[sender] = stream
        self._opened[sender] = files
        return stream.seek(cursor, fallback_realtime)

    def _last_entry(self, path: str) -> tuple[str, int] | None:
        try:
            status = os.stat(path)
        except OSError:
            return None
        key = (path, status.st_ino, status.st_size, status.st_mtime_ns)
        if key not in self._last_entries:
            self._last_entries[key] = last_entry_number(path)
        return self._last_entries[key]

    def _remember(self, name: str, stream: JournalFollower) -> None:
        cursor = stream.taken_cursor()
        if cursor is not None:
            self._positions[name] = cursor

    def seek(self, cursor: str | None, fallback_realtime: float) -> str:
        """Each stream just after its own cursor; a stream without one at `fallback_realtime`."""
        self._positions = decode_positions(cursor)
        self._fallback = fallback_realtime
        results = []
        for name, stream in list(self._streams.items()):
            position = self._positions.get(name)
            # A position further back (a rebuild) needs the files before the one the stream has open.
            if name in self._files and files_after(self._files[name], position, self._last_entry) != self._opened[name]:
                results.append(self._open_stream(name, stream.matches, position, fallback_realtime))
            else:
                results.append(stream.seek(position, fallback_realtime))
        for position in (Position.CURSOR_INVALID, Position.ENTRY_GONE, Position.RESUMED):
            if position in results:
                return position
        return Position.NO_CURSOR

    def read(self, limit: int | None) -> Iterator[JournalEntry]:
        """Up to `limit` entries available now, the earliest of the streams' next ones first."""
        streams = list(self._streams.items())
        heads: dict[str, tuple[int, JournalFollower]] = {}
        for name, stream in streams:
            stream.start_pass()
            time = stream.peek()
            if time is not None:
                heads[name] = (time, stream)
        count = 0
        while heads and (limit is None or count < limit):
            name = min(heads, key=lambda stream_name: (heads[stream_name][0], stream_name))
            stream = heads[name][1]
            count += 1
            yield stream.take()
            time = stream.peek()
            if time is None:
                del heads[name]
            else:
                heads[name] = (time, stream)

    def cursor(self) -> str | None:
        for name, stream in self._streams.items():
            self._remember(name, stream)
        return encode_positions(self._positions) if self._positions else None

    def readable(self) -> bool:
        return any(stream.readable() for stream in self._streams.values())

    def companion(self, matches: Iterable[str] | None) -> JournalFollower:
        """Another follower of this host's journal: administrative changes are trusted only there."""
        return self.local.companion(matches)

    def earliest_time(self) -> float | None:
        """The latest of the streams' oldest entries, in all of each sender's files (a stream may have
        only those after its position open): before then, some stream cannot be read again."""
        times = [self.local.earliest_time()]
        for files in self._files.values():
            every = JournalFollower(None, files=files)
            try:
                times.append(every.earliest_time())
            finally:
                every.close()
        times = [time for time in times if time is not None]
        return max(times) if times else None

    def fileno(self) -> int:
        return self._poll.fileno()

    def process(self) -> bool:
        """Consume the journals' change notifications; a sender's new or rotated files are opened."""
        self.local.process()
        try:
            changed = self._notifier.process()
        except OSError as error:
            log.warning("lost the watch on %s (%s): looking at it afresh", self.directory, error)
            self._notifier.close()
            self._reopen_notifier()
            changed = True
        if changed:
            self._rescan()
        return changed

    def _reopen_notifier(self) -> None:
        try:
            self._poll.unregister(self._notifier.fileno())
        except (OSError, ValueError):
            pass
        self._notifier = JournalFollower(None, directory=self.directory)
        self._poll.register(self._notifier.fileno(), select.EPOLLIN)

    def reopen(self, cursor: str | None, fallback_realtime: float) -> str:
        """Start over with fresh handles on every stream and the directory."""
        try:
            self._poll.unregister(self.local.fileno())
        except (OSError, ValueError):
            pass
        for name, stream in list(self._streams.items()):
            if name != LOCAL:
                stream.close()
        self.local.reopen(None, fallback_realtime)
        self._poll.register(self.local.fileno(), select.EPOLLIN)
        self._notifier.close()
        self._reopen_notifier()
        self._streams = {LOCAL: self.local}
        self._files = {}
        self._opened = {}
        self._positions = decode_positions(cursor)
        self._fallback = fallback_realtime
        self._rescan()
        return self.seek(cursor, fallback_realtime)

    def look_afresh(self, cursor: str | None, fallback_realtime: float) -> str:
        """For a decision waiting on a login that the last read did not find: the directory's files
        looked at again (a sender's new file that no notification told of yet), then each stream
        looks afresh (JournalFollower.look_afresh: its handle is replaced only when it stepped past
        an entry). Reopening every handle, as reopen() does, closed the inotify descriptors of this
        host's journal and of the directory, each up to 24 ms, while the decision waited."""
        positions = decode_positions(cursor)
        self._rescan()
        opened = self.local.handles_opened
        for name, stream in self._streams.items():
            stream.look_afresh(positions.get(name), fallback_realtime)
        if self.local.handles_opened != opened:  # its old descriptor is closed, and gone from the poll
            try:
                self._poll.register(self.local.fileno(), select.EPOLLIN)
            except FileExistsError:  # the same descriptor after all
                pass
        return Position.RESUMED

    def close(self) -> None:
        for stream in self._streams.values():
            stream.close()
        self._notifier.close()
        self._poll.close()
