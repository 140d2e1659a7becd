"""What the decision services (poplock-policy, poplock-socketmap) share beside the connection
layer: the files a decision reads, looked at once per turn of the loop (Snapshots), and the
question to poplock-reader before a refusal, asked without blocking the loop (ReaderSync).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import deque

from poplock import events
from poplock.access import Decision, check_relay
from poplock.addresses import NO_DENIALS, DenyList, Network, grant_key, load_allow_list, load_deny_list
from poplock.config import Config
from poplock.connection import peer_is_us
from poplock.errors import ConfigError, StoreBusyError
from poplock.logs import log_event
from poplock.service import Warnings, describe_span
from poplock.store import find_grant, open_snapshot


class Snapshots:
    """The store, the static allow list and the deny list, re-read only when their files change.

    The open snapshot is kept until the store's file is replaced: while we hold it, its
    inode cannot be reused, so a changed (device, inode) reliably means a new snapshot.
    Each file is looked at (stat) once per turn of the event loop, however many decisions
    that turn makes: at 20,000 decisions a second three stats each were most of a
    decision's cost. forget() makes the next decision look again (after poplock-reader
    has read the journal for a refusal).
    """

    def __init__(self, config: Config):
        self.config = config
        self._looked: dict[str, object] = {}  # path -> identity, in this turn of the loop
        self._forget_scheduled = False
        self._snapshot = None
        self._snapshot_identity = None
        self._networks: list[Network] = []
        self._networks_identity = None
        self._denials: DenyList = NO_DENIALS
        self._denials_identity = None
        self.fresh: dict = {}  # key -> Grant: made by the reader's last read, its commit not yet published
        # Counts the changes to what decisions are made from (a file read again, grants told by the
        # reader): a refusal made at one count stands at the same count (decide(earlier=)).
        self.version = 0

    def _identity(self, path: str):
        if path in self._looked:
            return self._looked[path]
        identity = _identity(path)
        if not self._forget_scheduled:
            try:
                asyncio.get_running_loop().call_soon(self.forget)  # at the next turn of the loop
            except RuntimeError:  # no loop: each decision looks
                return identity
            self._forget_scheduled = True
        self._looked[path] = identity
        return identity

    def forget(self) -> None:
        self._looked.clear()
        self._forget_scheduled = False

    def read_again(self, fresh: dict | None = None) -> None:
        """After the reader's read: look at the files again, and count the grants it made that
        are not published yet (`fresh`, key -> Grant) until the next read_again()."""
        if fresh or self.fresh:
            self.version += 1
        self.fresh = fresh or {}
        self.forget()

    def denials(self) -> DenyList:
        identity = self._identity(self.config.deny_file)
        if identity != self._denials_identity:
            self._denials = load_deny_list(self.config.deny_file) if identity else NO_DENIALS
            self._denials_identity = identity
            self.version += 1
        return self._denials

    def networks(self) -> list[Network]:
        identity = self._identity(self.config.static_allow_file)
        if identity != self._networks_identity:
            self._networks = load_allow_list(self.config.static_allow_file) if identity else []
            self._networks_identity = identity
            self.version += 1
        return self._networks

    def grant(self, address: str):
        fresh = self.fresh.get(address)
        if fresh is not None:
            return fresh
        self._look_at_store()
        if self._snapshot is None:
            return None
        return find_grant(self._snapshot, address, self.config.store_path)

    def _look_at_store(self) -> None:
        identity = self._identity(self.config.store_path)
        if identity != self._snapshot_identity:
            self.close()
            if identity is not None:
                self._snapshot = open_snapshot(self.config.store_path, self.config.busy_timeout)
            self._snapshot_identity = identity
            self.version += 1

    def decide(self, address: str, now: float, earlier: tuple[int, Decision] | None = None) -> Decision:
        """access.check_relay() on these files (raises PoplockError or OSError when it cannot).

        `earlier`: before_read() of a refusal made before the reader was asked to read; it is the
        answer again, not made anew, when nothing it was made from has changed since (inbound mail
        is mostly refusals, each decided before and after a read)."""
        if earlier is not None and self._stands(*earlier, now):
            return earlier[1]
        return check_relay(address, now, self.networks(), self.grant, denials=self.denials(),
                           ipv6_prefix=self.config.ipv6_prefix)

    def before_read(self, decision: Decision) -> tuple[int, Decision]:
        """What decide(earlier=) takes for a refusal the reader is asked about."""
        return self.version, decision

    def _stands(self, version: int, decision: Decision, now: float) -> bool:
        grant = decision.grant
        if grant is not None and grant.expires_at > now:  # not expired (not begun, say): time may turn it
            return False
        self.networks()  # each read again if its file changed, which counts a change
        self.denials()
        self._look_at_store()
        return self.version == version and grant_key(decision.address, self.config.ipv6_prefix) not in self.fresh

    def failed(self, log: logging.Logger, warnings: Warnings, address: str, error: Exception, answer: str) -> None:
        """A decision that could not be made, answered `answer`: logged (to the service's `log`) at
        most once a minute for the same trouble (MTAs ask many times a second), and the store
        opened afresh next time."""
        if isinstance(error, ConfigError):
            event = events.CONFIG_INVALID  # the static allow list or the deny list went bad while running
        elif isinstance(error, StoreBusyError):
            event = events.STORE_BUSY
        else:
            event = events.STORE_FAILED
        left_out = warnings.admit(str(error), logging.ERROR, event.name)
        if left_out is not None:
            log_event(log, logging.ERROR, event, "cannot decide for %s, answering %s: %s%s", address, answer, error,
                      warnings.suffix(left_out), address=address)
        self.close()

    def close(self) -> None:
        if self._snapshot is not None:
            self._snapshot.close()
            self._snapshot = None
        self._snapshot_identity = None
        self._looked.pop(self.config.store_path, None)


def _identity(path: str):
    try:
        status = os.stat(path)
    except FileNotFoundError:
        return None
    return (status.st_dev, status.st_ino, status.st_mtime_ns, status.st_size)


class Pending:
    """An answer still to come, as ReaderSync.then() gives it: the callbacks waiting for it (the
    connection's write of its queued replies) run as soon as it is set, in that turn of the loop.
    An asyncio future would schedule each for the next turn: a flood of refusals made a handle
    and a turn's work for each."""

    __slots__ = ("_result", "_callbacks")
    _NONE = object()

    def __init__(self):
        self._result = self._NONE
        self._callbacks: list = []

    def done(self) -> bool:
        return self._result is not self._NONE

    def result(self):
        if self._result is self._NONE:
            raise asyncio.InvalidStateError("the answer is still to come")
        return self._result

    def add_done_callback(self, callback) -> None:
        if self.done():
            callback(self)
        else:
            self._callbacks.append(callback)

    def set_result(self, value) -> None:
        self._result = value
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            try:
                callback(self)
            except Exception:  # one connection's trouble must not keep the others' answers back
                logging.getLogger("poplock.service").exception("writing an answer that came late failed")


class ReaderSync:
    """Asks poplock-reader to read the journal up to now before a refusal (access.check_relay_in_files
    does the same for relaylock and `poplock check`), without blocking the loop.

    At most MAX_IN_FLIGHT questions are in flight at a time; refusals that come meanwhile
    answer after the next one, since their login may have been logged after the read began:
    a flood of refusals costs the reader a read per round trip, not one each. The questions go over
    one connection kept open, made again after a failure: a new connection per question
    cost more than the question. The question `sync grants` is answered `ok` and the grants
    the read made, before the reader's commit is synced and published (a commit's syncs took
    up to hundreds of milliseconds on a busy disk), when both ends run as the same user or
    root (SO_PEERCRED, checked here too: a socket made by anyone else tells nothing). A
    reader that does not answer within ReaderWait= leaves the store as it is."""

    # Questions on the connection at once. Two (a refusal that comes while one is in flight asked
    # about at once) halved the refusals each read answers: at 90% refusals, 21,000 decisions a
    # second when the reader had a core to itself, 7,800 when it had not; one: 17,600 either way.
    MAX_IN_FLIGHT = 1

    def __init__(self, path: str, wait: float, warnings: Warnings, on_read=None):
        self.path = path
        self.wait = wait
        self.warnings = warnings
        # Called once a read is over with the grants it made (key -> Grant), before the refusals
        # waiting for it decide again, and with none after them.
        self.on_read = on_read
        self.asked = 0  # questions sent to the reader (for the benchmark and the status)
        self._next: list = []  # (callback, future) waiting for the next read
        self._in_flight = 0
        self._link: _ReaderLink | None = None
        self._connecting: asyncio.Future | None = None  # the connection being made, for every question

    def then(self, callback):
        """A Pending of callback()'s result, called once the reader has read (or the wait is over)."""
        future = Pending()
        self._next.append((callback, future))
        if self._in_flight < self.MAX_IN_FLIGHT:
            self._ask()
        return future

    def _ask(self) -> None:
        waiting, self._next = self._next, []
        self._in_flight += 1
        self.asked += 1
        loop = asyncio.get_running_loop()
        question = _Question(self, waiting)
        question.timer = loop.call_later(self.wait, question.fail, TimeoutError())
        link = self._link
        if link is not None and not link.lost:
            link.ask(question)
        else:
            loop.create_task(self._connect_for(question))

    async def _connect_for(self, question: "_Question") -> None:
        """Ask `question` once the connection is made (once for the questions that wait). A question
        that times out meanwhile is answered then; the connection goes on being made for the next."""
        try:
            link = await self._connected()
        except OSError as error:
            question.fail(error)
            return
        if not question.over:
            link.ask(question)

    async def _connected(self) -> _ReaderLink:
        """The connection kept to the reader, made again when lost (once for the questions that wait)."""
        if self._link is not None and not self._link.lost:
            return self._link
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(
                asyncio.get_running_loop().create_unix_connection(_ReaderLink, self.path))
        connecting = self._connecting
        try:
            _, link = await asyncio.shield(connecting)
        finally:
            if self._connecting is connecting and connecting.done():
                self._connecting = None
        self._link = link
        return link

    def _failed(self, error: BaseException, link: "_ReaderLink | None") -> None:
        """A question that got no answer in time, or no reader's answer, on `link` (None: it was not
        asked yet, the connection still being made)."""
        if link is not None:  # its state is unknown now: the next question makes a new connection
            link.close()
            if link is self._link:
                self._link = None
        self.warnings.warn("reader silent", "poplock-reader did not read the journal for a refusal within "
                           "[Store] ReaderWait=%s (%s): deciding from the store as it is",
                           describe_span(self.wait), getattr(error, "strerror", None) or str(error) or "no answer")

    def _answered(self, waiting: list, fresh: dict) -> None:
        self._in_flight -= 1
        if self.on_read is not None:
            self.on_read(fresh)
        try:
            for callback, future in waiting:
                if not future.done():
                    future.set_result(callback())
        finally:
            if fresh and self.on_read is not None:
                self.on_read({})  # on disk soon, and told again by the next answer until it is
        if self._next and self._in_flight < self.MAX_IN_FLIGHT:
            self._ask()

    def close(self) -> None:
        if self._link is not None:
            self._link.close()
            self._link = None


class _Question:
    """One question to the reader and the refusals waiting for its read: answered once, by the
    reader's answer, a failure or the end of ReaderWait=, whichever comes first. Callbacks, not a
    task: the refusals are answered in the turn of the loop that reads the answer."""

    __slots__ = ("sync", "waiting", "timer", "over", "link")

    def __init__(self, sync: ReaderSync, waiting: list):
        self.sync = sync
        self.waiting = waiting
        self.timer = None
        self.over = False
        self.link: _ReaderLink | None = None  # the connection it was asked on

    def answer(self, line: bytes) -> None:
        """The reader's answer: `ok`, or `ok` and the grants the read made."""
        if self.over:
            return
        if line == b"ok":
            self._finish({})
        elif not line.startswith(b"ok "):
            self.fail(ConnectionError(f"it answered {line[:40]!r}"))
        else:
            try:
                fresh = self.link.grants(line[3:])
            except ValueError as error:
                self.fail(error)
                return
            self._finish(fresh)

    def fail(self, error: BaseException) -> None:
        self._finish({}, error)

    def _finish(self, fresh: dict, error: BaseException | None = None) -> None:
        if self.over:
            return
        self.over = True
        if self.timer is not None:
            self.timer.cancel()
        if error is not None:
            self.sync._failed(error, self.link)
        self.sync._answered(self.waiting, fresh)


class _ReaderLink(asyncio.Protocol):
    """The connection to poplock-reader's ReaderSocket=: each question a line, and its answer a line,
    in the order asked."""

    MAX_ANSWER = 512 * 1024  # bytes: "ok", "error", or "ok" and up to 1,000 grants

    def __init__(self):
        self.transport = None
        self.lost = False
        self._buffer = b""
        self._questions: deque[_Question] = deque()  # the questions not answered yet, in order

    def connection_made(self, transport) -> None:
        self.transport = transport
        connection = transport.get_extra_info("socket")
        self.peer_may_tell = connection is not None and peer_is_us(connection)

    def ask(self, question: _Question) -> None:
        question.link = self
        self._questions.append(question)
        self.transport.write(b"sync grants\n" if self.peer_may_tell else b"sync\n")

    def grants(self, text: bytes) -> dict:
        """The grants of an answer `ok {...}`: key -> Grant; nothing unless the peer may tell them.
        Raises ValueError for an answer that is not the reader's."""
        import json

        from poplock.grants import decode_grant

        if not self.peer_may_tell:
            return {}
        found = json.loads(text)
        if not isinstance(found, dict):
            raise ValueError("its grants are not a JSON object")
        return {key: decode_grant(key, value.encode("utf-8", "surrogateescape")) for key, value in found.items()
                if isinstance(key, str) and isinstance(value, str)}

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while not self.lost:
            line, newline, rest = self._buffer.partition(b"\n")
            if not newline:
                if len(self._buffer) > self.MAX_ANSWER:
                    self._fail(ConnectionError("it sent a line too long to be an answer"))
                return
            self._buffer = rest
            if not self._questions:  # an answer to no question: not the reader's protocol
                self._fail(ConnectionError(f"it sent {line[:40]!r} unasked"))
                return
            self._questions.popleft().answer(line)  # a question timed out takes no notice

    def connection_lost(self, error) -> None:
        self._fail(error or ConnectionError("it closed the connection"))

    def _fail(self, error: Exception) -> None:
        self.lost = True
        while self._questions:
            self._questions.popleft().fail(error)
        self.close()

    def close(self) -> None:
        self.lost = True
        if self.transport is not None:
            self.transport.close()
