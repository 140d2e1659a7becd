"""May this client relay now? The one decision relaylock, poplock-policy and `poplock check` share.

A client may relay when it is in the static allow list, or holds a live grant (under
its grant key: the address, or its IPv6 network, [Grants] IPv6Prefix) that the deny
list does not refuse, by network or by the user who opened it. The decision itself is
pure; check_relay_in_files() reads the lists and the store, and lets their errors
propagate so that each caller fails closed in its own way.
Free of `re` and `os`: relaylock makes this decision once per SMTP connection.
"""

from poplock.addresses import NO_DENIALS, DenyList, Network, find_network, grant_key, load_allow_list, load_deny_list
from poplock.grants import Grant, GrantDecodeError, decode_grant
from poplock.store import lookup_grant


class Decision:
    __slots__ = ("address", "allowed", "network", "grant", "denied")

    def __init__(self, address: str, allowed: bool, network: Network | None, grant: Grant | None,
                 denied: str | None = None):
        self.address = address
        self.allowed = allowed
        self.network = network
        self.grant = grant
        self.denied = denied  # why the deny list refuses the grant ("network N", "user U"), if it does


def describe(decision: Decision, now: float) -> str:
    """The one line every program logs for a decision (the account goes in POPLOCK_USER, not here)."""
    address = decision.address
    if decision.network is not None:
        return f"relay allowed for {address}: static network {decision.network}"
    grant = decision.grant
    if decision.allowed:
        return f"relay allowed for {address}: {grant.source} grant"
    if grant is None:
        return f"no relay for {address}: no grant"
    if decision.denied is not None:
        return f"no relay for {address}: the deny list refuses its grant ({decision.denied})"
    if grant.is_from_the_future(now):
        return f"no relay for {address}: its grant's login time is in the future (was the clock stepped back?)"
    if grant.expires_at <= now:
        return f"no relay for {address}: its grant expired"
    return f"no relay for {address}: its grant is longer than any grant can be"


def grant_user(decision: Decision) -> str | None:
    """The account whose login opened the grant that allows the relay (for POPLOCK_USER)."""
    return decision.grant.user if decision.allowed and decision.network is None and decision.grant else None


def decide(address: str, now: float, networks: list[Network], grant: Grant | None,
           denials: DenyList = NO_DENIALS) -> Decision:
    network = find_network(networks, address)
    if network is not None:
        return Decision(address, True, network, grant)
    if grant is not None:
        denied = denials.denies(address, grant.user)
        if denied is not None:
            return Decision(address, False, None, grant, denied)
    return Decision(address, grant is not None and grant.is_live(now), None, grant)


def check_relay(address: str, now: float, networks: list[Network], lookup, *, denials: DenyList = NO_DENIALS,
                ipv6_prefix: int = 128) -> Decision:
    """The static list first (no store access needed), then `lookup(key)` for the grant."""
    if find_network(networks, address) is not None:
        return decide(address, now, networks, None)
    return decide(address, now, networks, lookup(grant_key(address, ipv6_prefix)), denials)


def needs_fresh_look(decision: Decision) -> bool:
    """A refusal the journal may already contradict: no live grant (yet), and nothing that
    a new login could not change (the static list allows, the deny list refuses)."""
    return not decision.allowed and decision.denied is None


def check_relay_in_files(config, address: str, now: float, *, fresh: bool = True) -> Decision:
    """check_relay() on the configured lists and store. Raises ConfigError/StoreError.

    `fresh`: before refusing, ask poplock-reader to read the journal up to now
    ([Store] ReaderSocket=, for at most ReaderWait=), then look again: a client that
    checked its mail a moment ago is not refused because the reader had not read it yet.
    """
    networks = load_allow_list(config.static_allow_file)
    denials = load_deny_list(config.deny_file)

    def lookup(key):
        return lookup_grant(config.store_path, key, config.busy_timeout)

    decision = check_relay(address, now, networks, lookup, denials=denials, ipv6_prefix=config.ipv6_prefix)
    if fresh and needs_fresh_look(decision) and config.reader_socket and config.reader_wait > 0:
        from poplock.connection import ask_reader_for_grants

        told = ask_reader_for_grants(config.reader_socket, config.reader_wait)
        if told is not None:
            import time

            def lookup_told(key):  # the grants the read made, before its commit is published
                value = told.get(key)
                if value is not None:
                    try:
                        return decode_grant(key, value)
                    except GrantDecodeError:
                        pass
                return lookup(key)

            decision = check_relay(address, max(now, time.time()), networks, lookup_told if told else lookup,
                                   denials=denials, ipv6_prefix=config.ipv6_prefix)
    return decision
