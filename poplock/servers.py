"""The POP3/IMAP servers poplock knows: how each is selected, trusted and parsed.

Adding a server is adding one entry to SERVERS. Each pattern must match the whole
MESSAGE of exactly one successful login, anchored on text the server itself writes.
Text a client chooses (the user name, anything it sends) is matched as the least that
lets the server's fixed structure that follows it match through the end of the line;
it can neither supply the address nor turn a failure into a success.

The selection fields are defaults, each overridable in a [Source:NAME] section:
`identifiers` find candidate entries (not evidence: any local user can claim them);
`units` and `users` are the evidence (_SYSTEMD_UNIT and _UID, which journald sets).
"""

from dataclasses import dataclass

# Addresses as servers print them; normalize_address() does the real checking.
_ADDRESS = r"[0-9A-Fa-f.:]+"


@dataclass(frozen=True)
class Server:
    name: str
    description: str
    identifiers: tuple[str, ...]
    units: tuple[str, ...]
    users: tuple[str, ...]
    patterns: tuple[str, ...]
    # Lines that look like logins, whether or not a pattern reads them (format drift).
    hint: str


DOVECOT = Server(
    name="dovecot",
    description="Dovecot 2.3 (Login:) and 2.4 (Logged in:), POP3 and IMAP",
    identifiers=("dovecot",),
    units=("dovecot.service",),
    # Under a plain journald Dovecot's log process (root) writes every login line.
    users=("root",),
    patterns=(
        r"(?:pop3|imap)-login: (?:Info: )?(?:Login|Logged in): user=<(?P<user>.*)>, "
        r"method=[A-Za-z0-9_-]+, rip=(?P<address>" + _ADDRESS + r"), lip=" + _ADDRESS
        + r"(?:, mpid=[0-9]+)?(?:, (?:TLS|secured))?"
        r"(?:, session=<[A-Za-z0-9+/=]*>)?",
    ),
    hint=r"(?:pop3|imap)-login: .*\b(?:Login|Logged in)\b",
)

SERVERS: dict[str, Server] = {server.name: server for server in (DOVECOT,)}
