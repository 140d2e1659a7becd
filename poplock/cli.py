"""poplock: look at and change grants, check a client, scan the journal for logins.

    poplock show [--json]            current grants and the static allow list
    poplock add ADDRESS [--for 2h]   grant by hand
    poplock remove ADDRESS           withdraw a grant
    poplock flush                    withdraw every grant
    poplock import [FILE]            load grants, in one transaction
    poplock expire                   purge expired grants (poplock-expire.timer)
    poplock check ADDRESS            exit 0 if that client may relay now, 1 if not
    poplock rebuild                  rebuild the store from the journal (done by itself when it is damaged)
    poplock scan [...]               print the logins the journal holds, touching nothing
    poplock stats [...]              live grants, and logins and relays over a period (stats.py)
    poplock config                   check the configuration and print it in effect
    poplock doctor [...]             check the running system, one line per check

Administrative changes are also logged to the journal with their MESSAGE_IDs and the
store's path, and poplock-reader replays them from there (changes.py): a store rebuilt
from the journal keeps them. A command that changes a damaged store rebuilds it first.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import logging
import os
import sys
import time

from poplock import events
from poplock.access import check_relay_in_files
from poplock.addresses import grant_key, load_allow_list, load_deny_list, normalize_address
from poplock.arguments import ArgumentParser, join_dash_values
from poplock.config import SETTINGS, Config, load_config
from poplock.doctor import add_doctor_command
from poplock.errors import (
    AddressError,
    ConfigError,
    InputError,
    JournalError,
    PoplockError,
    StoreBusyError,
    StoreCorruptError,
    StoreError,
)
from poplock.grants import MAX_GRANT_LENGTH, Grant, merge_grant
from poplock.logs import events_reach_the_journal, iso_time, log_event, setup_logging
from poplock.stats import add_stats_command
from poplock.store import iterate_store
from poplock.storewriter import StoreWriter
from poplock.values import format_timespan, parse_timespan

log = logging.getLogger("poplock.cli")

EX_NOT_ALLOWED = 1  # `poplock check`: the client may not relay


def _address(text: str) -> str:
    try:
        return normalize_address(text)
    except AddressError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _timespan(text: str) -> float:
    try:
        seconds = parse_timespan(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if not 1 <= seconds <= MAX_GRANT_LENGTH:
        raise argparse.ArgumentTypeError(f"must be from 1s to {format_timespan(MAX_GRANT_LENGTH)} (for clients "
                                         "that may always relay, use the static allow list)")
    return seconds


def parse_since(text: str, now: float) -> float:
    """--since: an ISO 8601 time (local unless it has an offset), "-1h", "1h ago", "today" or "now"."""
    word = text.strip()
    if word == "now":
        return now
    if word in ("today", "yesterday"):
        midnight = datetime.datetime.fromtimestamp(now).replace(hour=0, minute=0, second=0, microsecond=0)
        return midnight.timestamp() - (86400 if word == "yesterday" else 0)
    if word.startswith("-") or word.endswith(" ago"):
        return now - parse_timespan(word.removeprefix("-").removesuffix(" ago"))
    try:
        return datetime.datetime.fromisoformat(word).timestamp()
    except ValueError:
        raise ValueError(f"expected a time such as 2026-11-26T13:00, -1h, '1h ago', today; not {text!r}") from None


def _since(text: str) -> float:
    try:
        return parse_since(text, time.time())
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


# --- commands -----------------------------------------------------------------------------------

SORTED_UP_TO = 1000  # grants `show` sorts by expiry and aligns; a bigger store is streamed as it is stored


def command_show(config: Config, arguments) -> int:
    now = time.time()
    networks = load_allow_list(config.static_allow_file)
    undecodable: list[bytes] = []
    _look_for_store(config)

    if arguments.users:
        return _show_users(config, arguments, now)

    def grants():
        try:
            for kind, key, value in iterate_store(config.store_path, config.busy_timeout):
                if kind == "grant" and (arguments.all or value.is_live(now)) and (
                        arguments.user is None or value.user == arguments.user):
                    yield value
                elif kind == "undecodable":
                    undecodable.append(key)
        except StoreCorruptError as error:
            error.hint = ("poplock-reader rebuilds it from the journal at its next commit; "
                          "`poplock rebuild` does it now")
            raise

    stream = grants()
    first = list(itertools.islice(stream, SORTED_UP_TO + 1))
    if len(first) <= SORTED_UP_TO:  # a small store: by expiry, soonest first
        first.sort(key=lambda grant: grant.expires_at)
    shown = itertools.chain(first, stream)
    if arguments.json:
        _write_lines(json.dumps(_grant_record(grant, now), ensure_ascii=False) for grant in shown)
        if arguments.user is None:
            _write_lines(json.dumps({"kind": "static", "address": str(network), "file": config.static_allow_file})
                         for network in networks)
    elif arguments.user is not None and not first:
        print(f"no grants opened by {arguments.user}")
    elif not first and not networks:
        print("no grants and no static entries")
    else:
        statics = [] if arguments.user is not None else [
            (str(network), "never (static)", "static-allowed", "-", "-") for network in networks]

        def row(grant) -> tuple:
            return (grant.address, _expiry(grant) + _not_live(grant, now), grant.source,
                    grant.user or "-", iso_time(grant.login_at))

        rows = [row(grant) for grant in first]
        header = ("ADDRESS", "EXPIRES", "SOURCE", "USER", "LOGIN")
        if len(first) <= SORTED_UP_TO:
            widths = [max(len(cells[column]) for cells in [header, *rows, *statics]) for column in range(4)]
        else:  # too many to measure first: widths that fit IPv4 addresses, local times and most names
            widths = [15, 25, 14, 16]

        # One format for every line, "ADDRESS  EXPIRES  ...  LOGIN": a million lines are 5 s of listing.
        line = ("".join(f"{{:<{width}}}  " for width in widths) + "{}").format

        rest = (row(grant) for grant in stream)
        _write_lines(line(*row) for row in itertools.chain([header], rows, rest, statics))
    if undecodable:
        print(f"poplock: warning: {config.store_path} holds {len(undecodable)} entries this version "
              "cannot read (another format, or damage), not shown: "
              + ", ".join(repr(key)[1:] for key in undecodable[:5]), file=sys.stderr)
    return os.EX_OK


def _show_users(config: Config, arguments, now: float) -> int:
    """`show --users`: each user whose logins hold live grants, with their addresses, busiest first."""
    addresses: dict[str, list[str]] = {}
    for kind, _, grant in iterate_store(config.store_path, config.busy_timeout):
        if kind == "grant" and grant.user is not None and grant.is_live(now):
            addresses.setdefault(grant.user, []).append(grant.address)
    ranked = sorted(addresses.items(), key=lambda item: (-len(item[1]), item[0]))
    if arguments.json:
        _write_lines(json.dumps({"kind": "user", "user": user, "addresses": sorted(found)}, ensure_ascii=False)
                     for user, found in ranked)
    elif not ranked:
        print("no live grants opened by a user's login")
    else:
        width = max(len("USER"), *(len(user) for user, _ in ranked))
        _write_lines([f"{'USER'.ljust(width)}  GRANTS  ADDRESSES"] + [
            f"{user.ljust(width)}  {len(found):>6}  {' '.join(sorted(found))}" for user, found in ranked])
    return os.EX_OK


def _write_lines(lines) -> None:
    """Lines to standard output a thousand at a time: a million grants are listed in seconds."""
    chunk = []
    for text in lines:
        chunk.append(text)
        if len(chunk) >= 1000:
            sys.stdout.write("\n".join(chunk) + "\n")
            chunk = []
    if chunk:
        sys.stdout.write("\n".join(chunk) + "\n")


def _grant_record(grant: Grant, now: float) -> dict:
    """`show --json`'s line for a grant. `sessions`: the open sessions holding it (0: none); a held
    grant's `expires` is its sessions' bound, `released_expires` when it expires once they end."""
    record = {"kind": "grant", "address": grant.address, "expires": iso_time(grant.expires_at),
              "source": grant.source, "user": grant.user, "login_time": iso_time(grant.login_at),
              "live": grant.is_live(now), "sessions": len(grant.sessions)}
    if grant.held:
        record["released_expires"] = iso_time(grant.expires_when_released)
    return record


def _expiry(grant: Grant) -> str:
    """The EXPIRES cell: the time, or for a grant held open by sessions, how many and their bound."""
    if not grant.held:
        return iso_time(grant.expires_at)
    count = len(grant.sessions)
    return f"held open by {count} session{'s' if count > 1 else ''}, at most until {iso_time(grant.expires_at)}"


def _end_sessions_of(transaction, addresses) -> int:
    """Take the removed grants' sessions out of the store's session index (sessions.py); their
    grants, which listed them, are gone already. Returns how many there were."""
    from poplock.sessions import INDEX_PREFIX

    metadata = transaction.metadata
    ended = [name for name, value in metadata.items()
             if name.startswith(INDEX_PREFIX) and (addresses is None or value.partition(" ")[0] in addresses)]
    for name in ended:
        del metadata[name]
    return len(ended)


def _count(number: int, noun: str) -> str:
    """"1 expired grant", "2 expired grants"."""
    return f"{number} {noun}{'' if number == 1 else 's'}"


def _not_live(grant: Grant, now: float) -> str:
    if grant.is_live(now):
        return ""
    if grant.is_from_the_future(now):
        return " (not valid: its login time is in the future; was the clock stepped back?)"
    if grant.expires_at - grant.login_at > MAX_GRANT_LENGTH:
        return f" (not valid: longer than {format_timespan(MAX_GRANT_LENGTH)}, which no grant can be)"
    return " (expired)"


# Stores found damaged by this run's change, then rebuilt from the journal and changed: the
# change is made, and the exit status still says that the store was damaged (EXIT STATUS).
_repaired_stores: list[str] = []


def change_store(config: Config, change):
    """`change(transaction)` in one store transaction, its result returned; a damaged store
    is first rebuilt from the journal, so that a removal is never made to a partial view."""
    writer = StoreWriter(config.store_path)
    try:
        with writer.transaction() as transaction:
            return change(transaction)
    except StoreCorruptError as error:
        print(f"poplock: warning: {error}; rebuilding it from the journal", file=sys.stderr)
        count = rebuild_store(config, error)
        print(f"poplock: rebuilt {config.store_path} from the journal: {_count(count, 'grant')}", file=sys.stderr)
        _repaired_stores.append(config.store_path)
    with writer.transaction() as transaction:
        return change(transaction)


CHANGING = ("add", "remove", "flush", "import", "expire", "rebuild")  # the commands that write the store


def _permission_hint(store_path: str, *, write: bool) -> str:
    """What to do when this user may not read or change the store, or "" when that is not the trouble."""
    import grp
    import pwd

    directory = os.path.dirname(store_path) or "."
    try:
        status = os.stat(directory)
    except OSError:
        return ""
    if write:
        allowed = os.access(directory, os.W_OK | os.X_OK) and (
            not os.path.exists(store_path + ".lock") or os.access(store_path + ".lock", os.R_OK))
    else:
        allowed = os.access(directory, os.X_OK) and os.access(store_path, os.R_OK)
    if allowed:
        return ""
    try:
        owner = pwd.getpwuid(status.st_uid).pw_name
    except KeyError:
        owner = str(status.st_uid)
    try:
        group = grp.getgrgid(status.st_gid).gr_name
    except KeyError:
        group = str(status.st_gid)
    if not write or status.st_mode & 0o020:
        what = "Changing the grants" if write else "Reading the grants"
        return (f"{what} takes root, the user {owner} or the group {group}: run it with sudo, or add yourself "
                f"to the group (adduser NAME {group}) and log in again.")
    return (f"Changing the grants takes root or the user {owner}: run it with sudo (the group {group} may only "
            f"read them while {directory} is not group-writable; see poplock(8), FILES).")


def _look_for_store(config: Config) -> None:
    """A store that is not there: an error when its directory is missing too (a wrong [Store] Path=, or
    a directory never made), a warning when only the file is (poplock-reader has not started yet)."""
    path = config.store_path
    directory = os.path.dirname(path) or "."
    try:
        os.stat(path)
        return
    except FileNotFoundError:
        pass
    except OSError as error:
        failure = StoreError(f"cannot read the grant store {path}: {error.strerror}")
        failure.hint = _permission_hint(path, write=False)
        raise failure from None
    if not os.path.isdir(directory):
        failure = StoreError(f"there is no grant store {path}: the directory {directory} does not exist")
        failure.hint = ("Check [Store] Path= (`poplock config` prints it); the default directory, /var/lib/poplock, "
                        "is made by `systemd-tmpfiles --create poplock.conf`.")
        raise failure
    print(f"poplock: warning: there is no grant store {path} yet: poplock-reader makes it when it starts "
          "(systemctl status poplock-reader.service)", file=sys.stderr)


def rebuild_store(config: Config, error: Exception | None = None, *, directory: str | None = None,
                  files: list[str] | None = None) -> int:
    """The store built anew from the journal, as poplock-reader does it (reader.py); the grant count."""
    from poplock.reader import Reader, open_journals
    from poplock.sources import build_sources

    all_sources = build_sources(config)
    sources = [all_sources[name] for name in config.sources]
    try:
        follower = open_journals(config, sources, directory=directory, files=files)
    except (OSError, ValueError) as failure:
        raise JournalError(f"cannot open the journal to rebuild the store: {failure}") from None
    try:
        reader = Reader(config, sources, follower, StoreWriter(config.store_path), notify=lambda message: None)
        reader.rebuild(error)
        reader.process_available()
    finally:
        follower.close()
    return reader.grant_count or 0


def _warn_unless_journaled() -> None:
    if not events_reach_the_journal():
        print("poplock: warning: journald is not running, so this change is not in the journal: a rebuild of "
              "the store will not know of it", file=sys.stderr)


def command_add(config: Config, arguments) -> int:
    now = time.time()
    duration = arguments.duration if arguments.duration is not None else config.window
    key = grant_key(arguments.address, config.ipv6_prefix)
    new = Grant(key, int(now + duration), int(now), "manual")

    def add(transaction):
        transaction.grants[key] = merge_grant(transaction.grants.get(key), new, now)
        return transaction.grants[key]

    grant = change_store(config, add)
    log_event(log, logging.INFO, events.GRANT_ADDED, "granted %s until %s by hand", grant.address,
              iso_time(grant.expires_at), address=grant.address, source="manual", expires=grant.expires_at,
              store=config.store_path, login=grant.login_at)
    _warn_unless_journaled()
    print(f"{grant.address} may relay until {iso_time(grant.expires_at)}")
    return os.EX_OK


def command_remove(config: Config, arguments) -> int:
    if arguments.user is not None:
        return _remove_user(config, arguments.user)
    key = grant_key(arguments.address, config.ipv6_prefix)

    def withdraw(transaction):
        grant = transaction.grants.pop(key, None)
        if grant is not None and grant.user is not None:
            _forget(transaction, grant.user, {key})
        if grant is not None:
            _end_sessions_of(transaction, {key})
        return grant

    removed = change_store(config, withdraw)
    if removed is None:
        print(f"{key}: no grant to remove", file=sys.stderr)
        return EX_NOT_ALLOWED
    log_event(log, logging.INFO, events.GRANT_REMOVED, "removed the grant for %s", removed.address,
              address=removed.address, source=removed.source, store=config.store_path)
    _warn_unless_journaled()
    sessions = len(removed.sessions)
    ending = f", ending its {sessions} open session{'s' if sessions > 1 else ''}" if sessions else ""
    print(f"removed the grant for {removed.address}{ending}")
    return os.EX_OK


def _forget(transaction, user: str, addresses: set[str]) -> None:
    """Take `addresses` out of the user's index entry (storewriter.Users), which has no grants left there."""
    known = transaction.users.addresses(user)
    if set(known) & addresses:
        transaction.users.set(user, [address for address in known if address not in addresses])


def _remove_user(config: Config, user: str) -> int:
    """Every grant the user's logins opened, withdrawn in one transaction (the whole store is
    looked through: a revocation must not depend on an index being right)."""
    def withdraw(transaction):
        found = [grant for _, grant in transaction.grants.items() if grant.user == user]
        for grant in found:
            del transaction.grants[grant.address]
        if transaction.users.addresses(user):
            transaction.users.set(user, [])
        _end_sessions_of(transaction, {grant.address for grant in found})
        return found

    removed = change_store(config, withdraw)
    if not removed:
        print(f"{user}: no grant to remove", file=sys.stderr)
        return EX_NOT_ALLOWED
    for grant in removed:
        log_event(log, logging.INFO, events.GRANT_REMOVED, "removed the grant for %s (opened by a login of "
                  "a user being revoked)", grant.address, address=grant.address, source=grant.source,
                  store=config.store_path, user=user)
    _warn_unless_journaled()
    print(f"removed {_count(len(removed), 'grant')} of {user}: {' '.join(sorted(grant.address for grant in removed))}")
    return os.EX_OK


def command_flush(config: Config, arguments) -> int:
    def flush(transaction):
        count = len(transaction.grants)
        transaction.grants.clear()
        _end_sessions_of(transaction, None)
        return count

    count = change_store(config, flush)
    log_event(log, logging.INFO, events.GRANTS_FLUSHED, "removed all %d grants", count, store=config.store_path)
    _warn_unless_journaled()
    print(f"removed {_count(count, 'grant')}")
    return os.EX_OK


def command_import(config: Config, arguments) -> int:
    from poplock.grantfile import parse_grant_lines

    now = time.time()
    name = "standard input" if arguments.file == "-" else arguments.file
    try:
        if arguments.file == "-":
            found = parse_grant_lines(sys.stdin, name, now, config.window)
        else:
            with open(arguments.file, encoding="utf-8") as lines:
                found = parse_grant_lines(lines, name, now, config.window)
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"cannot read {name}: {getattr(error, 'strerror', None) or error}") from None
    for problem in found.problems:
        print(f"poplock: {'warning' if arguments.skip_bad else 'error'}: {problem}", file=sys.stderr)
    if found.problems and not arguments.skip_bad:
        print(f"poplock: nothing imported: {_count(len(found.problems), 'bad line')} (--skip-bad imports the others)",
              file=sys.stderr)
        return os.EX_DATAERR

    for grant in found.grants:  # as a login of that client would be stored ([Grants] IPv6Prefix=)
        if "/" not in grant.address:
            grant.address = grant_key(grant.address, config.ipv6_prefix)

    def load(transaction):
        imported = []
        by_user: dict[str, list[str]] = {}
        for grant in found.grants:
            merged = merge_grant(transaction.grants.get(grant.address), grant, now)
            transaction.grants[grant.address] = merged
            imported.append(merged)
            if merged.user is not None:
                by_user.setdefault(merged.user, []).append(merged.address)
        if config.max_addresses_per_user:  # so that they count toward MaxAddressesPerUser= as a login's do
            for user, addresses in by_user.items():
                known = transaction.users.addresses(user)
                transaction.users.set(user, known + [address for address in addresses if address not in known])
        return imported

    imported = change_store(config, load)
    if arguments.journal:
        for grant in imported:  # replayable like `poplock add`: a rebuild keeps them
            log_event(log, logging.INFO, events.GRANT_ADDED, "granted %s until %s by import", grant.address,
                      iso_time(grant.expires_at), address=grant.address, source=grant.source,
                      expires=grant.expires_at, store=config.store_path, login=grant.login_at)
        _warn_unless_journaled()
    skipped = f"; {found.expired} expired left out" if found.expired else ""
    bad = f"; {_count(len(found.problems), 'bad line')} skipped" if found.problems else ""
    print(f"imported {_count(len(imported), 'grant')}{skipped}{bad}")
    return os.EX_OK


def command_rebuild(config: Config, arguments) -> int:
    damage = None
    try:  # a damaged store is kept aside for a post-mortem, and what the journal cannot give is salvaged
        for _ in iterate_store(config.store_path, config.busy_timeout):
            pass
    except StoreCorruptError as error:
        damage = error
    count = rebuild_store(config, damage, directory=arguments.directory, files=arguments.file)
    print(f"rebuilt {config.store_path} from the journal: {_count(count, 'grant')}")
    return os.EX_OK


EXPIRED_EVENTS_MAX = 1000  # grant-expired events per `poplock expire` run; the rest in one


def command_expire(config: Config, arguments) -> int:
    now = time.time()

    def purge(transaction):
        expired = transaction.grants.not_live(now)
        by_user: dict[str, set[str]] = {}
        for grant in expired:
            del transaction.grants[grant.address]
            if grant.user is not None:
                by_user.setdefault(grant.user, set()).add(grant.address)
        for user, addresses in by_user.items():
            _forget(transaction, user, addresses)
        return expired, len(transaction.grants)

    expired, remaining = change_store(config, purge)
    # One event per grant, up to a point: purging a tenth of a million grants must not write
    # a hundred thousand journal entries (each grant's expiry is in its granted event anyway).
    for grant in expired[:EXPIRED_EVENTS_MAX]:
        log_event(log, logging.INFO, events.GRANT_EXPIRED, "grant for %s expired at %s", grant.address,
                  iso_time(grant.expires_at), address=grant.address, source=grant.source,
                  expires=grant.expires_at)
    if len(expired) > EXPIRED_EVENTS_MAX:
        log_event(log, logging.INFO, events.GRANT_EXPIRED, "%d more expired grants purged (one event each is "
                  "logged for the first %d)", len(expired) - EXPIRED_EVENTS_MAX, EXPIRED_EVENTS_MAX,
                  store=None)
    print(f"purged {_count(len(expired), 'expired grant')}; {remaining} remain{'s' if remaining == 1 else ''}")
    return os.EX_OK


def command_check(config: Config, arguments) -> int:
    _look_for_store(config)
    decision = check_relay_in_files(config, arguments.address, time.time())
    if decision.network is not None:
        reason = f"static network {decision.network} ({config.static_allow_file})"  # as `show` writes it
    elif decision.grant is None:
        reason = "no grant, and not in the static allow list"
    elif decision.denied is not None:
        reason = f"its grant is refused by the deny list ({decision.denied}, {config.deny_file})"
    elif decision.allowed:
        grant = decision.grant
        what = "by hand" if grant.source == "manual" else f"{grant.source} login"
        reason = f"grant until {iso_time(grant.expires_at)} ({what} at {iso_time(grant.login_at)})"
        if grant.held:
            count = len(grant.sessions)
            reason = (f"grant held open by {count} session{'s' if count > 1 else ''} while connected, at most "
                      f"until {iso_time(grant.expires_at)}, then until {iso_time(grant.expires_when_released)} "
                      f"or the window after the last one ends ({what} at {iso_time(grant.login_at)})")
    elif decision.grant.is_from_the_future(time.time()):
        reason = (f"its grant's login time {iso_time(decision.grant.login_at)} is in the future "
                  "(was the clock stepped back?); it allows nothing until the client logs in again")
    elif decision.grant.expires_at > time.time():
        reason = f"its grant is longer than {format_timespan(MAX_GRANT_LENGTH)}, which no grant can be"
    else:
        reason = f"its grant expired at {iso_time(decision.grant.expires_at)}"
    verdict = "may relay" if decision.allowed else "may not relay"
    print(f"{decision.address} {verdict}: {reason}")
    return os.EX_OK if decision.allowed else EX_NOT_ALLOWED


def command_scan(config: Config, arguments) -> int:
    from poplock.follow import JournalFollower
    from poplock.logins import Login, LoginParser, Unmatched
    from poplock.servers import SERVERS
    from poplock.sources import UNTRUSTED, build_sources

    if arguments.source:
        names = arguments.source
    elif arguments.all_sources:  # every parser poplock has, watched or not
        names = list(SERVERS) + [name for name in config.source_sections if name not in SERVERS]
    else:
        names = list(config.sources)
    sources = build_sources(config, names)
    parser = LoginParser(sources.values(), check_trust=not arguments.all_sources)
    matches = None if arguments.all_sources else [m for source in sources.values() for m in source.journal_matches()]
    follower = _open_journal(JournalFollower, matches, arguments.directory, arguments.file)
    if arguments.since is not None:
        follower.seek(None, arguments.since)

    def found_lines():
        while True:
            count = 0
            for entry in follower.read(10000):
                count += 1
                try:
                    found = parser.examine(entry) if arguments.unmatched else parser.parse(entry)
                except OSError as error:  # a corrupt entry: say so, and go on
                    print(f"poplock: warning: skipping an unreadable journal entry: {error}", file=sys.stderr)
                    continue
                if arguments.unmatched and isinstance(found, Unmatched):
                    if arguments.json:
                        yield {"source": found.source, "time": iso_time(found.time), "reason": found.reason,
                               "message": found.message, "cursor": entry.cursor}
                    else:
                        yield iso_time(found.time), found.source, f"{found.reason}: {found.message}"
                elif not arguments.unmatched and isinstance(found, Login):
                    # --all-sources reads lines whoever sent them: say which ones poplock-reader would trust.
                    trusted = not arguments.all_sources or sources[found.source].trust_level(entry) != UNTRUSTED
                    if arguments.json:
                        yield {"address": found.address, "time": iso_time(found.time), "user": found.user,
                               "source": found.source, "trusted": trusted, "cursor": entry.cursor}
                    elif arguments.all_sources:
                        yield (iso_time(found.time), found.address, found.source,
                               "trusted" if trusted else "UNTRUSTED", f"user={found.user}")
                    else:
                        yield iso_time(found.time), found.address, found.source, f"user={found.user}"
            if count == 0:
                return

    try:
        if arguments.json:
            _write_lines(json.dumps(record, ensure_ascii=False) for record in found_lines())
        else:
            _write_lines(_aligned(found_lines()))
    finally:
        follower.close()
    return os.EX_OK


def _open_journal(follower_class, matches, directory: str | None, files: list[str] | None):
    """The journal `scan` reads, or a JournalError naming what could not be opened and why."""
    for path in [directory] if directory is not None else files or ():
        if not os.path.exists(path):
            raise JournalError(f"cannot open the journal: {path}: no such "
                               f"{'directory' if path == directory else 'file'}")
    try:
        follower = follower_class(matches, directory=directory, files=files)
    except (OSError, ValueError) as error:
        where = f"{directory}: " if directory is not None else f"{' '.join(files)}: " if files else ""
        raise JournalError(f"cannot open the journal: {where}{getattr(error, 'strerror', None) or error}") from None
    denied = directory is None and not files and _system_journal_denied()
    if not follower.readable():
        follower.close()
        if directory is not None or files:
            where = f"in {directory}" if directory is not None else "of " + " ".join(files or ())
            raise JournalError(f"cannot open the journal: no journal file {where} could be opened")
        if not denied:
            raise JournalError("cannot open the journal: no journal files were found in "
                               f"{' or '.join(SYSTEM_JOURNALS)} (is systemd-journald running?)")
        error = JournalError("cannot open the journal: no journal files were opened due to insufficient permissions")
        error.hint = JOURNAL_PERMISSION_HINT
        raise error
    if denied:  # only some: the user's own journal, say
        print("poplock: warning: some journal files could not be opened due to insufficient permissions: the "
              "logins of the system's servers are in them", file=sys.stderr)
        print(JOURNAL_PERMISSION_HINT, file=sys.stderr)
    return follower


SYSTEM_JOURNALS = ("/var/log/journal", "/run/log/journal")
JOURNAL_PERMISSION_HINT = ("Reading the system journal takes root or the systemd-journal group: run it with "
                           "sudo, or add yourself to the group (adduser NAME systemd-journal) and log in again.")


def _system_journal_denied() -> bool:
    """Some file or directory of the system journal exists that this process may not read."""
    for top in SYSTEM_JOURNALS:
        try:
            with os.scandir(top) as machines:
                for machine in machines:
                    if not machine.is_dir():
                        continue
                    if not os.access(machine.path, os.R_OK | os.X_OK):
                        return True
                    with os.scandir(machine.path) as journals:
                        if any(not os.access(file.path, os.R_OK) for file in journals
                               if file.name.endswith(".journal")):
                            return True
        except PermissionError:
            return True
        except OSError:  # absent: no journal kept there
            continue
    return False


ALIGNED_UP_TO = 1000  # lines measured before the first is printed; the rest are padded to the same widths


def _aligned(rows):
    """Rows of cells as lines, every column but the last padded to the widest of the first rows."""
    first = list(itertools.islice(rows, ALIGNED_UP_TO))
    if not first:
        return
    widths = [max(len(cells[column]) for cells in first) for column in range(len(first[0]) - 1)]
    for cells in itertools.chain(first, rows):
        yield "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=False)) + "  " + cells[-1]


def command_config(config: Config, arguments) -> int:
    from poplock.sources import build_sources

    sources = build_sources(config)
    load_allow_list(config.static_allow_file)  # what relaylock, the policy service and check read
    load_deny_list(config.deny_file)
    section = None
    for setting in SETTINGS:
        if setting.section != section:
            section = setting.section
            print(f"{'' if setting is SETTINGS[0] else chr(10)}[{section}]")
        value = getattr(config, setting.attribute)
        if isinstance(value, bool):
            value = "yes" if value else "no"
        elif isinstance(value, tuple):  # a list; a list of pairs is written NAME=VALUE
            value = " ".join(item if isinstance(item, str) else "=".join(item) for item in value)
        elif isinstance(value, float):
            value = format_timespan(value)
        print(f"{setting.key}={value}")
    for source in sources.values():
        print(f"\n[Source:{source.name}]")
        print(f"Identifiers={' '.join(source.identifiers)}")
        print(f"Units={' '.join(source.units)}")
        print(f"Users={' '.join(str(uid) for uid in sorted(source.uids))}")
        print(f"LoginUsers={' '.join(str(uid) for uid in sorted(source.login_uids))}")
        if source.unresolved_users:
            print(f"# not on this system, so trusted nowhere: {' '.join(source.unresolved_users)}")
        for pattern in source.patterns:
            print(f"Pattern={pattern.pattern}")
        print(f"Hint={source.hint.pattern if source.hint else ''}")
    return os.EX_OK


# --- arguments and errors -------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    # -c works before or after the command; SUPPRESS keeps a subcommand from resetting it.
    common = ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", default=argparse.SUPPRESS,
                        help="configuration file (default /etc/poplock/poplock.conf)")
    parser = ArgumentParser(prog="poplock", parents=[common],
                                     description="POP-before-SMTP relay grants: show, change, check, scan.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=ArgumentParser)

    show = commands.add_parser("show", parents=[common], help="list current grants and static entries")
    show.add_argument("--json", action="store_true", help="one JSON object per line")
    show.add_argument("--all", action="store_true", help="include expired grants not yet purged")
    which = show.add_mutually_exclusive_group()
    which.add_argument("--user", metavar="NAME", help="only the grants that NAME's logins opened")
    which.add_argument("--users", action="store_true",
                       help="instead, each user with live grants and their addresses, busiest first")
    show.set_defaults(run=command_show)

    add = commands.add_parser("add", parents=[common], help="let ADDRESS relay (by hand)")
    add.add_argument("address", type=_address, metavar="ADDRESS")
    add.add_argument("--for", dest="duration", type=_timespan, metavar="SPAN",
                     help="how long (systemd time span; default: the configured Window)")
    add.set_defaults(run=command_add)

    remove = commands.add_parser("remove", parents=[common], help="withdraw the grant for ADDRESS, or a user's")
    whose = remove.add_mutually_exclusive_group(required=True)
    whose.add_argument("address", type=_address, metavar="ADDRESS", nargs="?")
    whose.add_argument("--user", metavar="NAME", help="every grant that NAME's logins opened, in one transaction")
    remove.set_defaults(run=command_remove)

    commands.add_parser("flush", parents=[common], help="withdraw every grant").set_defaults(run=command_flush)

    load = commands.add_parser("import", parents=[common], help="load grants from FILE (default: standard input)")
    load.add_argument("file", nargs="?", default="-", metavar="FILE",
                      help="JSON lines as `show --json` prints them, or ADDRESS [EXPIRES] lines; - for standard input")
    load.add_argument("--skip-bad", action="store_true", help="import the good lines even when some are bad")
    load.add_argument("--no-journal", dest="journal", action="store_false",
                      help="leave no journal entry per grant (faster; a rebuild of the store will not know them)")
    load.set_defaults(run=command_import)
    commands.add_parser("expire", parents=[common], help="purge expired grants").set_defaults(run=command_expire)

    check = commands.add_parser("check", parents=[common], help="exit 0 if ADDRESS may relay now, 1 if not")
    check.add_argument("address", type=_address, metavar="ADDRESS")
    check.set_defaults(run=command_check)

    rebuild = commands.add_parser("rebuild", parents=[common],
                                  help="build the store anew from the logins and changes in the journal")
    where = rebuild.add_mutually_exclusive_group()
    where.add_argument("-D", "--directory", help="read the journal files in DIR (as poplock-reader -D)")
    where.add_argument("--file", action="append", metavar="FILE", help="read this journal file (repeatable)")
    rebuild.set_defaults(run=command_rebuild)

    scan = commands.add_parser("scan", parents=[common], help="print the logins in the journal (changes nothing)")
    where = scan.add_mutually_exclusive_group()
    where.add_argument("-D", "--directory", help="read the journal files in DIR")
    where.add_argument("--file", action="append", metavar="FILE", help="read this journal file (repeatable)")
    scan.add_argument("--since", type=_since, metavar="TIME", help="start at TIME (2026-11-26T13:00, -1h, today)")
    scan.add_argument("--source", action="append", metavar="NAME",
                      help="use this source instead of the watched ones (repeatable; need not be enabled)")
    scan.add_argument("--all-sources", action="store_true",
                      help="try every source's patterns on every entry, whoever wrote it (for checking patterns)")
    scan.add_argument("--unmatched", action="store_true",
                      help="print instead the entries that look like logins but that no pattern reads")
    scan.add_argument("--json", action="store_true",
                      help="one JSON object per line: address, time, user, source, trusted, cursor")
    scan.set_defaults(run=command_scan)

    add_stats_command(commands, common, _since)
    add_doctor_command(commands, common)

    commands.add_parser("config", parents=[common], help="check the configuration and print it in effect"
                        ).set_defaults(run=command_config)
    return parser


def _exit_status(error: PoplockError) -> int:
    if isinstance(error, ConfigError):
        return os.EX_CONFIG
    if isinstance(error, StoreBusyError):
        return os.EX_TEMPFAIL
    if isinstance(error, StoreError):
        return os.EX_IOERR
    if isinstance(error, (JournalError, InputError)):
        return os.EX_NOINPUT
    return os.EX_SOFTWARE


def main(argv: list[str] | None = None) -> int:
    arguments = build_parser().parse_args(
        join_dash_values(sys.argv[1:] if argv is None else argv, ("--since", "--until")))
    setup_logging("poplock", logging.INFO, stderr_level=logging.WARNING, also_journal=True)
    config = None
    try:
        config = load_config(getattr(arguments, "config", None))
        status = arguments.run(config, arguments)
        # Changed, but after rebuilding a damaged store: the damage is an error all the same.
        return os.EX_IOERR if _repaired_stores and status == os.EX_OK else status
    except PoplockError as error:
        if isinstance(error, StoreError) and not isinstance(error, (StoreBusyError, StoreCorruptError)) and config:
            error.hint = error.hint or _permission_hint(config.store_path, write=arguments.command in CHANGING)
        if isinstance(error, ConfigError):
            log_event(log, logging.ERROR, events.CONFIG_INVALID, "%s", error)
        else:
            print(f"poplock: error: {error}", file=sys.stderr)
        if error.hint:
            print(error.hint, file=sys.stderr)
        return _exit_status(error)
    except BrokenPipeError:
        return os.EX_OK


if __name__ == "__main__":
    sys.exit(main())
