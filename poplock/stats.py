"""`poplock stats`: live grants now, and logins and relay decisions over a period, from the journal.

What each number counts, exactly (poplock(8), STATISTICS, says the same):

  * grants: the store's grants now, live or expired and not yet purged (store.iterate_store,
    streamed: a store of a million grants is counted without holding them).
  * logins: poplock-reader's entries (events.py) over the period. granted: LOGIN_GRANTED,
    a new grant; extended: GRANT_EXTENDED; a login that a rebuild of the store reads again
    logs the same address and expiry again, and is counted once. denied: LOGIN_DENIED (the
    deny list); over_limit: LOGIN_OVER_LIMIT, which the reader logs at most once per account
    per window, so it counts accounts that hit [Grants] MaxAddressesPerUser= more than the
    logins refused; too_old: LOGIN_TOO_OLD, logins read after their window had passed. A
    refusal that a rebuild reads again counts again: nothing in its entry tells it apart.
    Only entries sent natively (_TRANSPORT=journal) by root or the store directory's owner
    count, as for administrative changes (changes.py): any local user can send an entry
    with these MESSAGE_IDs.
  * relays: RELAY_ALLOWED and RELAY_REFUSED entries of relaylock, poplock-policy and
    poplock-socketmap, by program. relaylock decides once per SMTP connection and logs
    every decision; poplock-policy once per question Postfix asks (one per recipient, as
    check_policy_service runs in smtpd_relay_restrictions), poplock-socketmap once per
    lookup of an address. Both log every relay allowed, but a refusal only with [Policy]
    or [Socketmap] LogRefused=yes (every inbound connection is one): without it their
    refusals are not counted, and are shown as not logged. Relay entries are taken from
    whoever sent them (relaylock runs as the SMTP server's user), so a local user could
    add to them. Decisions that could not be made (store-busy, store-failed) are not
    counted: they are logged at most once a minute.

The counting (Tally, count_grants) and the formats are pure; command_stats does the I/O.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import tempfile
from collections.abc import Iterable, Mapping

from poplock import events

# The label each counted event gets: logins by result, relays by decision.
LOGIN_RESULTS = {
    events.LOGIN_GRANTED.message_id: "granted",
    events.GRANT_EXTENDED.message_id: "extended",
    events.LOGIN_DENIED.message_id: "denied",
    events.LOGIN_OVER_LIMIT.message_id: "over_limit",
    events.LOGIN_TOO_OLD.message_id: "too_old",
}
RELAY_DECISIONS = {
    events.RELAY_ALLOWED.message_id: "allowed",
    events.RELAY_REFUSED.message_id: "refused",
}
MESSAGE_IDS = tuple(LOGIN_RESULTS) + tuple(RELAY_DECISIONS)

# The programs that decide relays, by the SYSLOG_IDENTIFIER they log under.
DECISION_PROGRAMS = ("relaylock", "poplock-policy", "poplock-socketmap")
# The programs whose refusals reach the journal only with a LogRefused= setting: program -> config attribute.
REFUSALS_LOGGED_BY = {"poplock-policy": "policy_log_refused", "poplock-socketmap": "socketmap_log_refused"}

# How often (entries) the logins remembered for spotting a rebuild's repeats are pruned.
_PRUNE_EVERY = 10000

DEFAULT_PERIOD = 86400.0  # --since: a day back


class GrantCounts:
    """The store's grants now: live, and expired but not yet purged."""

    __slots__ = ("live", "expired")

    def __init__(self, live: int = 0, expired: int = 0):
        self.live = live
        self.expired = expired


def count_grants(entries: Iterable[tuple], now: float) -> GrantCounts:
    """Count the grants among store.iterate_store()'s (kind, key, value) entries, one at a time."""
    counts = GrantCounts()
    for kind, _, value in entries:
        if kind != "grant":
            continue
        if value.is_live(now):
            counts.live += 1
        else:
            counts.expired += 1
    return counts


def parse_expires(text: str | None) -> float | None:
    """POPLOCK_EXPIRES (ISO 8601 with an offset, as logs.iso_time writes it) in seconds, None if unreadable."""
    if not text:
        return None
    try:
        return datetime.datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


class Tally:
    """Counts journal entries (mappings of field name to text) into logins and relays.

    `since` and `until` bound the period (seconds, `until` excluded); `trusted_uids` are the
    users whose login entries count (storewriter.store_writers: root and the store's owner).
    """

    def __init__(self, since: float, until: float, trusted_uids: frozenset[int]):
        self.since = since
        self.until = until
        self.trusted_uids = frozenset(str(uid) for uid in trusted_uids)
        self.logins = dict.fromkeys(LOGIN_RESULTS.values(), 0)
        self.relays = {(program, decision): 0 for program in DECISION_PROGRAMS for decision in ("allowed", "refused")}
        self._granted: dict[tuple[str, str], float] = {}  # (address, expires) of grant entries -> expiry
        self._seen = 0

    def add(self, entry: Mapping[str, str]) -> None:
        """Count one entry, if it is one of those counted and in the period."""
        message_id = entry.get("MESSAGE_ID")
        result = LOGIN_RESULTS.get(message_id)
        decision = RELAY_DECISIONS.get(message_id) if result is None else None
        if result is None and decision is None:
            return
        microseconds = entry.get("__REALTIME_TIMESTAMP")
        if microseconds is None or not microseconds.isdigit():
            return
        at = int(microseconds) / 1e6
        if not self.since <= at < self.until:
            return
        if decision is not None:
            program = entry.get("SYSLOG_IDENTIFIER")
            if program in DECISION_PROGRAMS:
                self.relays[program, decision] += 1
            return
        if entry.get("_TRANSPORT") != "journal" or entry.get("_UID") not in self.trusted_uids:
            return
        if result in ("granted", "extended") and self._read_before(entry, at):
            return
        self.logins[result] += 1

    def _read_before(self, entry: Mapping[str, str], at: float) -> bool:
        """This grant entry repeats one already counted: a rebuild of the store read its login again.

        The reader never logs the same address and expiry twice otherwise (a login that
        changes nothing is not an event). A rebuild reads logins whose grants are still
        live, so an entry is remembered only until its grant expires.
        """
        expires_text = entry.get("POPLOCK_EXPIRES")
        key = (entry.get("POPLOCK_CLIENT_ADDRESS") or "", expires_text or "")
        if key in self._granted:
            return True
        expires = parse_expires(expires_text)
        if expires is None:
            return False  # nothing to tell it by: counted every time
        self._granted[key] = expires
        self._seen += 1
        if self._seen % _PRUNE_EVERY == 0:
            self._granted = {key: when for key, when in self._granted.items() if when > at}
        return False


class Statistics:
    """What `poplock stats` reports: the period, the grants now, the counts, and which refusals are logged."""

    __slots__ = ("since", "until", "grants", "logins", "relays", "refusals_logged")

    def __init__(self, since: float, until: float, grants: GrantCounts, tally: Tally,
                 refusals_logged: Mapping[str, bool]):
        self.since = since
        self.until = until
        self.grants = grants
        self.logins = dict(tally.logins)
        self.relays = dict(tally.relays)
        self.refusals_logged = {program: refusals_logged.get(program, True) for program in DECISION_PROGRAMS}

    def relays_by_program(self, decision: str) -> dict[str, int | None]:
        """Each program's count of `decision`; None for refusals the program does not log."""
        return {program: None if decision == "refused" and not self.refusals_logged[program]
                else self.relays[program, decision] for program in DECISION_PROGRAMS}


def refusals_logged(config) -> dict[str, bool]:
    """Which decision programs log their refusals, by the configuration."""
    logged = {program: bool(getattr(config, attribute)) for program, attribute in REFUSALS_LOGGED_BY.items()}
    logged["relaylock"] = True
    return logged


# --- formats -----------------------------------------------------------------------------------------

def format_text(statistics: Statistics, time_text) -> str:
    """Aligned lines: what, how many, and what it is made of. `time_text` writes a time (logs.iso_time)."""
    logins = statistics.logins
    refused_logins = logins["denied"] + logins["over_limit"] + logins["too_old"]

    def programs(decision: str) -> tuple[int, str]:
        counts = statistics.relays_by_program(decision)
        total = sum(count for count in counts.values() if count is not None)
        parts = []
        for program, count in counts.items():
            if count is None:
                section = REFUSALS_LOGGED_BY[program].split("_")[0].capitalize()
                parts.append(f"{program} not logged ([{section}] LogRefused=no)")
            else:
                parts.append(f"{program} {count}")
        return total, ", ".join(parts)

    allowed, allowed_parts = programs("allowed")
    refused, refused_parts = programs("refused")
    rows = [
        ("period", f"{time_text(statistics.since)} to {time_text(statistics.until)}", ""),
        ("live grants", str(statistics.grants.live), ""),
        ("expired grants", str(statistics.grants.expired), "not yet purged"),
        ("logins granted", str(logins["granted"] + logins["extended"]),
         f"{logins['granted']} new, {logins['extended']} extended"),
        ("logins refused", str(refused_logins),
         f"{logins['denied']} by the deny list, {logins['over_limit']} over an account's limit, "
         f"{logins['too_old']} read after their window"),
        ("relays allowed", str(allowed), allowed_parts),
        ("relays refused", str(refused), refused_parts),
    ]
    label_width = max(len(label) for label, _, _ in rows)
    number_width = max(len(number) for label, number, _ in rows if label != "period")
    lines = []
    for label, number, detail in rows:
        if label == "period":
            lines.append(f"{label.ljust(label_width)}  {number}")
        else:
            lines.append(f"{label.ljust(label_width)}  {number.rjust(number_width)}  {detail}".rstrip())
    return "\n".join(lines) + "\n"


def format_json(statistics: Statistics, time_text) -> str:
    """One JSON object; a count a program does not log is null."""
    record = {
        "since": time_text(statistics.since), "until": time_text(statistics.until),
        "grants": {"live": statistics.grants.live, "expired": statistics.grants.expired},
        "logins": dict(statistics.logins),
        "relays": {decision: statistics.relays_by_program(decision) for decision in ("allowed", "refused")},
    }
    return json.dumps(record) + "\n"


# name, type, help; the samples follow in format_prometheus.
METRICS = (
    ("poplock_grants", "gauge", "Grants in the store now, by state: live, or expired and not yet purged."),
    ("poplock_period_seconds", "gauge", "How long the period is that the poplock_period_* counts cover."),
    ("poplock_period_end_timestamp_seconds", "gauge", "When the period of the poplock_period_* counts ends."),
    ("poplock_period_logins", "gauge",
     "Logins poplock-reader read in the period, by result: granted, extended, denied (deny list), "
     "over_limit (accounts over MaxAddressesPerUser=, once per window), too_old (read after their window)."),
    ("poplock_period_relays", "gauge",
     "Relay decisions logged in the period, by program and decision; refusals of poplock-policy and "
     "poplock-socketmap only with their LogRefused=yes."),
)


def _labels(**labels: str) -> str:
    """{name="value",...}; the values are poplock's own words, which need no escaping."""
    return "{" + ",".join(f'{name}="{value}"' for name, value in labels.items()) + "}"


def format_prometheus(statistics: Statistics) -> str:
    """The text exposition format node_exporter's textfile collector reads: HELP and TYPE, then samples.

    The period counts are gauges, not counters: they cover a moving period and go down as
    it moves. A program's refusals that it does not log are left out rather than given as 0.
    """
    samples = {
        "poplock_grants": [(_labels(state="live"), statistics.grants.live),
                           (_labels(state="expired"), statistics.grants.expired)],
        "poplock_period_seconds": [("", _number(statistics.until - statistics.since))],
        "poplock_period_end_timestamp_seconds": [("", _number(statistics.until))],
        "poplock_period_logins": [(_labels(result=result), count) for result, count in statistics.logins.items()],
        "poplock_period_relays": [
            (_labels(program=program, decision=decision), count)
            for decision in ("allowed", "refused")
            for program, count in statistics.relays_by_program(decision).items() if count is not None],
    }
    lines = []
    for name, kind, help_text in METRICS:
        lines.append(f"# HELP {name} {help_text}")
        lines.append(f"# TYPE {name} {kind}")
        lines.extend(f"{name}{labels} {value}" for labels, value in samples[name])
    return "\n".join(lines) + "\n"


def _number(seconds: float) -> str:
    """Seconds as Prometheus reads them, to the millisecond: whole when whole."""
    rounded = round(float(seconds), 3)
    return str(int(rounded)) if rounded.is_integer() else f"{rounded:.3f}"


# --- I/O ---------------------------------------------------------------------------------------------

def write_atomically(path: str, text: str) -> None:
    """Write `path` whole or not at all: a temporary file in the same directory, renamed over it.

    node_exporter's textfile collector may read the directory at any moment, and reads only
    names that end in .prom: the temporary file's name ends in .tmp. Readable by all (0644),
    as node_exporter runs as a user of its own.
    """
    directory, name = os.path.split(os.path.abspath(path))
    descriptor, temporary = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fchmod(file.fileno(), 0o644)
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise


def _reads_whole_system_journal() -> bool:
    """Whether this user sees every entry of the system journal (root, systemd-journal, adm, wheel),
    not only its own, as journalctl tells it."""
    if os.geteuid() == 0:
        return True
    import grp

    groups = set(os.getgroups())
    for name in ("systemd-journal", "adm", "wheel"):
        try:
            if grp.getgrnam(name).gr_gid in groups:
                return True
        except KeyError:
            continue
    return False


def read_journal(tally: Tally, *, directory: str | None, files: list[str] | None) -> None:
    """Feed every entry of the period with a counted MESSAGE_ID to `tally`.

    JournalError when no journal file can be opened, or when only the user's own entries
    of the system journal can be: counts made from what cannot be read would be zeros.
    """
    from poplock.errors import JournalError
    from poplock.follow import JournalFollower

    try:
        follower = JournalFollower([f"MESSAGE_ID={message_id}" for message_id in MESSAGE_IDS],
                                   directory=directory, files=files)
    except (OSError, ValueError) as error:
        named = directory or " ".join(files or [])
        raise JournalError(f"cannot open the journal{' ' + named if named else ''}: {error}") from None
    try:
        if not follower.readable():
            named = directory or " ".join(files or [])
            error = JournalError(f"cannot read {named or 'the system journal'}: no journal file could be opened")
            error.hint = ("run it as root or as a member of the systemd-journal or adm group" if not named else
                          "name journal files (*.journal) this user may read, or a directory that holds them")
            raise error
        if directory is None and files is None and not _reads_whole_system_journal():
            error = JournalError("cannot read the system journal: only this user's own entries can be read")
            error.hint = "run it as root or as a member of the systemd-journal or adm group"
            raise error
        follower.seek(None, tally.since)
        while True:
            count = 0
            for entry in follower.read(10000):
                count += 1
                try:
                    tally.add(entry)
                except OSError as error:  # a corrupt entry: say so, and go on
                    print(f"poplock: warning: skipping an unreadable journal entry: {error}", file=sys.stderr)
            if count == 0:
                break
    finally:
        follower.close()


def command_stats(config, arguments) -> int:
    """`poplock stats`: see the module's docstring and poplock(8)."""
    import time

    from poplock.cli import parse_since
    from poplock.logs import iso_time
    from poplock.store import iterate_store
    from poplock.storewriter import store_writers

    now = time.time()  # one now for both: `--since -1h` is then exactly an hour
    until = parse_since(arguments.until, now) if arguments.until is not None else now
    since = parse_since(arguments.since, now) if arguments.since is not None else until - DEFAULT_PERIOD
    if since >= until:
        print(f"poplock: error: --since {iso_time(since)} is not before --until {iso_time(until)}",
              file=sys.stderr)
        return os.EX_USAGE
    tally = Tally(since, until, store_writers(config.store_path))
    read_journal(tally, directory=arguments.directory, files=arguments.file)
    grants = count_grants(iterate_store(config.store_path, config.busy_timeout), now)
    statistics = Statistics(since, until, grants, tally, refusals_logged(config))
    if arguments.prometheus is not None:
        try:
            write_atomically(arguments.prometheus, format_prometheus(statistics))
        except OSError as error:
            print(f"poplock: error: cannot write {arguments.prometheus}: {error.strerror or error}", file=sys.stderr)
            return os.EX_CANTCREAT
    if arguments.json:
        sys.stdout.write(format_json(statistics, iso_time))
    elif arguments.prometheus is None:
        sys.stdout.write(format_text(statistics, iso_time))
    return os.EX_OK


def add_stats_command(commands, common, time_type) -> None:
    """Register `poplock stats` among the CLI's subcommands; `time_type` checks --since and --until,
    which command_stats reads against one clock reading."""

    def checked_time(text: str) -> str:
        time_type(text)  # a usage error when it is not a time
        return text

    stats = commands.add_parser("stats", parents=[common],
                                help="live grants, and logins and relays over a period (from the journal)")
    where = stats.add_mutually_exclusive_group()
    where.add_argument("-D", "--directory", help="read the journal files in DIR")
    where.add_argument("--file", action="append", metavar="FILE", help="read this journal file (repeatable)")
    stats.add_argument("--since", type=checked_time, metavar="TIME",
                       help="count from TIME (2026-11-26T13:00, -1h, today; default: a day before --until)")
    stats.add_argument("--until", type=checked_time, metavar="TIME", help="count up to TIME (default: now)")
    stats.add_argument("--json", action="store_true", help="one JSON object instead of lines")
    stats.add_argument("--prometheus", metavar="FILE",
                       help="write FILE for node_exporter's textfile collector (atomically), and print "
                            "nothing unless --json")
    stats.set_defaults(run=command_stats)
