"""poplock-policy: a Postfix SMTP access policy service that answers from the grant store.

    smtpd_relay_restrictions = permit_mynetworks,
        check_policy_service { inet:127.0.0.1:10040, timeout=2s, try_limit=1, default_action=DUNNO },
        reject_unauth_destination

For each request it answers [Policy] Action (OK by default) when client_address may
relay now (a live grant or the static allow list), DUNNO otherwise, so Postfix goes on
to reject_unauth_destination. Its own failures (a store it cannot read, a malformed,
oversized or slow request) give DUNNO or a closed connection, never OK.

Sockets come from systemd (poplock-policy.socket, Accept=no) or from --listen. One
process serves every smtpd connection at once with asyncio; each connection holds at
most one unfinished request in memory, and their number is capped.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import stat
import sys
import time

from poplock import events
from poplock.access import check_relay
from poplock.addresses import Network, load_allow_list, normalize_address
from poplock.arguments import ArgumentParser
from poplock.config import Config, load_config
from poplock.errors import AddressError, ConfigError, PoplockError, ProtocolError, StoreBusyError
from poplock.logs import log_event, setup_logging, unix_socket_answers
from poplock.policyprotocol import DUNNO, RequestBuffer, format_reply
from poplock.store import find_grant, open_snapshot

log = logging.getLogger("poplock.policy")

READ_SIZE = 65536
ERROR_REPORT_INTERVAL = 60.0


class Snapshots:
    """The store and the static allow list, re-read only when their files change.

    The open snapshot is kept until the store's file is replaced: while we hold it, its
    inode cannot be reused, so a changed (device, inode) reliably means a new snapshot.
    """

    def __init__(self, config: Config):
        self.config = config
        self._snapshot = None
        self._snapshot_identity = None
        self._networks: list[Network] = []
        self._networks_identity = None

    def networks(self) -> list[Network]:
        identity = _identity(self.config.static_allow_file)
        if identity != self._networks_identity:
            self._networks = load_allow_list(self.config.static_allow_file) if identity else []
            self._networks_identity = identity
        return self._networks

    def grant(self, address: str):
        identity = _identity(self.config.store_path)
        if identity != self._snapshot_identity:
            self.close()
            if identity is not None:
                self._snapshot = open_snapshot(self.config.store_path, self.config.busy_timeout)
            self._snapshot_identity = identity
        if self._snapshot is None:
            return None
        return find_grant(self._snapshot, address, self.config.store_path)

    def close(self) -> None:
        if self._snapshot is not None:
            self._snapshot.close()
            self._snapshot = None
        self._snapshot_identity = None


def _identity(path: str):
    try:
        status = os.stat(path)
    except FileNotFoundError:
        return None
    return (status.st_dev, status.st_ino, status.st_mtime_ns, status.st_size)


class PolicyService:
    def __init__(self, config: Config, clock=time.time):
        self.config = config
        self.snapshots = Snapshots(config)
        self.clock = clock
        self.connections = 0
        self.decisions = 0
        self.allowed = 0
        self._reported: dict[str, float] = {}  # error text -> when it was last logged

    def _should_report(self, problem: str) -> bool:
        """The same trouble is logged at most once a minute: Postfix asks many times a second."""
        now = time.monotonic()
        if now - self._reported.get(problem, -ERROR_REPORT_INTERVAL) < ERROR_REPORT_INTERVAL:
            return False
        self._reported = {text: when for text, when in self._reported.items() if now - when < ERROR_REPORT_INTERVAL}
        self._reported[problem] = now
        return True

    def action_for(self, attributes: dict[str, str]) -> str:
        """The action for one well-formed request; DUNNO on any trouble of ours."""
        try:
            address = normalize_address(attributes["client_address"])
        except AddressError:
            log.warning("client_address %r is not an address; answering DUNNO", attributes["client_address"])
            return DUNNO
        try:
            decision = check_relay(address, self.clock(), self.snapshots.networks(), self.snapshots.grant)
        except (PoplockError, OSError) as error:
            if isinstance(error, ConfigError):
                event = events.CONFIG_INVALID  # the static allow list went bad while running
            elif isinstance(error, StoreBusyError):
                event = events.STORE_BUSY
            else:
                event = events.STORE_FAILED
            if self._should_report(str(error)):
                log_event(log, logging.ERROR, event, "cannot decide for %s, answering DUNNO: %s", address, error,
                          address=address)
            self.snapshots.close()
            return DUNNO
        self.decisions += 1
        if decision.allowed:
            self.allowed += 1
            reason = f"static network {decision.network.text}" if decision.network else f"{decision.grant.source} grant"
            log_event(log, logging.INFO, events.RELAY_ALLOWED, "relay allowed for %s: %s (%s)", address, reason,
                      attributes.get("recipient", "?"), address=address,
                      expires=decision.grant.expires_at if decision.grant and not decision.network else None)
            return self.config.policy_action
        log_event(log, logging.INFO if self.config.policy_log_refused else logging.DEBUG, events.RELAY_REFUSED,
                  "no relay for %s: %s", address,
                  "its grant expired" if decision.grant else "no grant", address=address)
        return DUNNO

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.connections >= self.config.policy_max_connections:
            log.warning("already %d connections; closing a new one", self.connections)
            writer.close()
            return
        self.connections += 1
        buffer = RequestBuffer()
        try:
            while True:
                timeout = self.config.policy_request_timeout if buffer.in_request else self.config.policy_idle_timeout
                data = await asyncio.wait_for(reader.read(READ_SIZE), timeout)
                if not data:
                    return
                replies = []
                for request in buffer.feed(data):
                    if request.problem is not None:
                        log.warning("answering DUNNO to a request I cannot read: %s", request.problem)
                        replies.append(format_reply(DUNNO))
                    else:
                        replies.append(format_reply(self.action_for(request.attributes)))
                if replies:
                    writer.write(b"".join(replies))
                    await writer.drain()
        except TimeoutError:
            log.info("closing a connection that %s", "sent half a request and stalled" if buffer.in_request
                     else "stayed idle")
        except ProtocolError as error:
            log.warning("closing a connection: %s", error)
        except (ConnectionError, OSError):
            pass
        finally:
            self.connections -= 1
            writer.close()


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
            unix.listen(128)
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
        server.listen(128)
        sockets.append(server)
    return sockets


async def run(service: PolicyService, sockets: list[socket.socket]) -> None:
    from systemd import daemon

    servers = []
    for listener in sockets:
        listener.setblocking(False)
        if listener.family == socket.AF_UNIX:
            servers.append(await asyncio.start_unix_server(service.serve, sock=listener, limit=READ_SIZE))
        else:
            servers.append(await asyncio.start_server(service.serve, sock=listener, limit=READ_SIZE))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    names = ", ".join(str(listener.getsockname()) for listener in sockets)
    daemon.notify(f"READY=1\nSTATUS=answering Postfix on {names}")
    log.info("answering Postfix policy requests on %s", names)
    await stop.wait()
    daemon.notify("STOPPING=1")
    for server in servers:
        server.close()
    log.info("stopping after %d decisions (%d allowed)", service.decisions, service.allowed)


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="poplock-policy", description="Postfix policy service: may this client relay?")
    parser.add_argument("-c", "--config", help="configuration file (default /etc/poplock/poplock.conf)")
    parser.add_argument("--listen", action="append", default=[], metavar="HOST:PORT|PATH",
                        help="listen here instead of on sockets passed by systemd (repeatable)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log every decision, refusals included")
    arguments = parser.parse_args(argv)
    setup_logging("poplock-policy", logging.DEBUG if arguments.verbose else logging.INFO)
    try:
        config = load_config(arguments.config, sections=("Grants", "Store", "Policy"))
        load_allow_list(config.static_allow_file)  # a broken list is a configuration error at start
        sockets = listening_sockets(arguments.listen)
    except ConfigError as error:
        log_event(log, logging.ERROR, events.CONFIG_INVALID, "%s", error)
        return os.EX_CONFIG
    except OSError as error:
        log.error("cannot listen: %s", error)
        return os.EX_OSERR
    if not sockets:
        log.error("no socket to listen on: start me from poplock-policy.socket or give --listen")
        return os.EX_USAGE
    asyncio.run(run(PolicyService(config), sockets))
    return os.EX_OK


if __name__ == "__main__":
    sys.exit(main())
