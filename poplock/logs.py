"""Logging for poplock's Python programs: native journal entries under systemd, plain stderr otherwise.

Under systemd stderr is a journal stream ($JOURNAL_STREAM names its device and inode);
then entries go to the journal natively, so each event carries its MESSAGE_ID and
POPLOCK_* fields. Elsewhere (a terminal, tcpserver, tests) one line per message on
stderr: "poplock-reader: warning: ...".
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import logging
import sys

from poplock.connection import JOURNAL_SOCKET, stderr_is_journal
from poplock.events import Event


def plain_line(identifier: str, level: int, text: str) -> str:
    """How a message reads on stderr: "poplock-reader: warning: ..." (no level word for info)."""
    if level >= logging.WARNING:
        text = f"{logging.getLevelName(level).lower()}: {text}"
    return f"{identifier}: {text}"


# Where events go, written straight to the places the handlers write to: a catch-up logs
# thousands of grants, and a LogRecord for each costs more than reading the entries.
# (threshold level, write(level, text, fields)) pairs; empty until setup_logging().
_event_outputs: list[tuple[int, object]] = []


# Lines for stderr collected by held_lines(), or None when each line is written at once.
_held_lines: list[str] | None = None


def _write_stderr(text: str) -> None:
    try:
        sys.stderr.write(text)
        sys.stderr.flush()
    except (OSError, ValueError, AttributeError):  # stderr closed or gone (None): nowhere left to say it
        pass


def _stderr_output(identifier: str):
    def write(level: int, text: str, fields: dict) -> None:
        line = plain_line(identifier, level, text) + "\n"
        if _held_lines is not None:
            _held_lines.append(line)
        else:
            _write_stderr(line)
    return write


@contextlib.contextmanager
def held_lines():
    """Lines for stderr inside the block are written together at its end, in one write:
    a catch-up reports thousands of grants. (The journal gets its entries one by one.)"""
    global _held_lines
    if _held_lines is not None:  # already inside one
        yield
        return
    _held_lines = []
    try:
        yield
    finally:
        lines, _held_lines = _held_lines, None
        if lines:
            _write_stderr("".join(lines))


def _journal_output(identifier: str, fallback=None):
    """Native journal entries; when journald cannot take one, `fallback` gets it (if any)."""
    # The C module's sendv(), as systemd.journal.send() calls it: that module's Python layer
    # imports uuid, traceback and more at every program's start.
    from systemd._journal import sendv

    def write(level: int, text: str, fields: dict) -> None:
        try:
            # CODE_* given, as journald would otherwise have none (send() walks the stack for them).
            sendv("MESSAGE=" + text, f"PRIORITY={_journal_priority(level)}", "SYSLOG_IDENTIFIER=" + identifier,
                  "CODE_FILE=poplock", "CODE_LINE=0", "CODE_FUNC=" + identifier,
                  *[f"{name}={value}" for name, value in fields.items()])
        except OSError:  # journald restarting, stopped, or its queue full: never fail the caller
            if fallback is not None:
                fallback(level, text, fields)
    write.is_journal = True
    return write


def events_reach_the_journal() -> bool:
    """setup_logging() found journald: events logged now leave a journal entry."""
    return any(getattr(write, "is_journal", False) for _, write in _event_outputs)


def journal_reachable() -> bool:
    """journald listens on its socket (a socket file left by a stopped journald refuses)."""
    import socket

    return unix_socket_answers(JOURNAL_SOCKET, socket.SOCK_DGRAM)


def unix_socket_answers(path: str, kind: int) -> bool:
    """Something listens on the unix socket at `path` (SOCK_STREAM or SOCK_DGRAM)."""
    import socket

    probe = socket.socket(socket.AF_UNIX, kind)
    try:
        probe.connect(path)
        return True
    except OSError:
        return False
    finally:
        probe.close()


def _journal_priority(level: int) -> int:
    """The syslog(3) priority of a logging level, as python-systemd's JournalHandler maps it."""
    for threshold, priority in ((logging.DEBUG, 7), (logging.INFO, 6), (logging.WARNING, 4),
                                (logging.ERROR, 3), (logging.CRITICAL, 2)):
        if level <= threshold:
            return priority
    return 1


class _OutputHandler(logging.Handler):
    """A logging handler over one output: the records and the direct events land alike."""

    def __init__(self, write, level: int, *, with_traceback: bool):
        super().__init__(level)
        self.write = write
        self.with_traceback = with_traceback

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info and self.with_traceback:
            text += "\n" + logging.Formatter().formatException(record.exc_info)
        self.write(record.levelno, text, {})


def _add_output(logger: logging.Logger, level: int, write, *, with_traceback: bool) -> None:
    logger.addHandler(_OutputHandler(write, level, with_traceback=with_traceback))
    _event_outputs.append((level, write))


def setup_logging(identifier: str, level: int = logging.INFO, *, stderr_level: int | None = None,
                  also_journal: bool = False) -> None:
    """Send the "poplock" loggers to the journal (natively) or to stderr.

    `also_journal` (the CLI): when stderr is a terminal, events still reach the journal
    if journald runs, so administrative changes leave a trail there; stderr then shows
    only what reaches `stderr_level`.
    """
    # Documented logging optimisations: poplock's records need no caller frame, thread
    # or process details.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    logger = logging.getLogger("poplock")
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(level)
    _event_outputs.clear()
    verbose = level <= logging.DEBUG
    if stderr_is_journal():
        _add_output(logger, level, _journal_output(identifier, fallback=_stderr_output(identifier)),
                    with_traceback=True)
        return
    _add_output(logger, stderr_level if stderr_level is not None else level, _stderr_output(identifier),
                with_traceback=verbose)
    if also_journal and journal_reachable():
        _add_output(logger, level, _journal_output(identifier), with_traceback=True)


@functools.lru_cache(maxsize=4096)  # a catch-up logs thousands of grants within the same seconds
def _iso_second(second: int) -> str:
    try:
        return datetime.datetime.fromtimestamp(second).astimezone().isoformat(timespec="seconds")
    except (ValueError, OverflowError, OSError):  # a damaged value, far outside datetime's years
        return f"@{second}"


def iso_time(seconds: float) -> str:
    """A point in time as ISO 8601 in local time with its offset, to the second."""
    return _iso_second(int(seconds))


def log_event(logger: logging.Logger, level: int, event: Event, message: str, *args,
              address: str | None = None, source: str | None = None, unit: str | None = None,
              expires: float | None = None, store: str | None = None, user: str | None = None,
              host: str | None = None, login: float | None = None) -> None:
    """Log one event with its MESSAGE_ID and POPLOCK_* fields (fields reach the journal only)."""
    if _event_outputs and not logger.isEnabledFor(level):  # a refusal at debug level: once a miss
        return
    fields = {"MESSAGE_ID": event.message_id, "POPLOCK_EVENT": event.name}
    if address is not None:
        fields["POPLOCK_CLIENT_ADDRESS"] = address
    if source is not None:
        fields["POPLOCK_SOURCE"] = source
    if unit is not None:
        fields["POPLOCK_SOURCE_UNIT"] = unit
    if expires is not None:
        fields["POPLOCK_EXPIRES"] = iso_time(expires)
    if store is not None:
        fields["POPLOCK_STORE"] = store
    if login is not None:  # a change made by hand: the login time its replay stores (changes.py)
        fields["POPLOCK_LOGIN_TIME"] = iso_time(login)
    if host is not None:  # the POP host whose received journal held the login (received.py)
        fields["POPLOCK_POP_HOST"] = host
    if user is not None:  # a field, never the message: user names are not for every log reader
        fields["POPLOCK_USER"] = user
    if not _event_outputs:  # logging not set up by a program (a library caller): plain logging
        logger.log(level, message, *args, extra=fields)
        return
    text = message % args if args else message
    for threshold, write in _event_outputs:
        if level >= threshold:
            write(level, text, fields)
