"""May this client relay now? The one decision relaylock, poplock-policy and `poplock check` share.

A client may relay when it is in the static allow list, or holds a live grant (under
its grant key: the address, or its IPv6 network, [Grants] IPv6Prefix) that the deny
list does not refuse, by network or by the user who opened it. The decision itself is
pure; check_relay_in_files() reads the lists and the store, and lets their errors
propagate so that each caller fails closed in its own way.
Free of `re` and `os`: relaylock makes this decision once per SMTP connection.
"""

from poplock.addresses import NO_DENIALS, DenyList, Network, find_network, grant_key, load_allow_list, load_deny_list
from poplock.grants import Grant
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
        return f"relay allowed for {address}: static network {decision.network.text}"
    grant = decision.grant
    if decision.allowed:
        return f"relay allowed for {address}: {'manual' if grant.source == 'manual' else grant.source + ' login'} grant"
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


def check_relay_in_files(config, address: str, now: float) -> Decision:
    """check_relay() on the configured lists and store. Raises ConfigError/StoreError."""
    return check_relay(address, now, load_allow_list(config.static_allow_file),
                       lambda key: lookup_grant(config.store_path, key, config.busy_timeout),
                       denials=load_deny_list(config.deny_file), ipv6_prefix=config.ipv6_prefix)
