"""A real journald for tests, and real journal files made from export format.

There is no systemd as PID 1 on test machines, so the tests start the standalone
journald themselves when none is running, and link /dev/log to it so that syslog(3)
clients (Dovecot, logger) reach it. It is one journal for the whole machine: every
test tags what it writes (a unique SYSLOG_IDENTIFIER or field) and matches on that.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path

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
