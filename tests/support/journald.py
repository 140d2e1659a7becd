"""A real journald for tests, and real journal files made from export format.

There is no systemd as PID 1 on test machines, so the tests start the standalone
journald themselves when none is running, and link /dev/log to it so that syslog(3)
clients (Dovecot, logger) reach it. It is one journal for the whole machine: every
test tags what it writes (a unique SYSLOG_IDENTIFIER or field) and matches on that.

A test that must read a server's entries under the server's own identifiers, and
nothing else, gives the server a PrivateJournald instead: the same journald binary
with sockets and files of its own, which only that server's mount namespace sees.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from .processes import Service

JOURNALD = "/lib/systemd/systemd-journald"
JOURNAL_REMOTE = "/lib/systemd/systemd-journal-remote"
SOCKET = Path("/run/systemd/journal/socket")
DEV_LOG = Path("/run/systemd/journal/dev-log")


def ensure_journald() -> None:
    """Start a standalone journald unless one already answers on its socket."""
    if not _journald_answers():
        SOCKET.parent.mkdir(parents=True, exist_ok=True)
        subprocess.Popen(
            [JOURNALD],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 10
        while not _journald_answers():
            if time.monotonic() > deadline:
                raise RuntimeError("systemd-journald did not start")
            time.sleep(0.02)
    if not (os.path.islink("/dev/log") and os.readlink("/dev/log") == str(DEV_LOG)):
        if os.path.lexists("/dev/log"):
            os.unlink("/dev/log")
        os.symlink(DEV_LOG, "/dev/log")


def _journald_answers() -> bool:
    return SOCKET.exists() and accepts_datagrams(SOCKET)


def accepts_datagrams(path: Path) -> bool:
    """Something listens on the unix datagram socket at `path` (journald's, or a private one's)."""
    import socket

    from poplock.logs import unix_socket_answers

    return unix_socket_answers(str(path), socket.SOCK_DGRAM)


def unique_tag(prefix: str = "poplock-test") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def wait_for_entries(match: Mapping[str, str], count: int, timeout: float = 10.0) -> list[dict]:
    """Wait until the journal holds `count` entries with all of `match`; returns them."""
    from systemd import journal

    deadline = time.monotonic() + timeout
    while True:
        reader = journal.Reader()
        for field, value in match.items():
            reader.add_match(**{field: value})
        found = list(reader)
        reader.close()
        if len(found) >= count:
            return found
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(found)} of {count} journal entries matching {dict(match)}")
        time.sleep(0.02)


class PrivateJournald(Service):
    """systemd-journald with its sockets in `directory`/sockets and its files in `directory`/storage.

    It runs in a mount namespace of its own (unshare(1)) where those folders are bind
    mounts on /run/systemd/journal and /run/log/journal, as tests/corpus/record.py's
    journal is. A server whose namespace has SOCKETS on /run/systemd/journal logs into it
    through /dev/log (which ensure_journald() links there); nothing else does, so every
    entry in it is that server's and the system journal never sees them. journald
    computes the trusted fields (_UID, _PID, _COMM, ...) as the system one does.
    Read it with `poplock-reader -D STORAGE`, `poplock scan -D STORAGE` or entries().
    """

    def __init__(self, directory: Path):
        self.directory = directory
        self.sockets = directory / "sockets"
        self.storage = directory / "storage"
        self._process: subprocess.Popen | None = None

    def start(self) -> "PrivateJournald":
        unused = self.directory / "persistent"
        for folder in (self.sockets, self.storage, unused):
            folder.mkdir(parents=True)
        config = self.directory / "journald.conf"
        # Volatile files in `storage`; no rate limit, which would drop lines of a busy run.
        config.write_text(
            "[Journal]\nStorage=volatile\nRateLimitIntervalSec=0\nRateLimitBurst=0\n"
            "ReadKMsg=no\nForwardToSyslog=no\nForwardToWall=no\n"
        )
        binds = [(self.sockets, "/run/systemd/journal"), (self.storage, "/run/log/journal"),
                 (config, "/etc/systemd/journald.conf")]
        if Path("/var/log/journal").is_dir():
            binds.append((unused, "/var/log/journal"))
        script = ["set -e", "mkdir -p /run/log/journal"]
        script += [f"mount --bind {shlex.quote(str(source))} {target}" for source, target in binds]
        script.append(f"exec {JOURNALD}")
        with open(self.directory / "journald.out", "wb") as output:
            self._process = subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "/bin/sh", "-c", "\n".join(script)],
                stdin=subprocess.DEVNULL, stdout=output, stderr=output, start_new_session=True,
            )
        deadline = time.monotonic() + 10
        while not (accepts_datagrams(self.sockets / "dev-log") and any(self.storage.glob("*/system.journal"))):
            if self._process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the private systemd-journald did not start: see {self.directory / 'journald.out'}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None

    def entries(self) -> list[dict[str, str]]:
        """Every entry so far: SYSLOG_IDENTIFIER, MESSAGE, _UID, _PID and the rest, as text."""
        from systemd import journal

        reader = journal._Reader(flags=0, path=str(self.storage))
        found = []
        try:
            while reader._next():
                found.append({name: _text(value) for name, value in reader._get_all().items()})
        finally:
            reader.close()
        return found

    def wait_for(self, predicate: Callable[[dict[str, str]], bool], timeout: float = 15.0) -> dict[str, str]:
        """The first entry that satisfies `predicate`, once it has arrived."""
        deadline = time.monotonic() + timeout
        while True:
            for entry in self.entries():
                if predicate(entry):
                    return entry
            if time.monotonic() > deadline:
                raise TimeoutError(f"no entry in {self.storage} satisfied the condition within {timeout}s")
            time.sleep(0.05)


def _text(value: bytes | list[bytes]) -> str:
    if isinstance(value, list):  # a field given more than once in one entry
        return " ".join(map(_text, value))
    return value.decode("utf-8", "backslashreplace")


def export_entry(fields: Mapping[str, object]) -> bytes:
    """One entry in Journal Export Format (fields with newlines use the binary form)."""
    out = bytearray()
    for name, value in fields.items():
        data = value if isinstance(value, bytes) else str(value).encode()
        if b"\n" in data:
            out += name.encode() + b"\n" + len(data).to_bytes(8, "little") + data + b"\n"
        else:
            out += name.encode() + b"=" + data + b"\n"
    return bytes(out) + b"\n"


def write_journal_file(path: Path, entries: Iterable[Mapping[str, object]]) -> Path:
    """Append entries to a real journal file with systemd-journal-remote.

    Trusted fields (_UID, _SYSTEMD_UNIT, ...) can be given here, which makes fixtures
    for "this came from dovecot.service" and "this is a forgery by uid 1000". Each
    entry needs __REALTIME_TIMESTAMP (microseconds); __MONOTONIC_TIMESTAMP and
    _BOOT_ID are filled in when absent.
    """
    if not path.name.endswith(".journal"):
        raise ValueError("journal file names must end in .journal")
    boot_id = uuid.UUID(int=0x5EED).hex
    stream = bytearray()
    for fields in entries:
        complete = {"__MONOTONIC_TIMESTAMP": fields["__REALTIME_TIMESTAMP"], "_BOOT_ID": boot_id}
        complete.update(fields)
        stream += export_entry(complete)
    subprocess.run(
        [JOURNAL_REMOTE, "-o", str(path), "-"],
        input=bytes(stream),
        check=True,
        capture_output=True,
    )
    return path


def send_until_readable(message: str, identifier: str, timeout: float = 10.0) -> None:
    """Log `message` as `identifier` and return once a journal reader can read it.

    One reader follows as it goes, and a fresh one looks at the newest entry every 20 ms:
    systemd 252's reader with matches sometimes does not return the newest matching entry
    until another arrives (follow.py), and a test must not wait for one that never comes.
    """
    from systemd import journal

    watcher = journal.Reader()
    watcher.add_match(SYSLOG_IDENTIFIER=identifier)
    watcher.seek_tail()
    watcher.get_previous()
    journal.send(message, SYSLOG_IDENTIFIER=identifier)
    deadline = time.monotonic() + timeout
    next_fresh_look = time.monotonic() + 0.02
    try:
        while True:
            entry = watcher.get_next()
            if entry and entry["MESSAGE"] == message:
                return
            if time.monotonic() >= next_fresh_look:
                fresh = journal.Reader()
                try:
                    fresh.add_match(SYSLOG_IDENTIFIER=identifier)
                    fresh.seek_tail()
                    newest = fresh.get_previous()
                finally:
                    fresh.close()
                if newest and newest["MESSAGE"] == message:
                    return
                next_fresh_look = time.monotonic() + 0.02
            if time.monotonic() > deadline:
                raise TimeoutError(f"{message!r} never became readable")
            watcher.process()
            time.sleep(0.0005)
    finally:
        watcher.close()
