"""May this client relay now? The one decision relaylock, poplock-policy and `poplock check` share.

A client may relay when it is in the static allow list or holds a live grant. The
decision itself is pure; check_relay_in_files() reads the allow list and the store,
and lets their errors propagate so that each caller fails closed in its own way.
Free of `re` and `os`: relaylock makes this decision once per SMTP connection.
"""

from poplock.addresses import Network, find_network, load_allow_list
from poplock.grants import Grant
from poplock.store import lookup_grant


class Decision:
    __slots__ = ("address", "allowed", "network", "grant")

    def __init__(self, address: str, allowed: bool, network: Network | None, grant: Grant | None):
        self.address = address
        self.allowed = allowed
        self.network = network
        self.grant = grant


def decide(address: str, now: float, networks: list[Network], grant: Grant | None) -> Decision:
    network = find_network(networks, address)
    if network is not None:
        return Decision(address, True, network, grant)
    return Decision(address, grant is not None and grant.is_live(now), None, grant)


def check_relay(address: str, now: float, networks: list[Network], lookup) -> Decision:
    """The static list first (no store access needed), then `lookup(address)` for the grant."""
    if find_network(networks, address) is not None:
        return decide(address, now, networks, None)
    return decide(address, now, networks, lookup(address))


def check_relay_in_files(config, address: str, now: float) -> Decision:
    """check_relay() on the configured allow list and store. Raises ConfigError/StoreError."""
    return check_relay(address, now, load_allow_list(config.static_allow_file),
                       lambda client: lookup_grant(config.store_path, client, config.busy_timeout))
