"""Client addresses and the static allow list (pure).

An address is kept as its canonical text: the form inet_ntop(3) prints, with an
IPv4-mapped IPv6 address (::ffff:192.0.2.7) turned into the IPv4 address it stands
for, so the same client has one spelling everywhere: in grants, in the store's keys,
in lookups. Networks are written as 192.168.0.0/24, 192.168.0.0/255.255.255.0 (as
smtp-poplock accepted) or 2001:db8::/32; a bare address is a network of one.

relaylock imports this once per SMTP connection, so it uses the C socket module's
inet_pton/inet_ntop instead of `ipaddress` (which imports `re`, and costs more than
relaylock's whole budget).
"""

from _socket import AF_INET, AF_INET6, inet_ntop, inet_pton

from poplock.errors import AddressError, ConfigError

_MAPPED_PREFIX = b"\0" * 10 + b"\xff\xff"


def _pack(text: str) -> bytes:
    """4 or 16 bytes; an IPv4-mapped IPv6 address gives its 4 IPv4 bytes."""
    try:
        if ":" in text:
            packed = inet_pton(AF_INET6, text)
            return packed[12:] if packed[:12] == _MAPPED_PREFIX else packed
        return inet_pton(AF_INET, text)
    except (OSError, ValueError):
        raise AddressError(f"not an IP address: {text!r}") from None


def normalize_address(text: str) -> str:
    """The canonical spelling of an IPv4 or IPv6 address; AddressError if it is not one."""
    packed = _pack(text.strip())
    return inet_ntop(AF_INET if len(packed) == 4 else AF_INET6, packed)


class Network:
    """An IPv4 or IPv6 network; `text` is how the admin wrote it."""

    __slots__ = ("bits", "base", "prefix", "text")

    def __init__(self, bits: int, base: int, prefix: int, text: str):
        self.bits = bits
        self.base = base
        self.prefix = prefix
        self.text = text

    def __contains__(self, address: str) -> bool:
        packed = _pack(address)
        if len(packed) * 8 != self.bits:
            return False
        shift = self.bits - self.prefix
        return int.from_bytes(packed, "big") >> shift == self.base >> shift

    def __eq__(self, other) -> bool:
        if not isinstance(other, Network):
            return False
        return (self.bits, self.base, self.prefix) == (other.bits, other.base, other.prefix)

    def __hash__(self) -> int:
        return hash((self.bits, self.base, self.prefix))

    def __str__(self) -> str:
        family = AF_INET if self.bits == 32 else AF_INET6
        address = inet_ntop(family, self.base.to_bytes(self.bits // 8, "big"))
        return address if self.prefix == self.bits else f"{address}/{self.prefix}"

    def __repr__(self) -> str:
        return f"Network({str(self)!r})"


def parse_network(text: str) -> Network:
    """192.168.0.0/24, 192.168.0.0/255.255.255.0, 2001:db8::/32 or a single address."""
    text = text.strip()
    address, slash, length = text.partition("/")
    packed = _pack(address)
    bits = len(packed) * 8
    mapped = bits == 32 and ":" in address  # ::ffff:192.0.2.0/120 is 192.0.2.0/24
    if not slash:
        prefix = bits
    elif length.isdigit():
        prefix = int(length) - (96 if mapped else 0)
        if not 0 <= prefix <= bits:
            raise AddressError(f"prefix length /{length} out of range for {address}")
    elif bits == 32 and not mapped and "." in length:
        prefix = _netmask_length(length)
    else:
        raise AddressError(f"expected a prefix length or an IPv4 netmask after '/', not {length!r}")
    base = int.from_bytes(packed, "big")
    host_bits = base & ((1 << (bits - prefix)) - 1)
    if host_bits:
        network = Network(bits, base - host_bits, prefix, text)
        raise AddressError(f"{text} has host bits set (did you mean {network}?)")
    return Network(bits, base, prefix, text)


def _netmask_length(mask: str) -> int:
    try:
        value = int.from_bytes(inet_pton(AF_INET, mask), "big")
    except OSError:
        raise AddressError(f"not an IPv4 netmask: {mask!r}") from None
    length = 32 - ((~value & 0xFFFFFFFF).bit_length())
    if value != (0xFFFFFFFF << (32 - length)) & 0xFFFFFFFF:
        raise AddressError(f"netmask {mask} is not contiguous")
    return length


# The widest networks the static allow list takes. poplock exists to prevent an open
# relay: an entry covering the whole internet (0.0.0.0/0, ::/0, ::ffff:0.0.0.0/96) or a
# large share of it is a mistake, never obeyed. A /8 holds 10.0.0.0/8; private IPv6
# ranges (unique local fc00::/7, link-local fe80::/10) may be listed whole.
MIN_IPV4_PREFIX = 8
MIN_IPV6_PREFIX = 16
_PRIVATE_IPV6 = ((0xFC << 120, 7), (0xFE80 << 112, 10))


def too_wide(network: Network) -> bool:
    """The network covers too much of the internet to let it relay (see MIN_IPV4_PREFIX)."""
    if network.bits == 32:
        return network.prefix < MIN_IPV4_PREFIX
    for base, prefix in _PRIVATE_IPV6:
        if network.prefix >= prefix and network.base >> (128 - prefix) == base >> (128 - prefix):
            return False
    return network.prefix < MIN_IPV6_PREFIX


def parse_allow_list(text: str, path: str) -> list[Network]:
    """The static allow list: one address or network per line, `#` starts a comment.

    Raises ConfigError naming the file and line of every bad line, and of every network
    too wide to allow (too_wide).
    """
    networks = []
    problems = []
    for number, line in enumerate(text.split("\n"), start=1):
        entry = line.partition("#")[0].strip()
        if not entry:
            continue
        try:
            network = parse_network(entry)
        except AddressError as error:
            problems.append(f"{path}:{number}: {error}; expected an address or network such as 192.168.0.0/24")
            continue
        if too_wide(network):
            problems.append(f"{path}:{number}: {entry} covers too much of the internet to let it relay: that "
                            f"would be an open relay (the widest allowed are /{MIN_IPV4_PREFIX} for IPv4 and "
                            f"/{MIN_IPV6_PREFIX} for IPv6, or a private IPv6 range)")
            continue
        networks.append(network)
    if problems:
        raise ConfigError(problems)
    return networks


def load_allow_list(path: str) -> list[Network]:
    """Read the static allow list; a missing file is an empty list."""
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError([f"{path}: cannot read: {getattr(error, 'strerror', None) or error}"]) from None
    return parse_allow_list(text, path)


def find_network(networks: list[Network], address: str) -> Network | None:
    """The first network that holds `address` (a canonical address), or None."""
    for network in networks:
        if address in network:
            return network
    return None


def grant_key(address: str, ipv6_prefix: int) -> str:
    """The store key of a client's grant: its address, or for IPv6 its /ipv6_prefix network
    ("2001:db8:1::/64"), so that a client using privacy addresses keeps its grant."""
    if ipv6_prefix >= 128 or ":" not in address:
        return address
    packed = int.from_bytes(inet_pton(AF_INET6, address), "big")
    base = packed >> (128 - ipv6_prefix) << (128 - ipv6_prefix)
    return f"{inet_ntop(AF_INET6, base.to_bytes(16, 'big'))}/{ipv6_prefix}"


class DenyList:
    """Networks and user names that never get a grant ([Grants] DenyFile)."""

    __slots__ = ("networks", "users", "broken")

    def __init__(self, networks: list[Network], users: frozenset[str], broken: str | None = None):
        self.networks = networks
        self.users = users
        self.broken = broken  # why the list could not be read: then it denies everything

    def denies(self, address: str, user: str | None) -> str | None:
        """Why a grant for `address` opened by `user` is refused ("network N", "its user"), or None.

        The user's name is never part of the reason: it travels in POPLOCK_USER only."""
        if self.broken is not None:
            return self.broken
        if user is not None and user in self.users:
            return "its user"
        network = find_network(self.networks, address)
        return f"network {network}" if network is not None else None  # as `show` writes it


NO_DENIALS = DenyList([], frozenset())
DENY_EVERYTHING = DenyList([], frozenset(), broken="a deny list that cannot be read")


def parse_deny_list(text: str, path: str) -> DenyList:
    """One address or network a line, or `user NAME`; `#` starts a comment. ConfigError names
    the file and line of every bad line."""
    networks, users, problems = [], set(), []
    for number, line in enumerate(text.split("\n"), start=1):
        entry = line.partition("#")[0].strip()
        if not entry:
            continue
        word, _, rest = entry.partition(" ")
        if word == "user":
            name = rest.strip()
            if not name:
                problems.append(f"{path}:{number}: expected `user NAME`")
            else:
                users.add(name)
            continue
        try:
            networks.append(parse_network(entry))
        except AddressError as error:
            problems.append(f"{path}:{number}: {error}; expected an address, a network such as 192.0.2.0/24, "
                            "or `user NAME`")
    if problems:
        raise ConfigError(problems)
    return DenyList(networks, frozenset(users))


def load_deny_list(path: str) -> DenyList:
    """Read the deny list; a missing file denies nothing."""
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except FileNotFoundError:
        return NO_DENIALS
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError([f"{path}: cannot read: {getattr(error, 'strerror', None) or error}"]) from None
    return parse_deny_list(text, path)
