"""Grants: which client may relay until when (pure: time is always an argument).

A grant is address -> (expires_at, login_at, source, user), times in whole seconds since
the epoch, user the login's user name as the server logged it (None for a grant made by
hand). It is stored as a small versioned text value, readable with any gdbm tool:

    2 <expires_at> <login_at> <source> <user>   e.g.  b"2 1795701614 1795699814 dovecot alice"
    1 <expires_at> <login_at> <source>          the first format, still read (no user)

The user is the rest of the value, spaces and all, and empty for none. Nothing a user
name holds can change the address, the times or the source: those come first.

A newer login extends a grant; an older one (a late or replayed entry) never shortens
it. Expiry is checked when a grant is read, so an expired grant allows nothing even
before `poplock expire` purges it.

A grant is live only from its login time to its expiry. Times are absolute, so this is
what keeps a clock step from lengthening a grant: a clock stepped back makes the login
lie in the future, and a grant written while the clock ran ahead has a login time the
corrected clock has not reached; both allow nothing (fail closed), and the next login
replaces them. A grant longer than MAX_GRANT_LENGTH is not one poplock wrote (a
damaged or forged value) and allows nothing either.

Free of imports: relaylock decodes grants once per SMTP connection.
"""

FORMAT_VERSION = b"2"

MAX_WINDOW = 86400  # [Grants] Window: POP-before-SMTP windows are minutes to hours
MAX_GRANT_LENGTH = 7 * 86400  # `poplock add --for`, and the longest grant that can be live


class Grant:
    __slots__ = ("address", "expires_at", "login_at", "source", "user")

    def __init__(self, address: str, expires_at: int, login_at: int, source: str, user: str | None = None):
        self.address = address
        self.expires_at = expires_at
        self.login_at = login_at
        self.source = source
        self.user = user

    def is_live(self, now: float) -> bool:
        return self.login_at <= now < self.expires_at and self.expires_at - self.login_at <= MAX_GRANT_LENGTH

    def is_from_the_future(self, now: float) -> bool:
        """Its login time has not come yet: the clock was stepped back since it was written."""
        return self.login_at > now

    def _fields(self):
        return (self.address, self.expires_at, self.login_at, self.source, self.user)

    def __eq__(self, other) -> bool:
        return isinstance(other, Grant) and self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        address, expires_at, login_at, source, user = self._fields()
        return (f"Grant(address={address!r}, expires_at={expires_at!r}, login_at={login_at!r}, source={source!r}, "
                f"user={user!r})")


class GrantDecodeError(ValueError):
    """A stored value that is not a grant of a format this version understands."""


def grant_for_login(address: str, login_at: float, window: float, source: str, user: str | None = None) -> Grant:
    login = int(login_at)
    return Grant(address, login + int(window), login, source, user)


def merge_grant(existing: Grant | None, new: Grant, now: float) -> Grant:
    """The grant that results from `new` arriving at `now` while `existing` is stored.

    The later expiry always wins; the login time, source and user follow the newer login. An
    existing grant whose login lies in the future (the clock was stepped back) or that is
    longer than any grant can be is replaced: it must not outlive its window.
    """
    if existing is None or existing.is_from_the_future(now) or \
            existing.expires_at - existing.login_at > MAX_GRANT_LENGTH:
        return new
    newer = new if new.login_at >= existing.login_at else existing
    return Grant(new.address, max(existing.expires_at, new.expires_at), newer.login_at, newer.source, newer.user)


def encode_grant(grant: Grant) -> bytes:
    user = grant.user.encode("utf-8", "surrogateescape") if grant.user else b""
    return b"%s %d %d %s %s" % (FORMAT_VERSION, grant.expires_at, grant.login_at, grant.source.encode(), user)


def decode_grant(address: str, value: bytes) -> Grant:
    if value.startswith(b"2 "):
        parts = value.split(b" ", 4)
        if len(parts) != 5:
            raise GrantDecodeError(f"malformed grant for {address}: {value[:60]!r}")
        user = parts[4].decode("utf-8", "surrogateescape") or None
    elif value.startswith(b"1 "):
        parts = value.split(b" ", 3)
        if len(parts) != 4:
            raise GrantDecodeError(f"malformed grant for {address}: {value[:60]!r}")
        user = None
    else:
        raise GrantDecodeError(f"unknown grant format for {address}: {value[:60]!r}")
    try:
        source = parts[3].decode()
        if not source or " " in source:
            raise ValueError
        return Grant(address, int(parts[1]), int(parts[2]), source, user)
    except (ValueError, UnicodeDecodeError):
        raise GrantDecodeError(f"malformed grant for {address}: {value[:60]!r}") from None


def split_expired(grants, now: float) -> tuple[list[Grant], list[Grant]]:
    """(live, expired) grants at `now`; a grant that cannot be live (see is_live) counts as expired."""
    live, expired = [], []
    for grant in grants:
        (live if grant.is_live(now) else expired).append(grant)
    return live, expired
