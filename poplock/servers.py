"""The POP3/IMAP servers poplock knows: how each is selected, trusted and parsed.

Adding a server is adding one entry to SERVERS. Each pattern must match the whole
MESSAGE of exactly one successful login, anchored on text the server itself writes.
Text a client chooses (the user name, anything it sends) sits where the server's fixed
structure around it decides what it is: where the user name comes before the address,
the name is matched greedily and the pattern ends with the server's exact tail, so the
address read is the last one, the server's own; where the address comes first, it is
read right after the server's fixed prefix. Either way a client's text can neither
supply the address nor turn a failure into a success, and a line the structure cannot
resolve (a cut-off address, say) matches nothing.

The selection fields are defaults, each overridable in a [Source:NAME] section:
`identifiers` find candidate entries (not evidence: any local user can claim them);
`units` and `users` are the evidence (_SYSTEMD_UNIT and _UID, which journald sets).
Units are the names Debian's packages give the server's service (or inetd's, for
servers that inetd starts); under systemd the unit settles every question of trust.

Some servers write the successful login as the mail user they have just become
(popa3d, mailutils imap4d, solid-pop3d after APOP). Under a plain journald such a line's
_UID is no evidence: any local user who also has a mailbox has that kind of uid. Those
uids are trusted only when the admin lists them in `LoginUsers=` (accounts that cannot
run programs of their own), and a line trusted that way never supplies an address by
itself: the address must come from a line of the same connection that `users` or
`units` trust (see Correlation). So under a plain journald these logins grant nothing
by default; under systemd they grant, their unit being the evidence.

Servers that write the client address and the successful login on different lines of
one connection are read with a Correlation: the address line (trusted like any other)
is remembered under the connection's key, the login line takes it. The key is the
entry's _PID (journald's, per boot) when one process writes both lines (tcpd and the
server it execs keep the pid), or the session id at the start of the line when the
server prints one in every line of a connection (mailutils).

Why a _PID alone is not enough under a plain journald: pids are reused, and a local user
can cycle through them (32768 of them on many machines) until a process of theirs has the
pid that a connection from the attacker's address just left behind; a login line that
process logs would take that address. So a correlated login line must itself be trusted
as above (root, the unit, or LoginUsers); the address line must be trusted by `users` or
`units` (root: tcpd and the listeners run as root); lines that end an unauthenticated
connection (popa3d's "Didn't attempt authentication") forget its address; an address
older than `max_age` (journal time, from __REALTIME_TIMESTAMP) is never used; and a
login takes the address, so one connection grants once. Per server:

- popa3d (key _PID): tcpd's `connect from` (root) gives the address, popa3d's
  `Authentication passed` (the mail user) the login. Under systemd both carry the inetd
  (or popa3d) unit, which settles it. Under a plain journald no rule is safe, so by
  default nothing grants; LoginUsers= (mail-only accounts) is the admin's way to allow it.
- mailutils (key: the session id starting every line, `logging { session-id yes; }`):
  the listener (root) logs `SID connect from ADDRESS` (the acl line the site must add),
  pop3d's child logs its login as root: safe under a plain journald, as only root writes
  uid 0 lines. imap4d's child logs its login as the mail user: by default that needs the
  unit (systemd); LoginUsers= allows it under a plain journald, but session ids are no
  secret, so any uid listed there could confirm any open connection.
- solid-pop3d (key _PID, used only for APOP): its login line holds the address and is
  written by root, except after APOP (the mail user). Such a line is read only with
  LoginUsers=, and only when tcpd's or solid-pop3d's own root `connect from` line of the
  same process gave the same address.
- UW imapd/ipop3d and qpopper: their lines hold the address. UW writes its login and end
  lines after it has become the mail user (its source says so), so under a plain journald
  LoginUsers= applies with their own root connection lines (`imap service init from`,
  `Servicing request from`, tcpd's) as for solid-pop3d; under systemd the unit vouches.

Everything in the map is lost when the reader restarts: a login whose address line came
before the saved journal position grants nothing (the client's next login does).

Sessions (see Sessions and sessions.py): servers that log the end of a connection let a
grant stay live while its client is still connected (IMAP IDLE, cached connections) and
for the window after. A connection is known by what the server logs in both its login
line and its end line (Dovecot: the mail process id and session=<...>; Courier: the
client's address and port, per courierlogger; Cyrus and mailutils: the process that
serves it), never by the user name. As for logins, the user name sits where the server's
fixed structure around it decides what it is, so the key read is the server's own: the key
comes from journald's own fields (_PID), or a line holding a second key matches nothing
(Dovecot), or the name is taken greedily and only the server's counters may follow the key
(Courier).
Only trusted lines open or end sessions; a line that ends a connection nobody trusted
opened does nothing.
"""

from dataclasses import dataclass

# Addresses as servers print them; normalize_address() does the real checking.
_ADDRESS = r"[0-9A-Fa-f.:]+"
_IPV4 = r"[0-9.]+"
# A host name as servers print a resolved client: one holding spaces, brackets or
# parentheses makes the line match nothing.
_HOST = r"[^\s()\[\]]+"
# tcpd's line, with the Debian patch ("connect from NAME (ADDRESS)", NAME may be the
# address again) or without ("connect from ADDRESS").
_TCPD_CONNECT = (
    r"connect from " + _HOST + r" \((?P<address>" + _ADDRESS + r")\)",
    r"connect from (?P<address>" + _ADDRESS + r")",
)
# Services that inetd starts run in its unit under systemd (openbsd-inetd.service is an alias).
_INETD_UNITS = ("inetd.service", "xinetd.service")

# Text holding no `)<PID><SESSION>: `, the key Dovecot's mail processes start their lines with.
_NO_DOVECOT_KEY = r"(?:(?!\)<[0-9]+><[A-Za-z0-9+/=]*>: ).)*"

CORRELATE_BY_PID = "pid"
CORRELATE_BY_SESSION = "session"


@dataclass(frozen=True)
class Correlation:
    """How the address line and the login line of one connection are paired."""

    key: str  # CORRELATE_BY_PID, or CORRELATE_BY_SESSION: the (?P<session>) group of both lines
    # Lines that give a connection's address: (?P<address>...), and (?P<session>...) when keyed by session.
    connections: tuple[str, ...]
    # Lines that end a connection without a login: its address is forgotten.
    ends: tuple[str, ...] = ()
    # Seconds (journal time) an address waits for its login: as long as the servers wait for
    # a command by default (ten minutes); a client slower than that gets no grant.
    max_age: float = 600.0
    # Connections remembered per source at most; the oldest go first.
    max_size: int = 4096


@dataclass(frozen=True)
class Sessions:
    """How a server's connections are told apart in its lines, and which lines end them."""

    # The parts of a connection's key, each the login (or end) line's named group of that name,
    # else the journal field of that name (_PID and _BOOT_ID, which journald sets itself).
    key: tuple[str, ...]
    # Trusted lines that end one connection, giving the same key parts (re.fullmatch).
    ends: tuple[str, ...]
    # Trusted lines that end every connection of the server: its own start and stop lines.
    # (Its systemd units' start and stop jobs, logged by PID 1, do too: see logins.py.)
    restarts: tuple[str, ...] = ()
    # The lines come through one logging process per SYSLOG_IDENTIFIER (courierlogger) that
    # lives as long as the server: a line from another process of that identifier means the
    # server was started again, which ends the connections the old one logged.
    per_instance: bool = False
    # The end lines are written as the mail user, which only a systemd unit makes evidence:
    # sessions are then opened only by logins that their unit makes trusted.
    ends_need_unit: bool = False


# What PID 1 logs for a unit's jobs (sd-messages.h): starting, stopping, stopped, failed,
# and finished, and a unit that failed without a job (its main process killed: no
# Restart=, or before the restart's jobs). A login source's unit doing any of these ends
# its sessions. Not "started": a client may already have logged in by then. Not "process
# exited": it is also logged for a reload's control process.
UNIT_JOB_MESSAGE_IDS = frozenset({
    "7d4958e842da4a758f6c1cdc7b36dcc5",  # SD_MESSAGE_UNIT_STARTING
    "de5b426a63be47a7b6ac3eaac82e2f6f",  # SD_MESSAGE_UNIT_STOPPING
    "9d1aaa27d60140bd96365438aad20286",  # SD_MESSAGE_UNIT_STOPPED
    "be02cf6855d2428ba40df7e9d022f03d",  # SD_MESSAGE_UNIT_FAILED
    "7ad2d189f7e94e70a38c781354912448",  # SD_MESSAGE_UNIT_SUCCESS (deactivated)
    "d9b373ed55a64feb8242e02dbe79a49c",  # SD_MESSAGE_UNIT_FAILURE_RESULT ("Failed with result 'signal'")
})


@dataclass(frozen=True)
class Server:
    name: str
    description: str
    identifiers: tuple[str, ...]
    units: tuple[str, ...]
    users: tuple[str, ...]
    # Successful logins: (?P<address>...) and optionally (?P<user>...); for a server with a
    # Correlation, a pattern without an address takes it from the connection's address line.
    patterns: tuple[str, ...]
    # Lines that look like logins, whether or not a pattern reads them (format drift); re.search.
    hint: str
    correlation: Correlation | None = None
    # Uids the login line may carry when the server writes it as the mail user (see above).
    login_users: tuple[str, ...] = ()
    # How its connections' ends are read; None: it logs none that can be used, so a grant
    # lasts the window after the login, whatever the client does after it.
    sessions: Sessions | None = None


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
        + r"(?:, mpid=(?P<mpid>[0-9]+))?(?:, (?:TLS|secured))?"
        r"(?:, TLSv[0-9.]+ with cipher [A-Za-z0-9_-]+ \([0-9]+/[0-9]+ bits\))?"
        r"(?:, session=<(?P<session>[A-Za-z0-9+/=]*)>)?",
    ),
    hint=r"^(?:pop3|imap)-login: (?:Info: )?(?:Login|Logged in): ",
    # The login process hands the connection to a mail process (mpid=) and logs Login: only
    # then; the mail process ends every line with its default mail_log_prefix,
    # `imap(USER)<PID><SESSION>: `, and logs `Disconnected: ...` (2.3) or `Logged out ...`
    # (2.4) when the connection ends, however it ends. The login process's own Disconnected
    # lines are of connections that never logged in, so they end nothing.
    sessions=Sessions(
        key=("mpid", "session"),
        ends=(
            # The key must be the only `)<PID><SESSION>: ` of the line: a user name, or a reason
            # after the key, that holds another one makes the line match nothing (that connection
            # then ends by its bound or a restart), so neither can name another connection.
            r"(?:pop3|imap)\((?P<user>" + _NO_DOVECOT_KEY + r")\)<(?P<mpid>[0-9]+)><(?P<session>[A-Za-z0-9+/=]+)>: "
            r"(?:Info: )?(?:Disconnected|Logged out|Connection closed)\b" + _NO_DOVECOT_KEY,
        ),
        restarts=(
            r"master: (?:Info: )?Dovecot v[0-9][^\s<>]* (?:\([0-9a-f]+\) )?starting up\b[^<>]*",
            r"master: (?:Warning: )?Killed with signal [0-9]+\b[^<>]*",
        ),
    ),
)

COURIER = Server(
    name="courier",
    description="Courier pop3d, pop3d-ssl, imapd, imapd-ssl (through courierlogger)",
    # Debian's /etc/courier files name each service's logger; older Courier logged as the
    # login program itself.
    identifiers=("pop3d", "pop3d-ssl", "imapd", "imapd-ssl", "courierpop3login"),
    units=("courier-pop.service", "courier-pop-ssl.service", "courier-imap.service", "courier-imap-ssl.service"),
    # courierlogger (root) relays every line: `LOGIN, user=NAME, ip=[ADDRESS], port=[PORT]`.
    users=("root",),
    patterns=(
        # A name such as `x, ip=[203.0.113.11]` comes first; the address is the last ip=[...],
        # which only port= and protocol= may follow. Older Courier wrote no port.
        r"LOGIN, user=(?P<user>.*), ip=\[(?P<address>" + _ADDRESS + r")\]"
        r"(?:, port=\[(?P<port>[0-9]+)\])?(?:, protocol=IMAP)?",
    ),
    hint=r"^LOGIN, ",
    # A connection is its client's address and port, per courierlogger (one per service,
    # living as long as it); LOGOUT, TIMEOUT and DISCONNECTED end it, with counters only after
    # the port, so the ip=[...], port=[...] read are the last ones, the server's own.
    sessions=Sessions(
        key=("address", "port"),
        ends=(
            r"(?:LOGOUT|TIMEOUT|DISCONNECTED), user=(?P<user>.*), ip=\[(?P<address>" + _ADDRESS + r")\], "
            r"port=\[(?P<port>[0-9]+)\](?:, [a-z]+=[0-9]+)*",
        ),
        per_instance=True,
    ),
)

CYRUS = Server(
    name="cyrus",
    description="Cyrus IMAP pop3d and imapd (under master)",
    # Debian's imapd.conf sets syslog_prefix: cyrus, so lines come as cyrus/<service> for the
    # services its cyrus.conf defines; without the prefix, as the bare service name.
    identifiers=("cyrus/pop3", "cyrus/pop3s", "cyrus/imap", "cyrus/imaps", "pop3", "pop3s", "imap", "imaps",
                 "cyrus/master"),
    units=("cyrus-imapd.service",),
    # master drops root for the cyrus user before starting pop3d and imapd.
    users=("cyrus",),
    patterns=(
        # `login: [HOST ][ADDRESS] USER MECHANISM User logged in`: the address comes right
        # after the fixed prefix (a host name holds no brackets), before the user name.
        r"login: (?:" + _HOST + r" ?)?\[(?P<address>" + _ADDRESS + r")\] (?P<user>.+) [^ ]+ User logged in"
        r"(?: SESSIONID=<[^<>\s]*>)?",
    ),
    hint=r"^login: ",
    # master hands one connection at a time to a process (which may serve the next one after
    # it): a connection is the process that logged its login, until that process logs its
    # USAGE line (the connection's end) or shuts down, or master reports it dead.
    sessions=Sessions(
        key=("_BOOT_ID", "_PID"),
        ends=(
            r"USAGE (?P<user>.*) user: [0-9.]+ sys: [0-9.]+",
            r"graceful shutdown\b.*",
            r"process type:SERVICE name:[^\s]+ path:[^\s]+ age:[0-9.]+s pid:(?P<_PID>[0-9]+) "
            r"(?:signaled to death|exited)\b.*",
        ),
        restarts=(r"attempting clean shutdown on signal", r"All children have exited, closing down"),
    ),
)

MAILUTILS = Server(
    name="mailutils",
    description="GNU mailutils pop3d and imap4d (logging { session-id yes; } and an acl that logs the address)",
    identifiers=("pop3d", "imap4d"),
    units=("mailutils-pop3d.service", "mailutils-imap4d.service"),
    # The listener (root) logs the address; pop3d's child logs the login as root, imap4d's
    # child as the mail user (LoginUsers, or the unit under systemd).
    users=("root",),
    patterns=(
        r"(?P<session>[0-9A-Za-z]+) POP3 login: user `(?P<user>.*)', source [^\s,]+",
        r"(?P<session>[0-9A-Za-z]+) user `(?P<user>.*)' logged in \(source: [^\s()]+\)",
    ),
    hint=r"^[0-9A-Za-z]+ (?:POP3 login: user `|user `.*' logged in \(source: )",
    # One child process per connection, which logs the login; the listener (root) logs
    # `process PID finished with code ...` when it is gone, the child `session ended`
    # (pop3d) or `session terminating` (imap4d) as the mail user.
    sessions=Sessions(
        key=("_BOOT_ID", "_PID"),
        ends=(
            r"process (?P<_PID>[0-9]+) finished with code [0-9]+ \([^()]*\)",
            r"[0-9A-Za-z]+ session (?:ended|terminating) for user: .*",
        ),
    ),
    correlation=Correlation(
        key=CORRELATE_BY_SESSION,
        connections=(
            # What `acl { log from any "connect from ${address}"; }` writes; IPv6 in full.
            r"(?P<session>[0-9A-Za-z]+) connect from (?P<address>" + _ADDRESS + r")",
            r"(?P<session>[0-9A-Za-z]+) inet://(?P<address>" + _IPV4 + r"):[0-9]+: "
            r"undefined ACL result; access allowed",
            r"(?P<session>[0-9A-Za-z]+) inet6://\[(?P<address>" + _ADDRESS + r")\]:[0-9]+: "
            r"undefined ACL result; access allowed",
        ),
    ),
)

POPA3D = Server(
    name="popa3d",
    description="popa3d from inetd through tcpd",
    identifiers=("popa3d",),
    units=_INETD_UNITS + ("popa3d.service",),
    # tcpd (root) logs `connect from NAME (ADDRESS)` and execs popa3d in the same process,
    # which logs `Authentication passed for USER` as that user: never evidence by itself.
    users=("root",),
    patterns=(r"Authentication passed for (?P<user>.+)",),
    hint=r"^Authentication passed for ",
    correlation=Correlation(
        key=CORRELATE_BY_PID,
        connections=_TCPD_CONNECT,
        ends=(r"Authentication failed for .+", r"Didn't attempt authentication"),
    ),
)

SOLID_POP3D = Server(
    name="solid-pop3d",
    description="solid-pop3d from inetd through tcpd",
    identifiers=("solid-pop3d", "spop3d"),
    units=_INETD_UNITS + ("solid-pop3d.service",),
    # Root logs the login, except after APOP: then the mail user does (LoginUsers).
    users=("root",),
    patterns=(
        # `user NAME authenticated - ADDRESS` or `- HOST (ADDRESS)`: the name comes first and
        # may hold `authenticated - 203.0.113.13`; the address is the line's last.
        r"user (?P<user>.+) authenticated(?: through APOP)? - (?P<address>" + _ADDRESS + r")",
        r"user (?P<user>.+) authenticated(?: through APOP)? - " + _HOST + r" \((?P<address>" + _ADDRESS + r")\)",
    ),
    hint=r"^user .+ authenticated\b",
    # One process per connection (inetd); it logs `session ended for user NAME - ADDRESS` as
    # the mail user, so its sessions are read under systemd only.
    sessions=Sessions(
        key=("_BOOT_ID", "_PID"),
        ends=(r"session ended for user .+ - (?:" + _HOST + r" \()?" + _ADDRESS + r"\)?",),
        ends_need_unit=True,
    ),
    # Only for lines trusted by LoginUsers: their address must be the one tcpd and
    # solid-pop3d logged as root for the same process.
    correlation=Correlation(
        key=CORRELATE_BY_PID,
        connections=_TCPD_CONNECT,
        ends=(r"(?:APOP )?authentication failed.*", r"session ended - .+"),
    ),
)

# Servers that cannot run here: formats from their published lines (see tests/unit/test_corpus.py).
# Their trust defaults are the conservative ones (root, and Debian's unit names); where
# the line turns out to be written by another uid, set Users= or LoginUsers=.

QPOPPER = Server(
    name="qpopper",
    description="Qualcomm qpopper 4",
    identifiers=("popper", "qpopper", "in.qpopper"),
    units=_INETD_UNITS + ("qpopper.service",),
    users=("root",),
    patterns=(
        # `(v4.0.9) POP login by user "NAME" at (HOST) ADDRESS [pop_log.c:244]`
        r"\(v[^()\s]*\) POP login by user \"(?P<user>.*)\" at \([^()]*\) (?P<address>" + _ADDRESS + r")"
        r"(?: \[[A-Za-z0-9_]+\.c:[0-9]+\])?",
    ),
    hint=r"^\(v[^()\s]*\) POP login by user ",
    correlation=Correlation(
        key=CORRELATE_BY_PID,
        connections=(
            r"\(v[^()\s]*\) Servicing request from \"[^\"]*\" at (?P<address>" + _ADDRESS + r")"
            r"(?: \[[A-Za-z0-9_]+\.c:[0-9]+\])?",
        ) + _TCPD_CONNECT,
    ),
)

# How UW imapd and ipop3d end a connection (imap-2007f: `%s user=%.80s host=%.80s`, the reason
# first; tests/corpus/documented.jsonl cites each): LOGOUT or QUIT; the autologout timer; the kiss
# of death (another process took the mailbox's lock); SIGHUP or SIGPIPE; SIGTERM; and a broken
# command stream, `ERROR, while DOING` (older versions wrote no comma, and their ipop3d its counts
# after the host). The reason holds no `=`, so no text of the line can be read as one.
_UW_END_REASON = (r"(?:Logout|Autologout|Hangup|Killed(?: \((?:lost mailbox lock|terminated)\))?"
                  r"|[A-Za-z][A-Za-z0-9 /'-]{0,79},? while [a-z]+(?: [a-z]+){0,2})")
# The host as tcp_clienthost() writes it (`NAME [ADDRESS]`, `[ADDRESS]`, `UNKNOWN`, `SSH_CLIENT=ADDRESS`),
# cut at 80 characters, anywhere: only the server's counts may follow it.
_UW_HOST_TEXT = (r"(?=.{1,80}(?: nmsgs=[0-9]+ ndele=[0-9]+)?\Z)"
                 r"(?:[A-Za-z0-9.-]+(?: (?:\[[0-9A-Fa-f.:]*\]?)?)?|\[[0-9A-Fa-f.:]*\]?|[A-Z0-9_]+=[0-9A-Fa-f.:]*)")

UW_IMAP = Server(
    name="uw-imap",
    description="UW (University of Washington) imapd and ipop3d",
    identifiers=("imapd", "ipop3d", "ipop2d"),
    units=_INETD_UNITS,
    users=("root",),
    patterns=(
        # `Login user=NAME host=HOST [ADDRESS]` (ipop3d adds ` nmsgs=N/N`, imapd's AUTHENTICATE
        # ` mech=MECHANISM`, one it knows). UW cuts host= to 80 characters: a long host name leaves
        # no complete [ADDRESS], and the line matches nothing.
        r"(?:Login|Authenticated|Auth|APOP) user=(?P<user>.*) host=(?:" + _HOST + r" )?"
        r"\[(?P<address>" + _ADDRESS + r")\](?: nmsgs=[0-9]+/[0-9]+| mech=[A-Za-z0-9_-]+)?",
    ),
    hint=r"^(?:Login|Authenticated|Auth|APOP) user=",
    correlation=Correlation(
        key=CORRELATE_BY_PID,
        connections=(r"(?:imap|pop3|pop2) service init from (?P<address>" + _ADDRESS + r")",) + _TCPD_CONNECT,
    ),
    # One process per connection (inetd, xinetd, or a systemd socket with Accept=yes) logs its
    # login and its end, both after it has become the mail user (server_login() sets the uid):
    # like solid-pop3d's, its sessions are read under systemd only, the unit being the evidence.
    # The key is journald's _PID, so no user name (spaces, `host=` and all) can name another
    # connection; an end line of a connection that never logged in (`user=???`) ends nothing.
    sessions=Sessions(
        key=("_BOOT_ID", "_PID"),
        ends=(_UW_END_REASON + r" user=(?P<user>.{0,80}) host=" + _UW_HOST_TEXT
              + r"(?: nmsgs=[0-9]+ ndele=[0-9]+)?",),
        ends_need_unit=True,
    ),
)

VM_POP3D = Server(
    name="vm-pop3d",
    description="vm-pop3d (virtual mail POP3)",
    identifiers=("vm-pop3d",),
    units=("vm-pop3d.service",) + _INETD_UNITS,
    users=("root",),
    patterns=(r"User '(?P<user>.*)' logged in from (?P<address>" + _ADDRESS + r")(?:, nmsgs=[0-9]+)?",),
    hint=r"^User '.*' logged in",
)

TEAPOP = Server(
    name="teapop",
    description="Teapop",
    identifiers=("teapop",),
    units=("teapop.service",) + _INETD_UNITS,
    users=("root",),
    patterns=(
        # `Successful login for USER@DOMAIN [LOCAL] from HOST [ADDRESS]`: the client is the last one.
        r"Successful login for (?P<user>.*) \[[^\[\]]*\] from " + _HOST + r" \[(?P<address>" + _ADDRESS + r")\]",
    ),
    hint=r"^Successful login for ",
)

PERDITION = Server(
    name="perdition",
    description="Perdition POP3/IMAP proxy (its Auth: line once the real server accepted the login)",
    identifiers=("perdition", "perdition.imap4", "perdition.imap4s", "perdition.imaps",
                 "perdition.pop3", "perdition.pop3s"),
    units=("perdition.service",),
    # Perdition runs as its -u user (nobody unless set) when it logs; not trusted by default.
    users=("root",),
    patterns=(
        # `Auth: CLIENT->SERVER user="NAME" [passwd="..." ]server="..." port="..." status="ok"`:
        # the client address comes right after the fixed prefix, the status ends the line.
        r"Auth: (?P<address>" + _ADDRESS + r")->" + _ADDRESS + r" user=\"(?P<user>.*)\"(?: passwd=\".*\")? "
        r"server=\"[^\"]*\" port=\"[^\"]*\" status=\"ok\"",
        # Perdition 1.x logged Auth: only for a login the real server accepted, without a status.
        r"Auth: (?P<address>" + _ADDRESS + r")->" + _ADDRESS + r" user=\"(?P<user>.*)\" "
        r"server=\"[^\"]*\" port=\"[^\"]*\"",
    ),
    hint=r"^Auth: .* status=\"ok\"$",
)

LOGAUTH = Server(
    name="logauth",
    description="poplock-logauth in a checkpassword chain (qmail-pop3d and other checkpassword servers)",
    identifiers=("poplock-logauth",),
    # No default evidence: any local user can run poplock-logauth, and the chain runs it as
    # whatever user checkpassword switched to. Set Units= (the POP3 service's unit) or
    # Users= (the uid the chain runs as, e.g. vpopmail) in [Source:logauth].
    units=(),
    users=(),
    # poplock-logauth writes this line itself: the address right after the fixed prefix.
    patterns=(r"successful (?:POP3|IMAP) login from (?P<address>" + _ADDRESS + r") \(user (?P<user>.*)\)",),
    hint=r"^successful (?:POP3|IMAP) login from ",
)

SERVERS: dict[str, Server] = {
    server.name: server
    for server in (DOVECOT, COURIER, CYRUS, MAILUTILS, POPA3D, SOLID_POP3D,
                   QPOPPER, UW_IMAP, VM_POP3D, TEAPOP, PERDITION, LOGAUTH)
}
