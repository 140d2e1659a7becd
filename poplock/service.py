"""The connection layer every decision service shares: sockets, limits, deadlines, rate-limited warnings.

A decision service (poplock-policy; a socketmap service later) is this layer, a codec and
a decision. The codec turns bytes into requests and replies into bytes and never touches
a socket; this layer owns the sockets and never looks inside a request. What it needs of
a service, its `handler`:

    handler.decoder()        a new decoder for one connection, which has
      .feed(data)            the requests `data` completes, in order; raises ProtocolError
                             when the peer broke the protocol beyond repair (the connection
                             is then closed without an answer)
      .in_request            True while part of a request has arrived and its end has not
    request.problem          None, or why the codec could not read that request
    handler.answer(request)  the reply, as bytes, to every request, unreadable ones too; or an
                             answer to come (a future: done(), result(), add_done_callback(), as
                             decisions.Pending) when the answer must wait (the journal being
                             read): the connection's later replies then wait behind it, in order

The bounds, which a peer cannot talk its way around:

  * A deadline per request, not per read: from the first byte of a request to its end at
    most `request_timeout`; then the connection is closed without an answer, so Postfix
    applies its default_action. One byte every second does not keep a connection.
  * `idle_timeout` between requests. Postfix closes its own idle policy connections after
    smtpd_policy_service_max_idle (300s), so a longer one never closes Postfix's first.
  * `max_connections` in all. A new connection beyond it closes the connection that has
    been idle (no request under way) the longest, instead of being refused: idle peers
    cannot lock Postfix out. Only when every connection is in the middle of a request,
    each bounded by its deadline, is the new one closed at once.
  * `max_connections_per_peer` for each peer: a TCP peer is its IP address, a unix-socket
    peer its user (uid from SO_PEERCRED). Beyond it, the peer's own connection idle
    longest is closed; the other peers keep theirs.
  * A connection that has sent MAX_UNREADABLE requests the codec could not read gets its
    answers and is then closed: it is not Postfix, and each answer costs a decision.
  * Replies a peer does not read stop reading from it (the transport's flow control), so
    pipelined requests cannot grow the process's memory.
  * Warnings that peers cause are rate-limited (Warnings): one line per kind per minute,
    and the next line of that kind says how many were left out.

One process and one asyncio loop serve every connection, with asyncio Protocols rather
than streams: a request that arrives in one read costs no task, no future and no timer.
Each connection has one timer, moved only when a request spans reads; the idle bound is
checked lazily when that timer fires.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import signal
import socket
import stat
import struct

from poplock.errors import ConfigError, ProtocolError
from poplock.logs import unix_socket_answers

log = logging.getLogger("poplock.service")

MAX_UNREADABLE = 10  # unreadable requests a connection may send; Postfix never sends one
WARNING_INTERVAL = 60.0  # at most one line per kind of peer-caused warning in this many seconds
FILES_RESERVED = 64  # open files besides connections: listeners, the store, the allow list, logging
BACKLOG = socket.SOMAXCONN
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def describe_span(seconds: float) -> str:
    """A time span as the configuration writes it: 500ms, 10s, 10min."""
    if seconds == 0:
        return "0s"
    for unit, length in (("h", 3600), ("min", 60), ("s", 1)):
        if seconds >= length and seconds % length == 0:
            return f"{int(seconds // length)}{unit}"
    return f"{seconds * 1000:g}ms" if seconds < 1 else f"{seconds:g}s"


class Limits:
    """The bounds one service keeps; `section` names their settings in messages ([Policy])."""

    __slots__ = ("request_timeout", "idle_timeout", "max_connections", "max_connections_per_peer", "section")

    def __init__(self, request_timeout: float, idle_timeout: float, max_connections: int,
                 max_connections_per_peer: int, section: str):
        self.request_timeout = request_timeout
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.max_connections_per_peer = max_connections_per_peer  # above max_connections: no effect
        self.section = section


class Warnings:
    """Lines that peers (or a store in trouble) cause, at most one per kind per `interval`.

    A line left out is counted; the next line of its kind says how many were, and so
    does flush() for kinds that went quiet, so that a flood shows as its size, not as
    65,536 lines. `clock` is time.monotonic or a test's.
    """

    def __init__(self, logger: logging.Logger, clock, interval: float = WARNING_INTERVAL):
        self.logger = logger
        self.clock = clock
        self.interval = interval
        self._kinds: dict = {}  # kind -> [when its last line was logged, lines left out since, level, label]

    def admit(self, kind, level: int = logging.WARNING, label: str | None = None) -> int | None:
        """None when a line of `kind` went out less than `interval` ago (this one is counted);
        otherwise how many were left out before this one, which the caller should log."""
        now = self.clock()
        entry = self._kinds.get(kind)
        if entry is not None and now - entry[0] < self.interval:
            entry[1] += 1
            return None
        left_out = entry[1] if entry is not None else 0
        self._kinds[kind] = [now, 0, level, label or str(kind)]
        return left_out

    def suffix(self, left_out: int) -> str:
        if not left_out:
            return ""
        return f" ({left_out} more like this since the last one were not logged)"

    def warn(self, kind: str, message: str, *args, level: int = logging.WARNING) -> None:
        left_out = self.admit(kind, level)
        if left_out is not None and self.logger.isEnabledFor(level):
            self.logger.log(level, "%s%s", message % args if args else message, self.suffix(left_out))

    def flush(self, everything: bool = False) -> None:
        """Report the counts of kinds quiet for `interval` (all of them with `everything`),
        and forget kinds with nothing to report."""
        now = self.clock()
        for kind, (logged_at, left_out, level, label) in list(self._kinds.items()):
            if not everything and now - logged_at < self.interval:
                continue
            if left_out:
                self.logger.log(level, "%d more %r lines were not logged since the last one, %s ago", left_out,
                                label, describe_span(round(now - logged_at)))
                self._kinds[kind] = [now, 0, level, label]
            else:
                del self._kinds[kind]


class Peer:
    """One peer's connections: how many, and those idle, the longest idle first."""

    __slots__ = ("name", "count", "idle")

    def __init__(self, name: str):
        self.name = name
        self.count = 0
        self.idle: collections.OrderedDict = collections.OrderedDict()


class Connection(asyncio.Protocol):
    """One peer connection: bytes to the decoder, requests to the handler, replies back."""

    def __init__(self, service: Service):
        self.service = service
        self.decoder = service.handler.decoder()
        self.transport = None
        self.peer: Peer | None = None
        self.idle_since = 0.0
        self.request_started = 0.0
        self.unreadable = 0
        self.timer = None
        self.open = False  # counted in the service's limits
        self.queued: collections.deque = collections.deque()  # replies behind one still to come
        self.watching = None  # the answer to come at the head of `queued` a callback waits for
        self.closing = False  # close once `queued` is written: the peer half-closed, or sent too much garbage

    # asyncio.Protocol

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.service.admit(self)

    def data_received(self, data: bytes) -> None:
        if not self.open:  # closed to make room earlier in this turn of the loop
            return
        service = self.service
        decoder = self.decoder
        was_in_request = decoder.in_request
        try:
            requests = decoder.feed(data)
        except ProtocolError as error:
            service.warnings.warn("broken protocol", "closing a connection from %s: %s", self.peer.name, error)
            self.shut()
            return
        if requests:
            answer = service.handler.answer
            replies = []
            for request in requests:
                if request.problem is not None:
                    self.unreadable += 1
                    service.warnings.warn("unreadable request", "cannot read a request from %s: %s",
                                          self.peer.name, request.problem)
                    if self.unreadable >= MAX_UNREADABLE:
                        replies.append(answer(request))
                        service.requests += len(replies)
                        service.warnings.warn("unreadable connection", "closing a connection from %s after %d "
                                              "requests it could not read", self.peer.name, self.unreadable)
                        self.transport.pause_reading()
                        self.queued.extend(replies)  # some may still be to come
                        self.closing = True
                        self.write_queued()
                        return
                replies.append(answer(request))
            service.requests += len(requests)
            if self.queued or any(not isinstance(reply, bytes) for reply in replies):
                self.queued.extend(replies)  # an answer still to come: later ones wait for it, in order
                self.write_queued()
            else:
                self.transport.write(replies[0] if len(replies) == 1 else b"".join(replies))
        if decoder.in_request:
            if requests or not was_in_request:  # a request began in this data: its deadline starts now
                self.request_started = now = service.loop.time()
                if not was_in_request:
                    service.busy(self)
                deadline = now + service.limits.request_timeout
                if self.timer.when() > deadline:
                    self.timer.cancel()
                    self.timer = service.loop.call_at(deadline, self.check_time)
        elif requests:
            self.idle_since = service.loop.time()
            service.idled(self, was_in_request)

    def write_queued(self, _done=None) -> None:
        """Write the queued replies in order, up to the first whose answer is still to come
        (the handler waits for something, such as the journal being read)."""
        while self.queued:
            reply = self.queued[0]
            if not isinstance(reply, bytes):
                if not reply.done():
                    if self.watching is not reply:
                        self.watching = reply
                        reply.add_done_callback(self.write_queued)
                    return
                reply = reply.result()
            self.queued.popleft()
            if self.open:
                self.transport.write(reply)
        if self.closing and self.open:
            self.shut(flush=True)

    def eof_received(self):
        if self.decoder.in_request:
            self.service.warnings.warn("closed mid-request", "a connection from %s closed in the middle of a "
                                       "request", self.peer.name)
        if self.queued and self.open:  # a peer that half-closes after its request (Exim's readsocket)
            self.closing = True  # still gets the answers to come; write_queued() closes after them
            return True
        return None  # the transport closes itself

    def connection_lost(self, exc) -> None:
        self.service.release(self)

    def pause_writing(self) -> None:  # the peer does not read its replies: stop reading its requests
        if self.open:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.open:
            self.transport.resume_reading()

    # time and closing

    def check_time(self) -> None:
        """The connection's one timer: the request deadline while in a request, else the idle bound."""
        if not self.open:
            return
        service = self.service
        limits = service.limits
        now = service.loop.time()
        if self.decoder.in_request:
            due = self.request_started + limits.request_timeout
            if now >= due:
                service.warnings.warn("request deadline", "closing a connection from %s that sent half a request "
                                      "and stalled: it did not end within [%s] RequestTimeout=%s", self.peer.name,
                                      limits.section, describe_span(limits.request_timeout))
                self.shut()
                return
        else:
            due = self.idle_since + limits.idle_timeout
            if now >= due:
                service.warnings.warn("idle timeout", "closing a connection from %s that stayed idle for "
                                      "[%s] IdleTimeout=%s", self.peer.name, limits.section,
                                      describe_span(limits.idle_timeout), level=logging.INFO)
                self.shut()
                return
        self.timer = service.loop.call_at(due, self.check_time)

    def shut(self, flush: bool = False) -> None:
        """Close now. Replies not yet sent are dropped, or with `flush` given until the request
        timeout to go out: a peer that reads nothing cannot keep the socket open."""
        service = self.service
        service.release(self)
        if not self.transport.get_write_buffer_size():
            self.transport.close()
        elif flush:
            self.transport.close()
            service.loop.call_later(service.limits.request_timeout, self.transport.abort)
        else:
            self.transport.abort()


class Service:
    """The connections of one decision service and the limits they share."""

    def __init__(self, handler, limits: Limits, warnings: Warnings):
        self.handler = handler
        self.limits = limits
        self.warnings = warnings
        self.loop: asyncio.AbstractEventLoop | None = None
        self.connections: set[Connection] = set()
        self.requests = 0
        self.evicted = 0
        self.refused = 0
        self.peers: dict[str, Peer] = {}
        self.idle: collections.OrderedDict = collections.OrderedDict()  # every idle connection, longest idle first

    def admit(self, connection: Connection) -> None:
        """Count a new connection, closing the one idle longest when a limit is reached."""
        limits = self.limits
        name = peer_name(connection.transport)
        peer = self.peers.get(name)
        if peer is None:
            peer = self.peers[name] = Peer(name)
        connection.peer = peer
        if peer.count >= limits.max_connections_per_peer:
            if not self._evict(peer.idle, "%s has [%s] MaxConnectionsPerPeer=%d connections", name,
                               limits.section, limits.max_connections_per_peer):
                self._refuse(connection, "%s has [%s] MaxConnectionsPerPeer=%d connections, each in the middle "
                             "of a request", name, limits.section, limits.max_connections_per_peer)
                return
        if len(self.connections) >= limits.max_connections:
            if not self._evict(self.idle, "[%s] MaxConnections=%d reached", limits.section,
                               limits.max_connections):
                self._refuse(connection, "[%s] MaxConnections=%d reached, each in the middle of a request",
                             limits.section, limits.max_connections)
                return
        connection.open = True
        self.connections.add(connection)
        peer.count += 1
        now = self.loop.time()
        connection.idle_since = now
        self.idle[connection] = None
        peer.idle[connection] = None
        connection.timer = self.loop.call_at(now + limits.idle_timeout, connection.check_time)

    def _evict(self, idle: collections.OrderedDict, reason: str, *args) -> bool:
        if not idle:
            return False
        victim = next(iter(idle))
        self.evicted += 1
        self.warnings.warn("eviction", "%s: closing the connection from %s idle longest (for %s) to make room",
                           reason % args, victim.peer.name, describe_span(round(self.loop.time() - victim.idle_since)))
        victim.shut()
        return True

    def _refuse(self, connection: Connection, reason: str, *args) -> None:
        self.refused += 1
        self.warnings.warn("refused", "%s: closing a new connection from %s at once", reason % args,
                           connection.peer.name)
        if connection.peer.count == 0:
            del self.peers[connection.peer.name]
        connection.transport.abort()

    def busy(self, connection: Connection) -> None:
        """The connection is in the middle of a request: it may not be evicted."""
        del self.idle[connection]
        del connection.peer.idle[connection]

    def idled(self, connection: Connection, was_busy: bool) -> None:
        """The connection finished a request: now it is the one idle the shortest."""
        if was_busy:
            self.idle[connection] = None
            connection.peer.idle[connection] = None
        else:
            self.idle.move_to_end(connection)
            connection.peer.idle.move_to_end(connection)

    def release(self, connection: Connection) -> None:
        if not connection.open:
            return
        connection.open = False
        if connection.timer is not None:
            connection.timer.cancel()
        self.connections.discard(connection)
        self.idle.pop(connection, None)
        peer = connection.peer
        peer.idle.pop(connection, None)
        peer.count -= 1
        if peer.count == 0:
            del self.peers[peer.name]

    def close_all(self) -> None:
        for connection in list(self.connections):
            connection.shut()

    def status(self) -> str:
        return (f"{len(self.connections)} connections from {len(self.peers)} peers; {self.requests} requests "
                f"answered; {self.evicted} idle connections closed to make room, {self.refused} new ones refused")


def peer_name(transport) -> str:
    """Who a connection counts against: its IP address (IPv4-mapped written as IPv4), or for
    a unix socket "uid N" of the process that connected."""
    address = transport.get_extra_info("peername")
    if isinstance(address, tuple):
        host = address[0]
        return host[7:] if host.startswith("::ffff:") and "." in host else host
    try:
        connected = transport.get_extra_info("socket")
        _, uid, _ = _PEERCRED.unpack(connected.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
    except (OSError, AttributeError):
        return "a local process"
    return f"uid {uid}"


def listening_sockets(listen: list[str]) -> list[socket.socket]:
    """Sockets from systemd socket activation, else from --listen HOST:PORT or PATH."""
    if not listen:
        from systemd import daemon

        return [socket.socket(fileno=fd) for fd in daemon.listen_fds()]
    sockets = []
    for where in listen:
        if where.startswith("/"):
            if os.path.exists(where) and stat.S_ISSOCK(os.lstat(where).st_mode):
                if unix_socket_answers(where, socket.SOCK_STREAM):
                    raise OSError(f"{where}: another process is listening there")
                os.unlink(where)  # a socket left by an earlier run; any other file is an error below
            unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            unix.bind(where)
            os.chmod(where, 0o666)
            unix.listen(BACKLOG)
            sockets.append(unix)
            continue
        host, _, port = where.rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
        if not port.isdigit():
            raise ConfigError([f"--listen {where}: expected HOST:PORT or an absolute socket path"])
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        server = socket.socket(family, socket.SOCK_STREAM)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind((host, int(port)))
        server.listen(BACKLOG)
        sockets.append(server)
    return sockets


def raise_open_file_limit(limits: Limits) -> None:
    """Make room for max_connections open sockets: raise the soft RLIMIT_NOFILE to the hard
    limit when it is too low (systemd's default soft limit is 1024). When even the hard
    limit is too low, serve fewer connections, and say so, rather than fail accept()."""
    import resource

    needed = limits.max_connections + FILES_RESERVED
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= needed:
        return
    target = needed if hard == resource.RLIM_INFINITY else hard
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    except (OSError, ValueError) as error:
        log.warning("cannot raise the open file limit from %d to %d: %s", soft, target, error)
    if soft < needed:
        limits.max_connections = max(1, soft - FILES_RESERVED)
        log.warning("[%s] MaxConnections=%d needs %d open files but the limit is %d: serving at most %d "
                    "connections at once", limits.section, needed - FILES_RESERVED, needed, soft,
                    limits.max_connections)
        log.warning("raise LimitNOFILE= in the unit, or lower MaxConnections=")


async def serve(service: Service, sockets: list[socket.socket], description: str) -> None:
    """Answer on `sockets` until SIGTERM or SIGINT, telling systemd READY=1 and STOPPING=1."""
    from systemd import daemon

    loop = asyncio.get_running_loop()
    service.loop = loop
    servers = []
    for listener in sockets:
        listener.setblocking(False)
        factory = lambda: Connection(service)  # noqa: E731
        if listener.family == socket.AF_UNIX:
            servers.append(await loop.create_unix_server(factory, sock=listener, backlog=BACKLOG))
        else:
            servers.append(await loop.create_server(factory, sock=listener, backlog=BACKLOG))
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    names = ", ".join(str(listener.getsockname()) for listener in sockets)
    ticker = None

    def tick() -> None:  # once a minute: counts of warnings left out, and STATUS= for systemctl status
        nonlocal ticker
        service.warnings.flush()
        daemon.notify(f"STATUS={description} on {names}: {service.status()}")
        ticker = loop.call_later(service.warnings.interval, tick)

    daemon.notify(f"READY=1\nSTATUS={description} on {names}")
    log.info("%s on %s", description, names)
    ticker = loop.call_later(service.warnings.interval, tick)
    await stop.wait()
    daemon.notify("STOPPING=1")
    ticker.cancel()
    for server in servers:
        server.close()
    status = service.status()
    service.close_all()
    service.warnings.flush(everything=True)
    log.info("stopping: %s", status)


def run_decision_service(program: str, description: str, verbose_help: str, section: str, make_handler,
                         what, argv: list[str] | None) -> int:
    """The main() every decision service shares: arguments, logging, configuration (the lists it
    decides from checked at start), sockets, limits from [SECTION]'s settings, then serve.

    `make_handler(config, warnings)` builds the service's handler; `what(config)` says what it
    answers, for the log and STATUS=.
    """
    import time

    from poplock import events
    from poplock.addresses import load_allow_list, load_deny_list
    from poplock.arguments import ArgumentParser
    from poplock.config import load_config
    from poplock.logs import log_event, setup_logging

    parser = ArgumentParser(prog=program, description=description)
    parser.add_argument("-c", "--config", help="configuration file (default /etc/poplock/poplock.conf)")
    parser.add_argument("--listen", action="append", default=[], metavar="HOST:PORT|PATH",
                        help="listen here instead of on sockets passed by systemd (repeatable)")
    parser.add_argument("-v", "--verbose", action="store_true", help=verbose_help)
    arguments = parser.parse_args(argv)
    setup_logging(program, logging.DEBUG if arguments.verbose else logging.INFO)
    service_log = logging.getLogger(f"poplock.{section.lower()}")
    try:
        config = load_config(arguments.config, sections=("Grants", "Store", section))
        load_allow_list(config.static_allow_file)  # a broken list is a configuration error at start
        load_deny_list(config.deny_file)
        sockets = listening_sockets(arguments.listen)
    except ConfigError as error:
        log_event(service_log, logging.ERROR, events.CONFIG_INVALID, "%s", error)
        return os.EX_CONFIG
    except OSError as error:
        service_log.error("cannot listen: %s", error)
        return os.EX_OSERR
    if not sockets:
        service_log.error("no socket to listen on: start me from %s.socket or give --listen", program)
        return os.EX_USAGE
    prefix = section.lower() + "_"
    limits = Limits(*(getattr(config, prefix + name) for name in (
        "request_timeout", "idle_timeout", "max_connections", "max_connections_per_peer")), section=section)
    raise_open_file_limit(limits)
    warnings = Warnings(service_log, time.monotonic)
    handler = make_handler(config, warnings)
    asyncio.run(serve(Service(handler, limits, warnings), sockets, what(config)))
    service_log.info("stopping after %d decisions (%d allowed)", handler.decisions, handler.allowed)
    return os.EX_OK
