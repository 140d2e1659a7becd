"""poplock's configuration: one declarative table of settings, read from systemd-style INI files.

/etc/poplock/poplock.conf, then /etc/poplock/poplock.conf.d/*.conf in lexical order;
a later assignment replaces an earlier one (lists too: `Sources=dovecot courier`). The table below
drives the Config object, the shipped etc/poplock.conf, `poplock config`, and the test
that poplock.conf(5) documents every setting.

Every problem is collected with its file and line and reported at once. This module is
imported by relaylock once per SMTP connection, so it stays free of `re`, `os` and
`dataclasses`; checking [Source:NAME] sections, which needs regular expressions, is
left to poplock.sources and done only for the programs that read the journal.
"""

from poplock.errors import ConfigError
from poplock.grants import MAX_GRANT_LENGTH, MAX_WINDOW
from poplock.inifile import Assignment, read_config_files
from poplock.values import parse_absolute_path, parse_boolean, parse_list, parse_timespan

DEFAULT_PATH = "/etc/poplock/poplock.conf"


def _window(text: str) -> float:
    seconds = parse_timespan(text)
    if not 1 <= seconds <= MAX_WINDOW:
        raise ValueError(f"must be from 1s to {MAX_WINDOW // 3600}h: a login lets its client relay for minutes "
                         "or hours, and the static allow list is for clients that always may")
    return seconds


def _busy_timeout(text: str) -> float:
    seconds = parse_timespan(text)
    if seconds > 5:
        raise ValueError("must be at most 5s: every SMTP connection may wait this long")
    return seconds


def _optional_absolute_path(text: str) -> str:
    return parse_absolute_path(text) if text.strip() else ""


def _reader_wait(text: str) -> float:
    seconds = parse_timespan(text)
    if seconds > 1:
        raise ValueError("must be at most 1s: a client's connection waits this long for each refusal")
    return seconds


def _recheck_interval(text: str) -> float:
    seconds = parse_timespan(text)
    if 0 < seconds < 0.001:
        raise ValueError("must be 0 or at least 1ms")
    return seconds


def _positive_timespan(text: str) -> float:
    seconds = parse_timespan(text)
    if seconds <= 0:
        raise ValueError("must be longer than 0")
    return seconds


# A session's bound plus the window must fit in the longest grant there can be.
MAX_SESSION_LENGTH = MAX_GRANT_LENGTH - MAX_WINDOW


def _max_session_length(text: str) -> float:
    seconds = parse_timespan(text)
    if seconds > MAX_SESSION_LENGTH:
        raise ValueError(f"must be at most {MAX_SESSION_LENGTH // 86400} days (0: sessions hold no grant open): "
                         "it bounds how long a connection whose end line was lost keeps its client relaying")
    return seconds


def _address_count(text: str) -> int:
    if not text.strip().isdigit() or int(text) > 10000:
        raise ValueError("expected a whole number from 0 (no limit) to 10000")
    return int(text)


def _ipv6_prefix(text: str) -> int:
    if not text.strip().isdigit() or not 32 <= int(text) <= 128:
        raise ValueError("expected a prefix length from 32 to 128 (64 is the usual network of one client)")
    return int(text)


def _connection_count(text: str) -> int:
    if not text.strip().isdigit() or not 1 <= int(text) <= 100000:
        raise ValueError("expected a whole number from 1 to 100000")
    return int(text)


def _relay_client(text: str) -> str:
    if "\0" in text:
        raise ValueError("must not contain a NUL character")
    return text


def _header_name(text: str) -> str:
    name = text.strip()
    if name and not all(33 <= ord(character) <= 126 and character != ":" for character in name):
        raise ValueError("expected a header field name such as X-PopBeforeSMTP (no spaces or colons)")
    return name


def _policy_action(text: str) -> str:
    action = text.strip()
    if not action or "\n" in action:
        raise ValueError("expected a Postfix access(5) action such as OK or a restriction class name")
    return action


_MAP_NAME_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


def _socketmap_maps(text: str) -> tuple[tuple[str, str], ...]:
    """NAME:VALUE words: the map names poplock-socketmap answers, each with its OK value."""
    maps: list[tuple[str, str]] = []
    for word in text.split():
        name, colon, value = word.partition(":")
        if not colon or not name or not value:
            raise ValueError(f"{word!r}: expected NAME:VALUE, such as poplock:OK")
        if len(name) > 64 or not set(name) <= _MAP_NAME_CHARACTERS:
            raise ValueError(f"{word!r}: a map name is up to 64 letters, digits, '_', '.' and '-'")
        if len(value) > 200 or not all("!" <= character <= "~" for character in value):
            raise ValueError(f"{word!r}: the value must be up to 200 printable ASCII characters")
        if any(name == known for known, _ in maps):
            raise ValueError(f"map name {name} given twice")
        maps.append((name, value))
    if not maps:
        raise ValueError("expected at least one NAME:VALUE, such as poplock:OK")
    return tuple(maps)


MAX_UNIX_SOCKET_PATH = 107  # bytes: sun_path holds 108 with its NUL


def _relaylock_server(text: str) -> str:
    """Where relaylock asks instead of the local store: "" (nowhere), IPV4:PORT, [IPV6]:PORT or
    an absolute unix socket path; addresses in their canonical spelling, so `poplock config` shows it."""
    where = text.strip()
    if not where:
        return ""
    if where.startswith("/"):
        if len(where.encode()) > MAX_UNIX_SOCKET_PATH:
            raise ValueError(f"a unix socket path is at most {MAX_UNIX_SOCKET_PATH} bytes")
        return where
    host, colon, port = where.rpartition(":")
    if not colon or not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
        raise ValueError("expected ADDRESS:PORT, [IPV6-ADDRESS]:PORT or an absolute unix socket path")
    bracketed = host.startswith("[") and host.endswith("]")
    if ":" in host and not bracketed:
        raise ValueError("an IPv6 address goes in brackets, as in [2001:db8::25]:7025")
    from poplock.addresses import normalize_address  # only when a server is set

    try:
        address = normalize_address(host[1:-1] if bracketed else host)
    except ValueError:
        raise ValueError(f"{host or 'nothing'} is not an IP address (a host name is not taken: looking it up "
                         "could take longer than ServerTimeout=)") from None
    return f"[{address}]:{int(port)}" if ":" in address else f"{address}:{int(port)}"


def _map_name(text: str) -> str:
    name = text.strip()
    if not name or len(name) > 64 or not set(name) <= _MAP_NAME_CHARACTERS:
        raise ValueError("expected a map name of up to 64 letters, digits, '_', '.' and '-', such as poplock")
    return name


def _server_timeout(text: str) -> float:
    seconds = parse_timespan(text)
    if not 0 < seconds <= 5:
        raise ValueError("must be longer than 0 and at most 5s: every SMTP connection may wait this long")
    return seconds


class Setting:
    """One setting: where it lives, how its value is read, its default and a line of help."""

    __slots__ = ("section", "key", "attribute", "parse", "default", "help")

    def __init__(self, section, key, attribute, parse, default, help):
        self.section = section
        self.key = key
        self.attribute = attribute
        self.parse = parse
        self.default = default
        self.help = help


SETTINGS = (
    Setting("Grants", "Window", "window", _window, "30min",
            "How long a successful POP3/IMAP login lets that client relay (systemd time span)."),
    Setting("Grants", "StaticAllowFile", "static_allow_file", parse_absolute_path,
            "/etc/poplock/static-allowed",
            "Addresses and networks that may always relay, one per line (a missing file is empty)."),
    Setting("Grants", "DenyFile", "deny_file", parse_absolute_path, "/etc/poplock/denied",
            "Addresses, networks and `user NAME` lines that never get a grant, whatever they log in with "
            "(a missing file denies nothing)."),
    Setting("Grants", "MaxSessionLength", "max_session_length", _max_session_length, "12h",
            "A connection the server logs the end of (an IMAP client staying connected) keeps its grant live "
            "while it is open, but for at most this long after its login; then, as after its end, the Window "
            "runs out. 0: sessions hold nothing, a grant lasts the Window after the login."),
    Setting("Grants", "MaxAddressesPerUser", "max_addresses_per_user", _address_count, "10",
            "At most this many addresses may hold live grants opened by one user's logins: a login from one "
            "more grants nothing (a stolen password opens a bounded number of relays); 0 for no limit."),
    Setting("Grants", "IPv6Prefix", "ipv6_prefix", _ipv6_prefix, "128",
            "An IPv6 login grants the client's network of this prefix length (64 for clients with privacy "
            "addresses; 128: the address alone). IPv4 is unaffected."),
    Setting("Store", "Path", "store_path", parse_absolute_path, "/var/lib/poplock/grants.db",
            "The grant store (a gdbm file, replaced whole on every change)."),
    Setting("Store", "ReaderSocket", "reader_socket", _optional_absolute_path, "/run/poplock/reader.sock",
            "Where poplock-reader answers \"read the journal up to now\": a decision that finds no grant asks it "
            "first, so that a login already in the journal is never refused; empty: never ask."),
    Setting("Store", "ReaderWait", "reader_wait", _reader_wait, "50ms",
            "How long a decision waits for that answer; then it decides from the store as it is (0: never ask)."),
    Setting("Store", "BusyTimeout", "busy_timeout", _busy_timeout, "20ms",
            "How long a lookup retries a store that another program holds locked before it refuses the relay."),
    Setting("Reader", "CursorPath", "cursor_path", parse_absolute_path, "/var/lib/poplock/cursor",
            "Where poplock-reader keeps its journal cursor."),
    Setting("Reader", "RecheckInterval", "recheck_interval", _recheck_interval, "0",
            "A fallback only: how often to look for new journal entries besides journald's change "
            "notifications (which arrive up to half a second late) and the decisions' questions on "
            "ReaderSocket=; 0 waits for those alone."),
    Setting("Reader", "UnmatchedWarningAfter", "unmatched_warning_after", _positive_timespan, "5min",
            "Warn when a watched server has logged login-looking lines that no pattern reads for this long."),
    Setting("Reader", "Sources", "sources", parse_list, "dovecot",
            "The login sources to watch, by name: built-in servers or [Source:NAME] sections."),
    Setting("Reader", "Directory", "received_directory", _optional_absolute_path, "",
            "Journals received from POP hosts (where systemd-journal-remote --split-mode=host writes "
            "remote-ADDRESS.journal), read besides this host's journal; only sources with Hosts= read them."),
    Setting("Relaylock", "RelayClient", "relay_client", _relay_client, "",
            "The value relaylock gives RELAYCLIENT for an allowed client (qpsmtpd needs a non-empty one)."),
    Setting("Relaylock", "Server", "relaylock_server", _relaylock_server, "",
            "On a host without the store: the poplock-socketmap relaylock asks instead, as ADDRESS:PORT, "
            "[IPV6-ADDRESS]:PORT or a unix socket path; empty: read the local store."),
    Setting("Relaylock", "ServerMap", "relaylock_server_map", _map_name, "poplock",
            "The map name relaylock asks that server for (one of its [Socketmap] Maps=)."),
    Setting("Relaylock", "ServerTimeout", "relaylock_server_timeout", _server_timeout, "100ms",
            "How long relaylock waits for that server's answer, from connecting to the end of the reply; "
            "then the SMTP server runs without RELAYCLIENT."),
    Setting("Policy", "Action", "policy_action", _policy_action, "OK",
            "What poplock-policy answers Postfix for a client that may relay; others get DUNNO."),
    Setting("Policy", "Header", "policy_header", _header_name, "",
            "A header to prepend to mail a grant lets relay, naming the login behind it (for abuse reports), "
            "when asked with policy_context=poplock-header; empty: none."),
    Setting("Policy", "LogRefused", "policy_log_refused", parse_boolean, "no",
            "Log every DUNNO answer too (Postfix asks for local recipients as well, so this is verbose)."),
    Setting("Policy", "RequestTimeout", "policy_request_timeout", _positive_timespan, "10s",
            "Each request must arrive whole within this, from its first byte; else the connection is closed."),
    Setting("Policy", "IdleTimeout", "policy_idle_timeout", _positive_timespan, "10min",
            "A connection that sends nothing for this long between requests is closed (Postfix closes after 300s)."),
    Setting("Policy", "MaxConnections", "policy_max_connections", _connection_count, "500",
            "At most this many connections at once; a new one beyond them closes the one idle longest."),
    Setting("Policy", "MaxConnectionsPerPeer", "policy_max_connections_per_peer", _connection_count, "300",
            "At most this many from one IP address (unix socket: one user); beyond, that peer's one idle longest "
            "is closed."),
    Setting("Socketmap", "Maps", "socketmap_maps", _socketmap_maps, "poplock:OK",
            "The map names poplock-socketmap answers, each NAME:VALUE: OK VALUE for a client that may relay."),
    Setting("Socketmap", "LogRefused", "socketmap_log_refused", parse_boolean, "no",
            "Log every NOTFOUND answer for an address too (MTAs ask for local recipients as well: verbose)."),
    Setting("Socketmap", "RequestTimeout", "socketmap_request_timeout", _positive_timespan, "10s",
            "Each request must arrive whole within this, from its first byte; else the connection is closed."),
    Setting("Socketmap", "IdleTimeout", "socketmap_idle_timeout", _positive_timespan, "10min",
            "A connection that sends nothing for this long between requests is closed."),
    Setting("Socketmap", "MaxConnections", "socketmap_max_connections", _connection_count, "500",
            "At most this many connections at once; a new one beyond them closes the one idle longest."),
    Setting("Socketmap", "MaxConnectionsPerPeer", "socketmap_max_connections_per_peer", _connection_count, "300",
            "At most this many from one IP address (unix socket: one user); beyond, that peer's one idle longest "
            "is closed."),
)

# [Source:NAME] sections: how poplock finds and trusts one POP3/IMAP server's log entries.
SOURCE_SECTION_PREFIX = "Source:"
SOURCE_KEYS = {
    "Identifiers": "SYSLOG_IDENTIFIER values that select candidate entries (a hint only: anyone can claim one).",
    "Units": "Trusted: the systemd units the server runs as (_SYSTEMD_UNIT, set by journald).",
    "Users": "Trusted when the entry has no _SYSTEMD_UNIT, or the source lists no Units: user names or "
             "uids the server logs as (_UID, from the kernel).",
    "LoginUsers": "Trusted less, for servers that log a login as the mail user (popa3d, mailutils imap4d, "
                  "solid-pop3d after APOP): uids such a line may carry, which confirm a login whose address a "
                  "line trusted by Users gave. List only accounts that cannot run programs of their own.",
    "Pattern": "A regular expression for one successful login, with the named group (?P<address>...) and "
               "optionally (?P<user>...); repeat to add more. Required for a source that is not built in.",
    "Hint": "A regular expression for lines that look like logins, for the warning when none of them match.",
    "Hosts": "The POP hosts, by address, whose journals received in [Reader] Directory= this source reads "
             "(the file a sender's entries land in is named after its address; nothing inside an entry "
             "says who sent it). Without Hosts= a source reads this host's own journal only.",
}

_BY_SECTION: dict[str, dict[str, Setting]] = {}
for _setting in SETTINGS:
    _BY_SECTION.setdefault(_setting.section, {})[_setting.key] = _setting


class Config:
    """The settings in effect (read-only), plus the raw [Source:NAME] assignments."""

    __slots__ = tuple(setting.attribute for setting in SETTINGS) + ("source_sections", "sources_place", "_frozen")

    def __init__(self, values: dict, source_sections: dict, sources_place: str):
        for setting in SETTINGS:
            object.__setattr__(self, setting.attribute, values[setting.attribute])
        object.__setattr__(self, "source_sections", source_sections)
        object.__setattr__(self, "sources_place", sources_place)
        object.__setattr__(self, "_frozen", True)

    def __setattr__(self, name, value):
        raise AttributeError("Config is read-only")


def load_config(path: str | None = None, sections: tuple[str, ...] | None = None) -> Config:
    """Read the configuration, raising ConfigError with every problem found.

    `path` None means the default file, which may be absent. `sections` limits checking
    to the sections one program uses (relaylock); None checks everything, including
    that no section or key is unknown.
    """
    items, problems = read_config_files(path or DEFAULT_PATH, required=path is not None)
    values = {setting.attribute: setting.parse(setting.default) for setting in SETTINGS}
    source_sections: dict[str, list[Assignment]] = {}
    places: dict[str, str] = {}  # attribute -> where it was last set, for problems between settings
    sources_place = "the default"
    for item in items:
        section = item.section
        if section.startswith(SOURCE_SECTION_PREFIX):
            if sections is None:
                source_sections.setdefault(section[len(SOURCE_SECTION_PREFIX):], [])
                if isinstance(item, Assignment):
                    source_sections[section[len(SOURCE_SECTION_PREFIX):]].append(item)
            continue
        known = _BY_SECTION.get(section)
        if known is None:
            if sections is None and not isinstance(item, Assignment):
                suggestion = _suggest(section, _section_names())
                problems.append(f"{item.path}:{item.line}: [{section}]: unknown section{suggestion}")
            continue
        if not isinstance(item, Assignment) or (sections is not None and section not in sections):
            continue
        setting = known.get(item.key)
        if setting is None:
            problems.append(f"{item.place}: [{section}] {item.key}: unknown setting{_suggest(item.key, known)}")
            continue
        try:
            values[setting.attribute] = setting.parse(item.value)
        except ValueError as error:
            problems.append(f"{item.place}: [{section}] {item.key}={item.value}: {error}")
            continue
        places[setting.attribute] = f"{item.place}: [{section}] {item.key}={item.value}"
        if setting.attribute == "sources":
            sources_place = item.place
    if sections is None:
        problems += _check_source_sections(source_sections)
        problems += _check_source_names(values["sources"], source_sections, sources_place)
        problems += _check_distinct_files(values, places)
    if problems:
        raise ConfigError(problems)
    return Config(values, source_sections, sources_place)


def _check_source_sections(source_sections: dict[str, list[Assignment]]) -> list[str]:
    problems = []
    for name, assignments in source_sections.items():
        for item in assignments:
            if item.key not in SOURCE_KEYS:
                suggestion = _suggest(item.key, SOURCE_KEYS)
                problems.append(f"{item.place}: [Source:{name}] {item.key}: unknown setting{suggestion}")
    return problems


def unknown_source_problem(name: str, place: str) -> str:
    from poplock.servers import SERVERS

    return (f"{place}: [Reader] Sources: unknown source {name!r} "
            f"(built in: {', '.join(SERVERS)}; or define it in a [Source:{name}] section)")


def _check_source_names(names, source_sections: dict[str, list[Assignment]], place: str) -> list[str]:
    """Sources= names neither a built-in server nor a [Source:NAME] section: found here, with the
    other problems of the files, rather than only once they are fixed (sources.py builds the rest)."""
    from poplock.servers import SERVERS  # not imported by relaylock, which checks only its own sections

    return [unknown_source_problem(name, place) for name in names if name not in SERVERS
            and name not in source_sections]


# The files poplock writes or reads, by the setting that names them: no two may be the same
# file, or one program's write destroys another's data (a cursor written over the store).
_FILES = (
    ("store_path", ("", ".lock", ".new")),
    ("cursor_path", ("", ".new")),
    ("static_allow_file", ("",)),
    ("deny_file", ("",)),
    ("reader_socket", ("",)),
)


def _check_distinct_files(values: dict, places: dict) -> list[str]:
    import posixpath  # full checks only (the reader and the CLI): relaylock never gets here

    problems = []
    reported = set()  # (attribute, attribute) pairs: one line per colliding pair of settings
    seen: dict[str, tuple[str, str]] = {}  # normalized path -> (attribute, path as configured)
    for attribute, suffixes in _FILES:
        for suffix in suffixes:
            if not values[attribute]:
                continue  # not used
            path = values[attribute] + suffix
            normal = posixpath.normpath(path)
            if normal in seen and seen[normal][0] != attribute and (seen[normal][0], attribute) not in reported:
                other, other_path = seen[normal]
                reported.add((other, attribute))
                where = places.get(attribute) or places.get(other) or f"the default {_key_of(attribute)}"
                problems.append(f"{where}: {path} is also {other_path} ({_key_of(other)}); "
                                "poplock's files must all be different")
            seen.setdefault(normal, (attribute, path))
    return problems


def _key_of(attribute: str) -> str:
    setting = next(setting for setting in SETTINGS if setting.attribute == attribute)
    return f"[{setting.section}] {setting.key}"


def _section_names() -> list[str]:
    return list(_BY_SECTION) + ["Source:NAME"]


def _suggest(word: str, choices) -> str:
    import difflib  # only on the error path: it is costly to import

    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def render_default_config() -> str:
    """The shipped etc/poplock.conf: every setting, commented out at its default."""
    out = [
        "# poplock configuration: see poplock.conf(5).",
        "# Drop-ins in /etc/poplock/poplock.conf.d/*.conf override this file, in lexical order.",
        "# Every setting is shown commented out at its default.",
    ]
    section = None
    for setting in SETTINGS:
        if setting.section != section:
            section = setting.section
            out += ["", f"[{section}]"]
        out += [f"# {setting.help}", f"#{setting.key}={setting.default}"]
    out += [
        "",
        "# Sources: how poplock finds and trusts one server's log entries. A built-in source",
        "# (see poplock.conf(5)) can be adjusted, or a new one defined, in a [Source:NAME] section:",
        "#",
        "# Trust rule: an entry counts only when fields that journald itself sets say it came",
        "# from the server. If the entry carries _SYSTEMD_UNIT and the source lists Units, the",
        "# unit must be one of them; otherwise its _UID must be one of Users. SYSLOG_IDENTIFIER",
        "# only selects candidate entries: any local user can claim one with logger -t dovecot.",
        "#",
        "#[Source:NAME]",
    ]
    for key, help in SOURCE_KEYS.items():
        out += [f"# {help}", f"#{key}="]
    return "\n".join(out) + "\n"
