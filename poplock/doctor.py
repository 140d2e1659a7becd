"""`poplock doctor`: looks at the running system and says, one line per check, what is wrong and what to do.

Each check is a pure function from facts to a Result: doveconf's and postconf's output,
the text of unit files, what a connection attempt got, times read from the journal. The
gather_* functions below them get those facts, each from one place (a program's output, a
socket, the journal through follow.py, the store through store.py), and run_checks puts the
two together. Nothing here changes anything, except that asking poplock-reader to read the
journal up to now (ReaderSocket=) makes it commit what it had not read yet.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from poplock.addresses import parse_allow_list, parse_deny_list
from poplock.config import Config
from poplock.errors import ConfigError, PoplockError
from poplock.logs import iso_time
from poplock.values import format_timespan, parse_timespan

OK = "ok"
WARN = "warn"
FAIL = "FAIL"
SKIP = "skip"

DEFAULT_POSTFIX_CONFIG = "/etc/postfix"
DEFAULT_SERVICE_USER = "poplock"  # User= of poplock-policy.service and poplock-socketmap.service
DEFAULT_RECENT = 86400.0  # a watched server that logged nothing for a day is not logging to the journal
DEFAULT_MAX_BEHIND = 10.0  # seconds an unread journal entry may wait before the reader counts as behind
READER_ANSWER_TIMEOUT = 5.0  # a reader committing a large batch may take a while to answer
CONNECT_TIMEOUT = 2.0
ENTRY_LIMIT = 1_000_000  # journal entries one check reads at most
NO_JOURNAL = "no journal file could be opened (reading the system journal takes root or the systemd-journal group)"
JOURNAL_REMEDY = "run `poplock doctor` as root, or as a member of the systemd-journal group"
UNIT_DIRECTORIES = ("/etc/systemd/system", "/run/systemd/system", "/usr/local/lib/systemd/system",
                    "/lib/systemd/system", "/usr/lib/systemd/system")
SOCKET_UNITS = ("poplock-policy.socket", "poplock-socketmap.socket", "poplock-smtp.socket")

# Postfix restrictions after which nothing later is asked for a client outside the
# destination domains: poplock must come before them.
DECIDING_RESTRICTIONS = frozenset({"reject_unauth_destination", "defer_unauth_destination", "reject", "defer",
                                   "permit", "check_relay_domains"})
REFUSING_RESTRICTIONS = DECIDING_RESTRICTIONS - {"permit"}


@dataclass(frozen=True)
class Result:
    """One check's outcome: OK, WARN, FAIL or SKIP, what was checked, and on trouble what to do."""

    status: str
    what: str
    remedy: str = ""


def format_result(result: Result) -> str:
    """The check's line, and for a warning or failure the remedy on the next, indented."""
    line = f"{result.status:<4}  {result.what}"
    if result.remedy and result.status in (WARN, FAIL):
        line += "\n      " + result.remedy
    return line


def count(number: int, noun: str, plural: str | None = None) -> str:
    """"1 entry", "2 entries"."""
    return f"{number} {noun if number == 1 else plural or noun + 's'}"


def exit_status(results: Iterable[Result]) -> int:
    """0 when no check failed (warnings and skips included), 1 otherwise."""
    return 1 if any(result.status == FAIL for result in results) else 0


# --- the reader -----------------------------------------------------------------------------------

def check_reader_answers(place: str, answered: bool, listening: bool) -> Result:
    """poplock-reader answered "read the journal up to now" on ReaderSocket= (connection.ask_reader)."""
    if answered:
        return Result(OK, f"poplock-reader is running and following: it read the journal up to now when asked "
                          f"on {place}")
    if listening:
        return Result(FAIL, f"poplock-reader does not answer on {place}: it is stuck or stopped",
                      "see `systemctl status poplock-reader` and `journalctl -u poplock-reader`; "
                      "`systemctl restart poplock-reader`")
    return Result(FAIL, f"poplock-reader is not running: nothing listens on {place}",
                  "`systemctl enable --now poplock-reader`; `journalctl -u poplock-reader` says why it stopped")


def check_reader_process(processes: list[int]) -> Result:
    """Without ReaderSocket=: some process runs poplock-reader."""
    if processes:
        return Result(OK, f"poplock-reader is running (pid {', '.join(map(str, processes))})")
    return Result(FAIL, "poplock-reader is not running",
                  "`systemctl enable --now poplock-reader`; `journalctl -u poplock-reader` says why it stopped")


@dataclass(frozen=True)
class Position:
    """Where the store says the reader is, against the journal: `committed` is false when the
    store holds no journal position of this reader's; `found` when the journal still holds the
    entry it names; `unread` entries for the reader come after it, the oldest at `oldest_unread_at`."""

    committed: bool
    found: bool
    unread: int
    oldest_unread_at: float | None


def check_reader_position(position: Position, now: float, max_behind: float) -> Result:
    """The reader's committed position is at the end of what the journal holds for it."""
    if not position.committed:
        if position.unread == 0:
            return Result(OK, "poplock-reader has nothing to read yet (no entry of a watched source in the "
                              "journal, and no position committed)")
        return Result(FAIL, f"poplock-reader has committed no journal position, and "
                            f"{count(position.unread, 'entry', 'entries')} for it wait, the oldest from "
                            f"{iso_time(position.oldest_unread_at)}",
                      "start poplock-reader with this configuration (-c) and this store")
    if not position.found:
        return Result(FAIL, "the journal no longer holds the entry poplock-reader's committed position names "
                            "(rotated or vacuumed away while it was not reading)",
                      "start poplock-reader: it goes on from the next entry and warns about the gap")
    if position.unread == 0:
        return Result(OK, "poplock-reader is not behind: it has read every journal entry for it")
    behind = now - position.oldest_unread_at
    unread = (f"not read {count(position.unread, 'journal entry', 'journal entries')} for it, the oldest from "
              f"{iso_time(position.oldest_unread_at)}, {format_timespan(max(behind, 0))} ago")
    if behind <= max_behind:
        return Result(OK, f"poplock-reader has {unread} (within {format_timespan(max_behind)}: being read)")
    return Result(FAIL, f"poplock-reader is behind: it has {unread}",
                  "logins since are not granted: see `journalctl -u poplock-reader`; `systemctl restart "
                  "poplock-reader`")


# --- the watched sources --------------------------------------------------------------------------

def check_source_exists(name: str, units: tuple[str, ...], units_found: list[str], uids: frozenset[int],
                        unresolved_users: tuple[str, ...]) -> Result:
    """The source's server is installed here: one of its units has a unit file, or one of its users exists."""
    if unresolved_users and not uids:
        return Result(FAIL, f"source {name}: none of its users exists here ({' '.join(unresolved_users)})",
                      f"install the server, or set [Source:{name}] Users= to the user it logs as")
    if units and not units_found:
        if uids:
            return Result(WARN, f"source {name}: none of its units ({' '.join(units)}) has a unit file here; "
                                "its entries are trusted by their _UID alone",
                          f"if the server runs under another unit, set [Source:{name}] Units= to it")
        return Result(FAIL, f"source {name}: none of its units ({' '.join(units)}) has a unit file here",
                      f"install the server, or set [Source:{name}] Units= to the unit it runs as")
    found = " ".join(units_found) if units_found else "users " + " ".join(map(str, sorted(uids)))
    return Result(OK, f"source {name} exists here ({found})")


@dataclass(frozen=True)
class SourceActivity:
    """What the journal holds of one source since a time: entries that claim to be its (by
    identifier or unit), how many of those it trusts, and when the newest trusted one was written."""

    candidates: int
    trusted: int
    newest_trusted_at: float | None


def check_source_logged(name: str, matches: list[str], activity: SourceActivity, since: float) -> Result:
    """The source has logged trusted entries to the journal since `since`."""
    if activity.trusted:
        return Result(OK, f"source {name} logged to the journal {count(activity.trusted, 'time')} since "
                          f"{iso_time(since)}, "
                          f"last at {iso_time(activity.newest_trusted_at)}")
    looked = " or ".join(matches) if matches else "nothing (no identifier or unit)"
    if activity.candidates:
        return Result(FAIL, f"source {name}: {count(activity.candidates, 'journal entry', 'journal entries')} "
                            f"since {iso_time(since)} claim to be its, but none comes from a unit or user it "
                            "trusts, so none would grant",
                      f"compare `journalctl -o verbose {matches[0] if matches else ''}` (_SYSTEMD_UNIT=, _UID=) "
                      f"with [Source:{name}] Units= and Users= (poplock config)")
    return Result(FAIL, f"source {name} has logged nothing to the journal since {iso_time(since)} ({looked})",
                  "is the server running, and logging through syslog or its unit's standard error? "
                  "Logins written to a log file never reach poplock")


# --- Dovecot --------------------------------------------------------------------------------------

def parse_doveconf(text: str) -> dict[str, str]:
    """`doveconf NAME...` output (`name = value` lines) as a dictionary."""
    settings = {}
    for line in text.splitlines():
        name, equals, value = line.partition("=")
        if equals and name.strip() and " " not in name.strip():
            settings[name.strip()] = value.strip()
    return settings


def check_dovecot_logging(settings: dict[str, str], config_file: str) -> Result:
    """Dovecot's login lines (info level) go to syslog or to standard error (the journal under systemd),
    not to a file: `log_path`, and `info_log_path` when set, which takes the logins."""
    log_path = settings.get("log_path", "syslog")
    info_log_path = settings.get("info_log_path", "") or log_path
    for name, value in (("info_log_path", settings.get("info_log_path", "")), ("log_path", log_path)):
        if value not in ("", "syslog", "/dev/stderr"):
            if name == "log_path" and info_log_path in ("syslog", "/dev/stderr"):
                continue  # errors to a file, logins still to the journal
            return Result(FAIL, f"Dovecot writes its logins to the file {value} ({name} in {config_file}), "
                                "so they never reach the journal and nothing is granted",
                          f"set `{name} = syslog` (or remove it: Dovecot then logs to standard error, which "
                          "systemd puts in the journal) and `systemctl reload dovecot`")
    where = "syslog" if info_log_path == "syslog" else "standard error (the journal under systemd)"
    return Result(OK, f"Dovecot logs its logins to {where} ({config_file})")


# --- Postfix --------------------------------------------------------------------------------------

def split_restrictions(text: str) -> list[str]:
    """A Postfix restriction list as its words: commas and white space separate them, and a
    `{ ... }` group (a policy service with its attributes) is one word."""
    words: list[str] = []
    current = ""
    depth = 0
    for character in text:
        if character == "{":
            depth += 1
        elif character == "}":
            depth = max(depth - 1, 0)
        if depth == 0 and (character == "," or character.isspace()):
            if current:
                words.append(current)
            current = ""
            continue
        current += character
    if current:
        words.append(current)
    return words


def lookup_place(word: str) -> str:
    """The service a restriction's argument names: `{ unix:private/poplock, timeout=2s }` and
    `unix:private/poplock` give `unix:private/poplock`, `socketmap:inet:127.0.0.1:9:poplock`
    gives `inet:127.0.0.1:9`; any other table is returned as it is."""
    if word.startswith("{"):
        word = word.strip("{} ").split(",")[0].strip()
    if word.startswith("socketmap:"):
        word = word.removeprefix("socketmap:").rpartition(":")[0]
    return word


def poplock_lookups(words: list[str], places: Iterable[str]) -> list[tuple[int, str]]:
    """(index, place) of each word that asks poplock: a service or table whose name says poplock,
    or one of `places` (where poplock's socket units listen, as Postfix names them)."""
    known = set(places)
    found = []
    for index, word in enumerate(words):
        place = lookup_place(word)
        if index and ("poplock" in place or place in known):
            found.append((index, place))
    return found


def check_relay_restrictions(parameter: str, text: str, places: Iterable[str] = ()) -> Result:
    """Postfix asks poplock in `parameter` after permit_mynetworks and before anything that
    decides for every client (reject_unauth_destination, reject, permit)."""
    words = split_restrictions(text)
    lookups = poplock_lookups(words, places)
    shown = f"{parameter} = {text}" if text else f"{parameter} is empty"
    if not lookups:
        return Result(FAIL, f"Postfix does not ask poplock: {shown}",
                      f"put `check_policy_service {{ unix:private/poplock, timeout=2s, try_limit=1, "
                      f"default_action=DUNNO }}` in {parameter}, after permit_mynetworks and before "
                      "reject_unauth_destination (poplock(8), EXAMPLES)")
    index, place = lookups[0]
    deciding = [(position, word) for position, word in enumerate(words) if word in DECIDING_RESTRICTIONS]
    before = [word for position, word in deciding if position < index]
    if before:
        if before[0] == "permit":
            return Result(FAIL, f"Postfix permits every client before asking poplock ({place}), an open relay: "
                                f"{shown}", f"remove `permit` from {parameter}")
        return Result(FAIL, f"Postfix asks poplock ({place}) only after {before[0]}, which has refused a client "
                            f"without a grant already, so no grant ever lets one relay: {shown}",
                      f"move {words[index - 1]} {words[index]} before {before[0]} in {parameter}")
    if not any(word in REFUSING_RESTRICTIONS for position, word in deciding if position > index):
        return Result(FAIL, f"Postfix asks poplock ({place}), but nothing after it refuses a client poplock "
                            f"does not allow: {shown}",
                      f"end {parameter} with reject_unauth_destination")
    mynetworks = [position for position, word in enumerate(words) if word == "permit_mynetworks"]
    if mynetworks and mynetworks[0] > index:
        return Result(WARN, f"Postfix asks poplock ({place}) before permit_mynetworks: it works, but every "
                            f"local client is looked up too: {shown}",
                      f"move permit_mynetworks before {words[index - 1]} in {parameter}")
    return Result(OK, f"Postfix asks poplock ({place}) in {parameter}, in a working order")


def resolve_place(place: str, queue_directory: str) -> tuple[str, str] | tuple[str, str, int] | None:
    """A service as Postfix names it (`unix:private/poplock`, `inet:127.0.0.1:10040`, a bare
    `private/poplock` or `/path`) as ("unix", path) or ("inet", host, port); None when it is
    neither. Relative unix paths are under Postfix's queue_directory."""
    kind, colon, rest = place.partition(":")
    if not colon:
        kind, rest = "unix", place
    if kind == "unix" and rest:
        return ("unix", rest if rest.startswith("/") else f"{queue_directory.rstrip('/')}/{rest}")
    if kind == "inet":
        host, _, port = rest.rpartition(":")
        if port.isdigit():
            return ("inet", host.strip("[]") or "127.0.0.1", int(port))
    return None


# --- socket units ---------------------------------------------------------------------------------

def listen_streams(texts: Iterable[str]) -> list[str]:
    """The ListenStream= values of a socket unit, given its file's text then its drop-ins' in
    order: an empty assignment resets the list, as systemd does."""
    values: list[str] = []
    for text in texts:
        section = None
        for line in text.splitlines():
            line = line.strip()
            if not line or line[0] in "#;":
                continue
            if line.startswith("["):
                section = line.strip("[]")
                continue
            key, equals, value = line.partition("=")
            if equals and section == "Socket" and key.strip() == "ListenStream":
                if value.strip():
                    values.append(value.strip())
                else:
                    values.clear()
    return values


def listen_place(value: str) -> tuple[str, str] | tuple[str, str, int] | None:
    """A ListenStream= value as ("unix", path) or ("inet", host, port); None for an abstract socket."""
    if value.startswith("/"):
        return ("unix", value)
    if value.startswith("@"):
        return None
    host, _, port = value.rpartition(":")
    if not port.isdigit():
        return None
    host = host.strip("[]")
    return ("inet", "127.0.0.1" if host in ("", "0.0.0.0") else "::1" if host == "::" else host, int(port))


def postfix_name(place: tuple) -> str:
    """How Postfix names a place in main.cf (inet:HOST:PORT, unix:PATH)."""
    if place[0] == "inet":
        host = f"[{place[1]}]" if ":" in place[1] else place[1]
        return f"inet:{host}:{place[2]}"
    return f"unix:{place[1]}"


def describe_place(place: tuple) -> str:
    return place[1] if place[0] == "unix" else f"{place[1]}:{place[2]}"


def check_listening(what: str, place: tuple, error: str | None) -> Result:
    """`error` is None when a connection to the place was accepted."""
    where = describe_place(place)
    if error is None:
        return Result(OK, f"{what} listens on {where}")
    return Result(FAIL, f"{what} does not listen on {where}: {error}",
                  f"`systemctl enable --now {what}`" if what.endswith(".socket") else
                  "start the service that answers there (for poplock-policy: `systemctl enable --now "
                  "poplock-policy.socket`)")


# --- the store and the lists ----------------------------------------------------------------------

NO_USER = "no-user"  # store_problem_as's kinds of problem
NO_STORE = "no-store"
UNKNOWN = "unknown"
UNREADABLE = "unreadable"


def check_store_readable(path: str, user: str, problem: tuple[str, str] | None) -> Result:
    """`problem` is None when `user` could open the store (its top and base) for reading, else
    (kind, why): NO_USER, NO_STORE, UNKNOWN (it could not be tried) or UNREADABLE."""
    if problem is None:
        return Result(OK, f"the store {path} is readable by {user}")
    kind, why = problem
    if kind == NO_USER:
        return Result(FAIL, f"there is no user {user} to run the decision services as",
                      "`systemd-sysusers` creates poplock's from sysusers.d/poplock.conf; --user NAME checks "
                      "another")
    if kind == NO_STORE:
        return Result(FAIL, f"there is no store at {path}, so no client may relay by a grant",
                      "poplock-reader creates it when it starts: start it with this configuration")
    if kind == UNKNOWN:
        return Result(WARN, f"cannot tell whether {user} may read the store {path}: {why}",
                      f"run `poplock doctor` as root or as {user}")
    return Result(FAIL, f"the store {path} is not readable by {user}, so the decision services refuse every "
                        f"client: {why}",
                  f"let {user} read it: the store's directory is poplock:poplock 0750 (tmpfiles.d/poplock.conf); "
                  "`systemd-tmpfiles --create`, or give the directory g+rx and its files g+r for poplock's group")


def check_allow_list(path: str, text: str | None, error: str | None) -> Result:
    """The static allow list parses and lets no network too wide relay (addresses.too_wide)."""
    if error is not None:
        return Result(FAIL, f"the static allow list {path} cannot be read: {error}",
                      "make it readable by the poplock group, or remove it")
    if text is None:
        return Result(OK, f"the static allow list {path} does not exist: only grants let a client relay")
    try:
        networks = parse_allow_list(text, path)
    except ConfigError as problems:
        return Result(FAIL, "the static allow list is not sane, so relaylock and the decision services refuse "
                            f"to use it: {'; '.join(problems.problems)}",
                      f"fix or remove those lines in {path}")
    return Result(OK, f"the static allow list {path} is sane: {count(len(networks), 'entry', 'entries')}, "
                      "none too wide")


def check_deny_list(path: str, text: str | None, error: str | None) -> Result:
    if error is not None:
        return Result(FAIL, f"the deny list {path} cannot be read: {error}",
                      "make it readable by the poplock group, or remove it")
    if text is None:
        return Result(OK, f"the deny list {path} does not exist: it denies nothing")
    try:
        parse_deny_list(text, path)
    except ConfigError as problems:
        return Result(FAIL, "the deny list is not sane, so every login is refused a grant: "
                            f"{'; '.join(problems.problems)}", f"fix those lines in {path}")
    return Result(OK, f"the deny list {path} is sane")


# --- gathering facts ------------------------------------------------------------------------------

def run_program(argv: list[str]) -> tuple[int, str, str]:
    """(exit status, standard output, standard error); 127 when the program is not there."""
    import shutil
    import subprocess

    if shutil.which(argv[0]) is None:
        return 127, "", f"{argv[0]}: not found"
    try:
        completed = subprocess.run(argv, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as error:
        return 126, "", str(error)
    return completed.returncode, completed.stdout, completed.stderr


def connect(place: tuple) -> str | None:
    """None when a stream connection to the place is accepted, else why not."""
    import socket

    if place[0] == "unix":
        if not os.path.exists(place[1]):
            return "no such socket"
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        address: object = place[1]
    else:
        family = socket.AF_INET6 if ":" in place[1] else socket.AF_INET
        probe = socket.socket(family, socket.SOCK_STREAM)
        address = (place[1], place[2])
    try:
        probe.settimeout(CONNECT_TIMEOUT)
        probe.connect(address)
        return None
    except OSError as error:
        return error.strerror or str(error)
    finally:
        probe.close()


def reader_processes() -> list[int]:
    """The pids of processes running poplock-reader (from /proc: works without systemd)."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as file:
                words = file.read().split(b"\0")[:2]
        except OSError:
            continue
        if any(os.path.basename(word) == b"poplock-reader" for word in words):
            found.append(int(name))
    return sorted(found)


def gather_position(config: Config, sources, now: float) -> Position:
    """The reader's committed position from the store, and what its journals hold after it."""
    from poplock.follow import Position as Seek
    from poplock.reader import open_journals
    from poplock.store import lookup_metadata

    cursor = lookup_metadata(config.store_path, "cursor:" + config.cursor_path, config.busy_timeout)
    follower = open_journals(config, sources)  # with [Reader] Directory=, the received journals too
    try:
        if not follower.readable():
            raise OSError(NO_JOURNAL)
        seek = follower.seek(cursor, now - config.window)
        unread = 0
        oldest = None
        for entry in follower.read(ENTRY_LIMIT):
            if oldest is None:
                oldest = int(entry["__REALTIME_TIMESTAMP"]) / 1e6
            unread += 1
    finally:
        follower.close()
    return Position(committed=cursor is not None, found=seek in (Seek.RESUMED,), unread=unread,
                    oldest_unread_at=oldest)


def gather_activity(source, since: float) -> SourceActivity:
    """How many entries claim to be the source's since `since`, how many it trusts, the newest trusted."""
    from poplock.follow import JournalFollower

    matches = source.journal_matches()
    if not matches:
        return SourceActivity(0, 0, None)
    follower = JournalFollower(matches)
    candidates = trusted = 0
    newest = None
    try:
        if not follower.readable():
            raise OSError(NO_JOURNAL)
        follower.seek(None, since)
        for entry in follower.read(ENTRY_LIMIT):
            candidates += 1
            if source.admits(entry):
                trusted += 1
                newest = int(entry["__REALTIME_TIMESTAMP"]) / 1e6
    finally:
        follower.close()
    return SourceActivity(candidates, trusted, newest)


def unit_file_paths(name: str, directories: Iterable[str]) -> list[str]:
    """The unit file and then its drop-ins (NAME.d/*.conf, by file name, the first directory winning)."""
    main = next((f"{directory}/{name}" for directory in directories if os.path.isfile(f"{directory}/{name}")), None)
    if main is None:
        return []
    drop_ins: dict[str, str] = {}
    for directory in directories:
        try:
            names = os.listdir(f"{directory}/{name}.d")
        except OSError:
            continue
        for file_name in names:
            if file_name.endswith(".conf"):
                drop_ins.setdefault(file_name, f"{directory}/{name}.d/{file_name}")
    return [main] + [drop_ins[file_name] for file_name in sorted(drop_ins)]


def unit_files_exist(unit: str, directories: Iterable[str]) -> bool:
    """A unit file for `unit`, which may be a glob such as `dovecot@*.service` (a Units= value)."""
    import fnmatch

    if not any(character in unit for character in "*?["):
        return bool(unit_file_paths(unit, directories))
    for directory in directories:
        try:
            if any(fnmatch.fnmatchcase(name, unit) or fnmatch.fnmatchcase(name.replace("@.", "@x."), unit)
                   for name in os.listdir(directory)):
                return True
        except OSError:
            continue
    return False


def unit_enabled(name: str, directories: Iterable[str]) -> bool:
    """A link to the unit in some *.wants/ or *.requires/ directory (what `systemctl enable` makes)."""
    for directory in directories:
        try:
            entries = os.listdir(directory)
        except OSError:
            continue
        for entry in entries:
            if entry.endswith((".wants", ".requires")) and os.path.lexists(f"{directory}/{entry}/{name}"):
                return True
    return False


def read_optional(path: str) -> tuple[str | None, str | None]:
    """(text, None); (None, None) when the file does not exist; (None, why) when it cannot be read."""
    try:
        with open(path, encoding="utf-8") as file:
            return file.read(), None
    except FileNotFoundError:
        return None, None
    except (OSError, UnicodeDecodeError) as error:
        return None, getattr(error, "strerror", None) or str(error)


def store_problem_as(path: str, user: str, busy_timeout: float) -> tuple[str, str] | None:
    """Why `user` cannot read the store (its top, and its base if it has one), or None when it can.

    As root, a child process takes on the user's ids and opens the store as the decision
    services do; as anyone else only one's own access can be tried."""
    import grp
    import pwd

    try:
        account = pwd.getpwnam(user)
    except KeyError:
        return NO_USER, f"there is no user {user}"
    if not os.path.exists(path):
        return NO_STORE, f"{path} does not exist"
    if os.geteuid() != 0 and os.geteuid() != account.pw_uid:
        return UNKNOWN, f"only root or {user} can try"
    reading, writing = os.pipe()
    child = os.fork()
    if child == 0:  # the child: drop to the user, open, report on the pipe
        status = 1
        try:
            os.close(reading)
            if os.geteuid() == 0:
                groups = [group.gr_gid for group in grp.getgrall() if user in group.gr_mem]
                os.setgroups(sorted({account.pw_gid, *groups}))
                os.setgid(account.pw_gid)
                os.setuid(account.pw_uid)
            os.write(writing, (_open_store(path, busy_timeout) or "").encode())
            status = 0
        finally:
            os._exit(status)
    os.close(writing)
    with os.fdopen(reading, "rb") as pipe:
        answer = pipe.read().decode("utf-8", "replace")
    _, status = os.waitpid(child, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        return UNKNOWN, f"a process as {user} could not be started"
    return (UNREADABLE, answer) if answer else None


def _open_store(path: str, busy_timeout: float) -> str | None:
    from poplock.store import open_snapshot

    try:
        snapshot = open_snapshot(path, busy_timeout)
        if snapshot is None:
            return "it does not exist"
        try:
            snapshot.base()
        finally:
            snapshot.close()
    except PoplockError as error:
        return str(error)
    return None


# --- all together ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Places:
    """Where the things doctor looks at are (the command's options)."""

    postfix_config: str | None = None  # None: /etc/postfix, and Postfix is skipped when it has no main.cf
    dovecot_config: str | None = None  # None: doveconf's own default
    unit_directories: tuple[str, ...] = UNIT_DIRECTORIES
    service_users: tuple[str, ...] = (DEFAULT_SERVICE_USER,)
    recent: float = DEFAULT_RECENT
    max_behind: float = DEFAULT_MAX_BEHIND


def run_checks(config: Config, places: Places, clock: Callable[[], float] = time.time) -> Iterable[Result]:
    """Every check, in order, each Result as soon as it is known."""
    from poplock.connection import ask_reader
    from poplock.sources import build_sources

    all_sources = build_sources(config)
    sources = [all_sources[name] for name in config.sources]

    if config.reader_socket and config.reader_wait:  # else the reader does not listen (reader.py)
        answered = ask_reader(config.reader_socket, READER_ANSWER_TIMEOUT)
        listening = answered or connect(("unix", config.reader_socket)) is None
        yield check_reader_answers(config.reader_socket, answered, listening)
    else:
        yield check_reader_process(reader_processes())
    try:
        yield check_reader_position(gather_position(config, sources, clock()), clock(), places.max_behind)
    except PoplockError as error:  # the store
        yield Result(FAIL, f"cannot read poplock-reader's position from the store: {error}",
                     error.hint or "run `poplock doctor` as root; a damaged store is rebuilt by `poplock rebuild`")
    except (OSError, ValueError) as error:  # the journal
        yield Result(FAIL, f"cannot tell where poplock-reader is: {error}", JOURNAL_REMEDY)

    since = clock() - places.recent
    for source in sources:
        if getattr(source, "hosts", None):
            yield Result(SKIP, f"source {source.name} logs on other hosts ({' '.join(sorted(source.hosts))}): "
                               "only this host's journal is checked")
            continue
        units_found = [unit for unit in source.units if unit_files_exist(unit, places.unit_directories)]
        yield check_source_exists(source.name, source.units, units_found, source.uids, source.unresolved_users)
        try:
            activity = gather_activity(source, since)
        except (OSError, ValueError) as error:
            yield Result(FAIL, f"source {source.name}: cannot read the journal: {error}", JOURNAL_REMEDY)
        else:
            yield check_source_logged(source.name, source.journal_matches(), activity, since)

    if "dovecot" in config.sources:
        yield from _dovecot_checks(places)
    for name in ("courier", "cyrus"):
        if name in config.sources:
            yield Result(SKIP, f"{name.capitalize()} always logs through syslog: nothing to check beyond its "
                               "entries in the journal")

    socket_places = []
    for name in SOCKET_UNITS:
        paths = unit_file_paths(name, places.unit_directories)
        if not paths or not unit_enabled(name, places.unit_directories):
            continue
        texts = [read_optional(path)[0] or "" for path in paths]
        for value in listen_streams(texts):
            place = listen_place(value)
            if place is not None:
                socket_places.append(place)
                yield check_listening(name, place, connect(place))
    yield from _postfix_checks(places, [postfix_name(place) for place in socket_places])

    for user in places.service_users:
        yield check_store_readable(config.store_path, user, store_problem_as(config.store_path, user,
                                                                            max(config.busy_timeout, 1.0)))
    yield check_allow_list(config.static_allow_file, *read_optional(config.static_allow_file))
    yield check_deny_list(config.deny_file, *read_optional(config.deny_file))


def _dovecot_checks(places: Places) -> Iterable[Result]:
    argv = ["doveconf"] + (["-c", places.dovecot_config] if places.dovecot_config else []) + [
        "log_path", "info_log_path"]
    status, output, errors = run_program(argv)
    config_file = places.dovecot_config or "doveconf's default configuration"
    if status == 127 and places.dovecot_config is None:
        yield Result(SKIP, "Dovecot's logging: doveconf is not installed here")
    elif status != 0:
        yield Result(FAIL, f"Dovecot's logging: `{' '.join(argv)}` failed: "
                           f"{(errors.strip().splitlines() or ['exit status ' + str(status)])[-1]}",
                     "give the configuration Dovecot runs with: --dovecot-config FILE")
    else:
        yield check_dovecot_logging(parse_doveconf(output), config_file)


def _postfix_checks(places: Places, socket_places: list[str]) -> Iterable[Result]:
    directory = places.postfix_config or DEFAULT_POSTFIX_CONFIG
    if places.postfix_config is None and not os.path.exists(f"{directory}/main.cf"):
        yield Result(SKIP, f"Postfix: there is no {directory}/main.cf (--postfix-config DIR gives another)")
        return
    argv = ["postconf", "-c", directory, "-x", "smtpd_relay_restrictions", "smtpd_recipient_restrictions",
            "queue_directory"]
    status, output, errors = run_program(argv)
    if status != 0:
        yield Result(FAIL, f"Postfix: `{' '.join(argv)}` failed: "
                           f"{(errors.strip().splitlines() or ['exit status ' + str(status)])[-1]}",
                     "give the directory of Postfix's main.cf: --postfix-config DIR")
        return
    settings = parse_doveconf(output)  # postconf prints the same `name = value` lines
    parameter = "smtpd_relay_restrictions"
    if not settings.get(parameter) and settings.get("smtpd_recipient_restrictions"):
        parameter = "smtpd_recipient_restrictions"  # Postfix before 2.10, or a configuration written for it
    text = settings.get(parameter, "")
    result = check_relay_restrictions(parameter, text, socket_places)
    yield result
    queue_directory = settings.get("queue_directory", "/var/spool/postfix")
    for _, place in poplock_lookups(split_restrictions(text), socket_places):
        resolved = resolve_place(place, queue_directory)
        if resolved is not None:
            yield check_listening(f"the poplock service Postfix asks ({place})", resolved, connect(resolved))


# --- the command ----------------------------------------------------------------------------------

def command_doctor(config: Config, arguments) -> int:
    """`poplock doctor`: every check's line on standard output; 0 when none failed, 1 otherwise."""
    places = Places(postfix_config=arguments.postfix_config, dovecot_config=arguments.dovecot_config,
                    unit_directories=tuple(arguments.unit_directory or UNIT_DIRECTORIES),
                    service_users=tuple(arguments.user or (DEFAULT_SERVICE_USER,)),
                    recent=arguments.recent, max_behind=arguments.max_behind)
    results = []
    for result in run_checks(config, places):
        results.append(result)
        print(format_result(result), flush=True)
    return exit_status(results)


def _timespan(text: str) -> float:
    import argparse

    try:
        return parse_timespan(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_doctor_command(commands, common) -> None:
    """Register `poplock doctor` among the CLI's subcommands."""
    doctor = commands.add_parser("doctor", parents=[common],
                                 help="check the running system, one line per check; exit 1 if one fails")
    doctor.add_argument("--postfix-config", metavar="DIR",
                        help=f"Postfix's configuration directory (default {DEFAULT_POSTFIX_CONFIG}; skipped when "
                             "it has no main.cf)")
    doctor.add_argument("--dovecot-config", metavar="FILE",
                        help="Dovecot's configuration file (default: doveconf's, /etc/dovecot/dovecot.conf)")
    doctor.add_argument("--unit-directory", action="append", metavar="DIR",
                        help="look for systemd units here instead of systemd's unit directories (repeatable)")
    doctor.add_argument("--user", action="append", metavar="NAME",
                        help=f"the user the decision services run as (default {DEFAULT_SERVICE_USER}; repeatable)")
    doctor.add_argument("--recent", type=_timespan, default=DEFAULT_RECENT, metavar="SPAN",
                        help="a watched source must have logged within this span (default 1d)")
    doctor.add_argument("--max-behind", type=_timespan, default=DEFAULT_MAX_BEHIND, metavar="SPAN",
                        help="how long an entry may wait unread before the reader counts as behind (default 10s)")
    doctor.set_defaults(run=command_doctor)
