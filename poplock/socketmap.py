"""poplock-socketmap: a socketmap server answering "may this client address relay?" from the grant store.

Postfix (a `socketmap:` table), Sendmail (a `socket` map), Exim (`${readsocket}` in an
ACL) and OpenSMTPD (through poplock-smtpd-filter) ask it with one netstring,
`NAME ADDRESS`. For a client that may relay now (a live grant or the static allow
list) the answer is `OK VALUE`, with the VALUE [Socketmap] Maps= gives that map name
(`poplock:OK` by default: Postfix reads OK as an access(5) action); `NOTFOUND `
otherwise, and for keys that are not addresses; `TEMP` when the store or the allow
list cannot be read; `PERM` for a map name it does not serve. Never OK on an error.

It is three parts: poplock.service (sockets from systemd or --listen, connection
limits, deadlines, rate-limited warnings), the socketmap codec
(poplock.socketmapprotocol) and the decision (poplock.access.check_relay), which it
shares with poplock-policy. This module holds the decision's side and main().
"""

from __future__ import annotations

import logging
import sys
import time

from poplock import events
from poplock.access import describe, grant_user, needs_fresh_look
from poplock.config import Config
from poplock.decisions import ReaderSync, Snapshots
from poplock.errors import PoplockError
from poplock.logs import log_event
from poplock.service import Warnings, run_decision_service
from poplock.socketmapprotocol import NOTFOUND, OK, PERM, TEMP, Request, RequestBuffer, format_reply

log = logging.getLogger("poplock.socketmap")

NOT_FOUND_REPLY = format_reply(NOTFOUND)
TEMP_REPLY = format_reply(TEMP, "poplock cannot read its grants now")
PERM_REPLY = format_reply(PERM, "poplock cannot read this request")
UNKNOWN_MAP_REPLY = format_reply(PERM, "poplock serves no map of that name")


class SocketmapHandler:
    """The socketmap service's side of poplock.service: a codec per connection, an answer per request.

    The decision is poplock-policy's, made the same way on the same files (decisions.Snapshots,
    access.check_relay with the deny list and [Grants] IPv6Prefix), and so is the fresh look:
    before NOTFOUND for an address a login could turn, poplock-reader is asked to read the
    journal up to now ([Store] ReaderSocket=, decisions.ReaderSync) and the store is read again.
    """

    def __init__(self, config: Config, warnings: Warnings, clock=time.time):
        self.config = config
        self.snapshots = Snapshots(config)
        self.warnings = warnings
        self.clock = clock
        self.decisions = 0
        self.allowed = 0
        self.names = frozenset(name.encode() for name, _ in config.socketmap_maps)
        self._found = {name: format_reply(OK, value) for name, value in config.socketmap_maps}
        self._refusals_level = logging.INFO if config.socketmap_log_refused else logging.DEBUG
        self.sync = ReaderSync(config.reader_socket, config.reader_wait, warnings, self.snapshots.read_again) if (
            config.reader_socket and config.reader_wait) else None

    def decoder(self) -> RequestBuffer:
        return RequestBuffer(self.names)

    def answer(self, request: Request):
        """The reply to one request (bytes, or a future of them while poplock-reader reads):
        PERM to one that cannot be read (the service logs why)."""
        if request.problem is not None:
            return UNKNOWN_MAP_REPLY if request.problem.startswith("unknown map") else PERM_REPLY
        if request.address is None:  # a host name (Postfix asks for it first), or any other text
            if log.isEnabledFor(logging.DEBUG):
                log.debug("%s %r is not an address: NOTFOUND", request.name, request.key[:60])
            return NOT_FOUND_REPLY
        reply = self.reply_for(request, fresh=self.sync is None)
        if not isinstance(reply, bytes):  # a refusal the journal may already contradict: the reader reads first
            return self.sync.then(lambda: self.reply_for(request, earlier=reply))
        return reply

    def reply_for(self, request: Request, fresh: bool = True, earlier=None):
        """OK VALUE, NOTFOUND or TEMP for a request with an address. Not `fresh`: instead of a
        NOTFOUND that a login not read yet could turn, what to give back as `earlier` once the
        reader has read (Snapshots.decide)."""
        address = request.address
        now = self.clock()
        try:
            decision = self.snapshots.decide(address, now, earlier)
        except (PoplockError, OSError) as error:
            self.snapshots.failed(log, self.warnings, address, error, TEMP)
            return TEMP_REPLY
        if not fresh and needs_fresh_look(decision):
            return self.snapshots.before_read(decision)
        self.decisions += 1
        asked = request.key.decode("ascii")  # an address: ASCII
        if decision.allowed:
            self.allowed += 1
            log_event(log, logging.INFO, events.RELAY_ALLOWED, "%s (map %s, asked as %s)", describe(decision, now),
                      request.name, asked, address=address, user=grant_user(decision),
                      expires=decision.grant.expires_at if decision.grant and not decision.network else None)
            return self._found[request.name]
        if log.isEnabledFor(self._refusals_level):  # inbound mail is mostly refusals: no line made for nobody
            log_event(log, self._refusals_level, events.RELAY_REFUSED, "%s (map %s, asked as %s)",
                      describe(decision, now), request.name, asked, address=address)
        return NOT_FOUND_REPLY


def main(argv: list[str] | None = None) -> int:
    return run_decision_service(
        "poplock-socketmap", "socketmap server for Postfix, Sendmail, Exim, OpenSMTPD: may this client relay?",
        "log every lookup, refusals and keys that are not addresses included", "Socketmap", SocketmapHandler,
        lambda config: "answering socketmap lookups for " + ", ".join(
            f"{name} (OK {value})" for name, value in config.socketmap_maps), argv)


if __name__ == "__main__":
    sys.exit(main())
