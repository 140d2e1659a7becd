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
holds the policy answers and main(); the files a decision reads and the question to the
reader are in poplock.decisions, shared with poplock-socketmap.
"""

from __future__ import annotations

import logging
import sys
import time

from poplock import events
from poplock.access import describe, grant_user, needs_fresh_look
from poplock.addresses import normalize_address
from poplock.config import Config
from poplock.decisions import ReaderSync, Snapshots
from poplock.errors import AddressError, PoplockError
from poplock.logs import iso_time, log_event
from poplock.policyprotocol import DUNNO, RequestBuffer, format_reply
from poplock.service import (
    Warnings,
    run_decision_service,
)

log = logging.getLogger("poplock.policy")

# The policy_context (Postfix 3.1 and later) of the second check_policy_service, in
# smtpd_data_restrictions, that asks for the header naming the login ([Policy] Header=).
HEADER_CONTEXT = "poplock-header"


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
        self._refusals_level = logging.INFO if config.policy_log_refused else logging.DEBUG
        self.sync = ReaderSync(config.reader_socket, config.reader_wait, warnings, self.snapshots.read_again) if (
            config.reader_socket and config.reader_wait) else None

    def decoder(self) -> RequestBuffer:
        return RequestBuffer()

    def answer(self, request) -> bytes:
        """The reply to one request: DUNNO to one that cannot be read (the service logs why)."""
        if request.problem is not None:
            return self._replies[DUNNO]
        action = self.action_for(request.attributes, fresh=self.sync is None)
        if not isinstance(action, str):  # a refusal the journal may already contradict: the reader reads first
            return self.sync.then(lambda: self._reply(self.action_for(request.attributes, earlier=action)))
        return self._reply(action)

    def _reply(self, action: str) -> bytes:
        reply = self._replies.get(action)
        return reply if reply is not None else format_reply(action)

    def action_for(self, attributes: dict[str, str], fresh: bool = True, earlier=None):
        """The action for one well-formed request; DUNNO on any trouble of ours. Not `fresh`:
        instead of a refusal that a login not read yet could turn, what to give back as `earlier`
        once the reader has read (Snapshots.decide)."""
        try:
            address = normalize_address(attributes["client_address"])
        except AddressError:
            self.warnings.warn("not an address", "client_address %r is not an address; answering DUNNO",
                               attributes["client_address"][:60])
            return DUNNO
        now = self.clock()
        try:
            decision = self.snapshots.decide(address, now, earlier)
        except (PoplockError, OSError) as error:
            self.snapshots.failed(log, self.warnings, address, error, DUNNO)
            return DUNNO
        if not fresh and needs_fresh_look(decision):
            return self.snapshots.before_read(decision)
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
        if log.isEnabledFor(self._refusals_level):  # inbound mail is mostly refusals: no line made for nobody
            log_event(log, self._refusals_level, events.RELAY_REFUSED, "%s", describe(decision, now), address=address)
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
