"""poplock-policy: a Postfix SMTP access policy service that answers from the grant store.

    smtpd_relay_restrictions = permit_mynetworks,
        check_policy_service { inet:127.0.0.1:10040, timeout=2s, try_limit=1, default_action=DUNNO },
        reject_unauth_destination

For each request it answers [Policy] Action (OK by default) when client_address may
relay now (a live grant or the static allow list), DUNNO otherwise, so Postfix goes on
to reject_unauth_destination. Its own failures (a store it cannot read, a malformed,
oversized or slow request) give DUNNO or a closed connection, never OK.

It is three parts: poplock.service (sockets from systemd or --listen, connection
limits, deadlines, rate-limited warnings), the policy protocol codec
(poplock.policyprotocol) and the decision (poplock.access.check_relay). This module
holds the decision's side: the store and allow list it reads, and main().
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time

from poplock import events
from poplock.access import check_relay, describe, grant_user, needs_fresh_look
from poplock.addresses import NO_DENIALS, DenyList, Network, load_allow_list, load_deny_list, normalize_address
from poplock.config import Config
from poplock.errors import AddressError, ConfigError, PoplockError, StoreBusyError
from poplock.logs import iso_time, log_event
from poplock.policyprotocol import DUNNO, RequestBuffer, format_reply
from poplock.service import (
    Warnings,
    describe_span,
    run_decision_service,
)
from poplock.store import find_grant, open_snapshot

log = logging.getLogger("poplock.policy")

# The policy_context (Postfix 3.1 and later) of the second check_policy_service, in
# smtpd_data_restrictions, that asks for the header naming the login ([Policy] Header=).
HEADER_CONTEXT = "poplock-header"


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

    def denials(self) -> DenyList:
        identity = self._identity(self.config.deny_file)
        if identity != self._denials_identity:
            self._denials = load_deny_list(self.config.deny_file) if identity else NO_DENIALS
            self._denials_identity = identity
        return self._denials

    def networks(self) -> list[Network]:
        identity = self._identity(self.config.static_allow_file)
        if identity != self._networks_identity:
            self._networks = load_allow_list(self.config.static_allow_file) if identity else []
            self._networks_identity = identity
        return self._networks

    def grant(self, address: str):
        identity = self._identity(self.config.store_path)
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
        self._looked.pop(self.config.store_path, None)


def _identity(path: str):
    try:
        status = os.stat(path)
    except FileNotFoundError:
        return None
    return (status.st_dev, status.st_ino, status.st_mtime_ns, status.st_size)


class ReaderSync:
    """Asks poplock-reader to read the journal up to now before a refusal (access.check_relay_in_files
    does the same for relaylock and `poplock check`), without blocking the loop.

    One question is in flight at a time; refusals that come while it is answer after the
    next one, since their login may have been logged after the read began: a flood of
    refusals costs the reader one read per round trip, not one each. A reader that does
    not answer within ReaderWait= leaves the store as it is."""

    def __init__(self, path: str, wait: float, warnings: Warnings, on_read=None):
        self.path = path
        self.wait = wait
        self.warnings = warnings
        self.on_read = on_read  # called once a read is over, before the refusals waiting for it decide again
        self.asked = 0  # questions sent to the reader (for the benchmark and the status)
        self._next: list = []  # (callback, future) waiting for the next read
        self._in_flight = False

    def then(self, callback):
        """A future of callback()'s result, called once the reader has read (or the wait is over)."""
        future = asyncio.get_running_loop().create_future()
        self._next.append((callback, future))
        if not self._in_flight:
            self._ask()
        return future

    def _ask(self) -> None:
        waiting, self._next = self._next, []
        self._in_flight = True
        self.asked += 1
        task = asyncio.get_running_loop().create_task(self._exchange())
        task.add_done_callback(lambda _: self._answered(waiting))

    async def _exchange(self) -> None:
        writer = None
        try:
            async with asyncio.timeout(self.wait):
                reader, writer = await asyncio.open_unix_connection(self.path)
                writer.write(b"sync\n")
                answer = await reader.readline()
            if answer != b"ok\n":
                raise ConnectionError(f"it answered {answer[:40]!r}")
        except (OSError, TimeoutError, ConnectionError) as error:
            self.warnings.warn("reader silent", "poplock-reader did not read the journal for a refusal within "
                               "[Store] ReaderWait=%s (%s): deciding from the store as it is",
                               describe_span(self.wait), getattr(error, "strerror", None) or error or "no answer")
        finally:
            if writer is not None:
                writer.close()

    def _answered(self, waiting: list) -> None:
        self._in_flight = False
        if self.on_read is not None:
            self.on_read()
        for callback, future in waiting:
            if not future.done():
                future.set_result(callback())
        if self._next:
            self._ask()


class PolicyHandler:
    """The policy service's side of poplock.service: a codec per connection, an answer per request."""

    def __init__(self, config: Config, warnings: Warnings, clock=time.time):
        self.config = config
        self.snapshots = Snapshots(config)
        self.warnings = warnings
        self.clock = clock
        self.decisions = 0
        self.allowed = 0
        self._replies = {DUNNO: format_reply(DUNNO), config.policy_action: format_reply(config.policy_action)}
        self.sync = ReaderSync(config.reader_socket, config.reader_wait, warnings, self.snapshots.forget) if (
            config.reader_socket and config.reader_wait) else None

    def decoder(self) -> RequestBuffer:
        return RequestBuffer()

    def answer(self, request) -> bytes:
        """The reply to one request: DUNNO to one that cannot be read (the service logs why)."""
        if request.problem is not None:
            return self._replies[DUNNO]
        action = self.action_for(request.attributes, fresh=self.sync is None)
        if action is None:  # a refusal the journal may already contradict: the reader reads first
            return self.sync.then(lambda: self._reply(self.action_for(request.attributes, fresh=True)))
        return self._reply(action)

    def _reply(self, action: str) -> bytes:
        reply = self._replies.get(action)
        return reply if reply is not None else format_reply(action)

    def action_for(self, attributes: dict[str, str], fresh: bool = True) -> str | None:
        """The action for one well-formed request; DUNNO on any trouble of ours. Not `fresh`:
        None instead of a refusal that a login not read yet could turn (ask the reader first)."""
        try:
            address = normalize_address(attributes["client_address"])
        except AddressError:
            self.warnings.warn("not an address", "client_address %r is not an address; answering DUNNO",
                               attributes["client_address"][:60])
            return DUNNO
        now = self.clock()
        try:
            decision = check_relay(address, now, self.snapshots.networks(), self.snapshots.grant,
                                   denials=self.snapshots.denials(), ipv6_prefix=self.config.ipv6_prefix)
        except (PoplockError, OSError) as error:
            if isinstance(error, ConfigError):
                event = events.CONFIG_INVALID  # the static allow list went bad while running
            elif isinstance(error, StoreBusyError):
                event = events.STORE_BUSY
            else:
                event = events.STORE_FAILED
            # The same trouble is logged at most once a minute: Postfix asks many times a second.
            left_out = self.warnings.admit(str(error), logging.ERROR, event.name)
            if left_out is not None:
                log_event(log, logging.ERROR, event, "cannot decide for %s, answering DUNNO: %s%s", address, error,
                          self.warnings.suffix(left_out), address=address)
            self.snapshots.close()
            return DUNNO
        if not fresh and needs_fresh_look(decision):
            return None
        self.decisions += 1
        if attributes.get("policy_context") == HEADER_CONTEXT:  # never the relay action: that was asked before
            user = grant_user(decision)
            return self._header(decision) if self.config.policy_header and user is not None else DUNNO
        if decision.allowed:
            self.allowed += 1
            user = grant_user(decision)
            log_event(log, logging.INFO, events.RELAY_ALLOWED, "%s (%s)", describe(decision, now),
                      attributes.get("recipient", "?"), address=address, user=user,
                      expires=decision.grant.expires_at if decision.grant and not decision.network else None)
            return self.config.policy_action
        log_event(log, logging.INFO if self.config.policy_log_refused else logging.DEBUG, events.RELAY_REFUSED,
                  "%s", describe(decision, now), address=address)
        return DUNNO

    def _header(self, decision) -> str:
        """PREPEND of the header that names the login behind the relay, for abuse reports."""
        grant = decision.grant
        user = "".join(character if character.isprintable() else "?" for character in grant.user)[:200]
        return (f"PREPEND {self.config.policy_header}: {user} ({grant.source} login from {grant.address} "
                f"at {iso_time(grant.login_at)})")


def main(argv: list[str] | None = None) -> int:
    return run_decision_service("poplock-policy", "Postfix policy service: may this client relay?",
                                "log every decision, refusals included", "Policy", PolicyHandler,
                                lambda config: "answering Postfix policy requests", argv)


if __name__ == "__main__":
    sys.exit(main())
