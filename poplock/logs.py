"""Logging for poplock's Python programs: native journal entries under systemd, plain stderr otherwise.

Under systemd stderr is a journal stream ($JOURNAL_STREAM names its device and inode);
then entries go to the journal natively, so each event carries its MESSAGE_ID and
POPLOCK_* fields. Elsewhere (a terminal, tcpserver, tests) one line per message on
stderr: "poplock-reader: warning: ...".
"""

from __future__ import annotations

import datetime
import functools
import logging
import os
import sys

from poplock.events import Event

JOURNAL_SOCKET = "/run/systemd/journal/socket"


def stderr_is_journal() -> bool:
    stream = os.environ.get("JOURNAL_STREAM", "")
    device, _, inode = stream.partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (int(device), int(inode))


class _PlainFormatter(logging.Formatter):
    def __init__(self, identifier: str):
        super().__init__()
        self.identifier = identifier

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.levelno >= logging.WARNING:
            text = f"{record.levelname.lower()}: {text}"
        if record.exc_info and logging.getLogger("poplock").isEnabledFor(logging.DEBUG):
            text += "\n" + self.formatException(record.exc_info)
        return f"{self.identifier}: {text}"


def setup_logging(identifier: str, level: int = logging.INFO, *, stderr_level: int | None = None,
                  also_journal: bool = False) -> None:
    """Send the "poplock" loggers to the journal (natively) or to stderr.

    `also_journal` (the CLI): when stderr is a terminal, events still reach the journal
    if journald runs, so administrative changes leave a trail there; stderr then shows
    only what reaches `stderr_level`.
    """
    # Documented logging optimisations: poplock's records need no caller frame, thread
    # or process details, and a catch-up logs thousands of grants.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logger = logging.getLogger("poplock")
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(level)
    if stderr_is_journal():
        logger.addHandler(_journal_handler(identifier))
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_PlainFormatter(identifier))
    handler.setLevel(stderr_level if stderr_level is not None else level)
    logger.addHandler(handler)
    if also_journal and os.path.exists(JOURNAL_SOCKET):
        logger.addHandler(_journal_handler(identifier))


def _journal_handler(identifier: str) -> logging.Handler:
    from systemd.journal import JournalHandler

    return JournalHandler(SYSLOG_IDENTIFIER=identifier)


@functools.lru_cache(maxsize=4096)  # a catch-up logs thousands of grants within the same seconds
def _iso_second(second: int) -> str:
    return datetime.datetime.fromtimestamp(second).astimezone().isoformat(timespec="seconds")


def iso_time(seconds: float) -> str:
    """A point in time as ISO 8601 in local time with its offset, to the second."""
    return _iso_second(int(seconds))


def log_event(logger: logging.Logger, level: int, event: Event, message: str, *args,
              address: str | None = None, source: str | None = None, unit: str | None = None,
              expires: float | None = None) -> None:
    """Log one event with its MESSAGE_ID and POPLOCK_* fields (fields reach the journal only)."""
    fields = {"MESSAGE_ID": event.message_id, "POPLOCK_EVENT": event.name}
    if address is not None:
        fields["POPLOCK_CLIENT_ADDRESS"] = address
    if source is not None:
        fields["POPLOCK_SOURCE"] = source
    if unit is not None:
        fields["POPLOCK_SOURCE_UNIT"] = unit
    if expires is not None:
        fields["POPLOCK_EXPIRES"] = iso_time(expires)
    logger.log(level, message, *args, extra=fields)
