"""Grants: which client may relay until when (pure: time is always an argument).

A grant is address -> (expires_at, login_at, source, user), times in whole seconds since
the epoch, user the login's user name as the server logged it (None for a grant made by
hand). It is stored as a small versioned text value, readable with any gdbm tool:

    2 <expires_at> <login_at> <source> <user>   e.g.  b"2 1795701614 1795699814 dovecot alice"
    1 <expires_at> <login_at> <source>          the first format, still read (no user)
    3 <expires_at> <login_at> <source> <expires_when_released> <sessions> <user>
                                                a grant held open by sessions (see below)

The user is the rest of the value, spaces and all, and empty for none. Nothing a user
name holds can change the address, the times or the source: those come first.

A grant may be held open by sessions: connections of its client that a trusted login
opened and that have not ended yet (an IMAP client that stays connected for hours).
`sessions` lists them as KEY@OPENED_AT, comma-separated, oldest first, where KEY is what
the server logs to tell its connections apart (sessions.py); `expires_when_released` is
when the grant expires once no session holds it any more (the logins' and manual
grants' own expiry, and the window after every session that has ended); `expires_at` is
still when it stops allowing, the later of that and the bound of its open sessions. So
whoever reads a grant (relaylock, the policy service) needs to know nothing of sessions,
and a grant that is removed takes its sessions with it. A grant with no open session is
written in format 2, as before.

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
    __slots__ = ("address", "expires_at", "login_at", "source", "user", "sessions", "expires_when_released")

    def __init__(self, address: str, expires_at: int, login_at: int, source: str, user: str | None = None,
                 sessions: tuple = (), expires_when_released: int | None = None):
        self.address = address
        self.expires_at = expires_at
        self.login_at = login_at
        self.source = source
        self.user = user
        self.sessions = sessions  # ((key, opened_at), ...), oldest first: the open sessions holding it
        self.expires_when_released = expires_at if expires_when_released is None else expires_when_released

    @property
    def held(self) -> bool:
        """Open sessions hold it: it lasts past its logins' window while they stay open."""
        return bool(self.sessions)

    def is_live(self, now: float) -> bool:
        return self.login_at <= now < self.expires_at and self.expires_at - self.login_at <= MAX_GRANT_LENGTH

    def is_from_the_future(self, now: float) -> bool:
        """Its login time has not come yet: the clock was stepped back since it was written."""
        return self.login_at > now

    def _fields(self):
        return (self.address, self.expires_at, self.login_at, self.source, self.user, self.sessions,
                self.expires_when_released)

    def __eq__(self, other) -> bool:
        return isinstance(other, Grant) and self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash(self._fields())

    def __repr__(self) -> str:
        held = f", sessions={self.sessions!r}, expires_when_released={self.expires_when_released!r}" \
            if self.sessions else ""
        return (f"Grant(address={self.address!r}, expires_at={self.expires_at!r}, login_at={self.login_at!r}, "
                f"source={self.source!r}, user={self.user!r}{held})")


class GrantDecodeError(ValueError):
    """A stored value that is not a grant of a format this version understands."""


def grant_for_login(address: str, login_at: float, window: float, source: str, user: str | None = None) -> Grant:
    login = int(login_at)
    return Grant(address, login + int(window), login, source, user)


def merge_grant(existing: Grant | None, new: Grant, now: float) -> Grant:
    """The grant that results from `new` arriving at `now` while `existing` is stored.

    The later expiry always wins; the login time, source and user follow the newer login. An
    existing grant whose login lies in the future (the clock was stepped back) or that is
    longer than any grant can be is replaced: it must not outlive its window. The sessions
    holding the existing grant open go on holding it, and the new grant's own expiry is
    kept for when they end (a manual grant outlasts the sessions it was added during).
    """
    if existing is None or existing.is_from_the_future(now) or \
            existing.expires_at - existing.login_at > MAX_GRANT_LENGTH:
        return new
    newer = new if new.login_at >= existing.login_at else existing
    sessions = existing.sessions + tuple(session for session in new.sessions if session not in existing.sessions)
    return Grant(new.address, max(existing.expires_at, new.expires_at), newer.login_at, newer.source, newer.user,
                 sessions, max(existing.expires_when_released, new.expires_when_released))


def encode_grant(grant: Grant) -> bytes:
    user = grant.user.encode("utf-8", "surrogateescape") if grant.user else b""
    if grant.sessions:
        sessions = ",".join(f"{key}@{opened_at}" for key, opened_at in grant.sessions).encode()
        return b"3 %d %d %s %d %s %s" % (grant.expires_at, grant.login_at, grant.source.encode(),
                                         grant.expires_when_released, sessions, user)
    return b"%s %d %d %s %s" % (FORMAT_VERSION, grant.expires_at, grant.login_at, grant.source.encode(), user)


def value_is_not_live(value: bytes, now: float) -> bool:
    """Not Grant.is_live() of an encoded grant, read from its first fields alone: a scan over a
    million grants (`poplock expire`) decodes only those it finds. A value it cannot read is not live."""
    parts = value.split(b" ", 3)
    try:
        expires_at, login_at = int(parts[1]), int(parts[2])
    except (IndexError, ValueError):
        return True
    return not (login_at <= now < expires_at and expires_at - login_at <= MAX_GRANT_LENGTH)


def decode_grant(address: str, value: bytes) -> Grant:
    if value.startswith(b"3 "):
        return _decode_held(address, value)
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


def _decode_held(address: str, value: bytes) -> Grant:
    parts = value.split(b" ", 6)
    try:
        if len(parts) != 7:
            raise ValueError
        source = parts[3].decode()
        if not source or " " in source:
            raise ValueError
        sessions = []
        for item in parts[5].decode().split(","):
            key, at, opened_at = item.rpartition("@")
            if not key or not at:
                raise ValueError
            sessions.append((key, int(opened_at)))
        expires_at, expires_when_released = int(parts[1]), int(parts[4])
        if expires_when_released > expires_at:
            raise ValueError
        return Grant(address, expires_at, int(parts[2]), source, parts[6].decode("utf-8", "surrogateescape") or None,
                     tuple(sessions), expires_when_released)
    except (ValueError, UnicodeDecodeError):
        raise GrantDecodeError(f"malformed grant for {address}: {value[:60]!r}") from None


def split_expired(grants, now: float) -> tuple[list[Grant], list[Grant]]:
    """(live, expired) grants at `now`; a grant that cannot be live (see is_live) counts as expired."""
    live, expired = [], []
    for grant in grants:
        (live if grant.is_live(now) else expired).append(grant)
    return live, expired
