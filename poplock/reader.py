"""poplock-reader: turns successful POP3/IMAP logins in the journal into grants.

It follows the journal (only entries the watched sources may have written), parses
each, and commits each batch's grants together with the journal cursor that covers
them, in one store snapshot; the cursor file is written right after, as a second
copy. So a restart, kill -9, rotation or vacuum neither loses a login (the cursor
never passes an entry whose grant is not committed) nor replays one (a committed
cursor always covers exactly the committed grants). A login read after its window has
passed (catch-up after downtime) grants nothing, unless it opened a session that the
journal has not ended since (sessions.py): open sessions are committed with the cursor
too, in the grants they hold and the store's metadata.
"""

from __future__ import annotations

import argparse
import logging
import os
import select
import signal
import sys
import time
from collections.abc import Callable

from poplock import events
from poplock.addresses import DENY_EVERYTHING, NO_DENIALS, DenyList, grant_key, load_deny_list
from poplock.arguments import ArgumentParser
from poplock.changes import ADD, Change, apply_change, parse_change
from poplock.config import Config, load_config
from poplock.connection import peer_is_us
from poplock.cursor import save_cursor
from poplock.errors import ConfigError, JournalError, StoreBusyError, StoreCorruptError, StoreError
from poplock.follow import JournalFollower, Position
from poplock.grants import MAX_GRANT_LENGTH, Grant, grant_for_login, merge_grant
from poplock.logins import NO_ADDRESS, Drift, Login, LoginParser, ServerRestart, SessionEnd, Unmatched, UnmatchedLogins
from poplock.logs import held_lines, iso_time, log_event, setup_logging
from poplock.sessions import Bounds, close_session, end_sessions, note_instance, open_session, sweep_sessions
from poplock.sources import Source, as_received, build_sources
from poplock.store import lookup_metadata, salvage_snapshot
from poplock.storewriter import InstallError, StoreWriter, store_writers

log = logging.getLogger("poplock.reader")

# Entries per store transaction when catching up: each commit rewrites the whole store,
# so bigger batches catch up faster; a crash mid-batch re-reads it (nothing is lost).
BATCH = 50_000
RETRY_PAUSES = (1, 2, 5, 10, 30)  # seconds between attempts while the store cannot be written
STATUS_INTERVAL = 1.0  # seconds: STATUS= is for people, no need to send it on every login
REOPEN_INTERVAL = 0.1  # seconds: at most this often a fresh journal handle looks again for a refusal
SESSION_SWEEP_INTERVAL = 60.0  # seconds between tidying the sessions past their bound (they hold nothing)
BASE_LOOKUPS_PER_OPEN = 64  # a running reader unmaps the base this often: its memory stays bounded (storewriter.Base)


def _notify(message: str) -> None:
    if not os.environ.get("NOTIFY_SOCKET"):  # not under systemd (--once, a test): as sd_notify(3) does
        return
    from systemd import daemon

    daemon.notify(message)


class CursorMoved(Exception):
    """Another writer (`poplock rebuild`) committed another position for this reader."""

    def __init__(self, cursor: str | None):
        super().__init__(cursor)
        self.cursor = cursor


class Reader:
    """The reader loop, with its I/O handed in: a follower, a store writer, a clock, sd_notify."""

    def __init__(self, config: Config, sources: list[Source], follower: JournalFollower, writer: StoreWriter,
                 *, clock: Callable[[], float] = time.time, notify: Callable[[str], None] = _notify,
                 change_uids: frozenset[int] | None = None):
        self.config = config
        self.sources = sources
        self.parser = LoginParser([source for source in sources if source.reads_from(None)],
                                  sessions=config.max_session_length > 0)
        self._parsers: dict[str | None, LoginParser] = {None: self.parser}  # one per stream: see logins.py
        self._next_sweep = 0.0  # when sessions past their bound are next tidied (clock time)
        self._quiet_before = 0.0  # logins older than this were read only for their sessions (_start_over)
        self.unmatched = UnmatchedLogins(grace=config.unmatched_warning_after)
        self.follower = follower
        self.writer = writer
        self.clock = clock
        self.notify = notify
        # Who may make the administrative changes replayed from the journal (changes.py).
        self.change_uids = change_uids if change_uids is not None else store_writers(config.store_path)
        self.machine_id = local_machine_id()  # changes made on other hosts are never replayed here
        self.cursor: str | None = None
        self.grant_count: int | None = None
        self.last_login: Login | None = None
        # While rebuilding: the grants to start from, and whether the damaged store is replaced.
        self._initial: dict[str, Grant] | None = None
        self._replace = False
        self._keep_damaged = False
        self._denials: DenyList = NO_DENIALS
        self._denials_identity = None
        self._over_limit_warned: dict[str, float] = {}  # user -> when the last over-limit warning was
        # Called with the grants a read made, before its commit is synced and published (run()), and
        # those of the commits the writer's publisher has not installed yet.
        self.before_publish: Callable[[dict[str, Grant]], None] | None = None
        self._unpublished: dict[int, dict[str, Grant]] = {}  # the publisher's number -> the grants made
        self._unreported: dict[int, tuple[list, list]] = {}  # and -> its events, logged once it is installed

    def unpublished_grants(self) -> dict[str, Grant]:
        """The live grants made by the commits queued and not installed yet (storewriter.Publisher)."""
        publisher = self.writer.publisher
        if publisher is None or not self._unpublished:
            return {}
        installed = publisher.installed_number
        for number in [number for number in self._unpublished if number <= installed]:
            del self._unpublished[number]
        now = self.clock()
        made: dict[str, Grant] = {}
        for grants in self._unpublished.values():  # oldest first: a later grant for the address wins
            made.update(grants)
        return {address: grant for address, grant in made.items() if grant.is_live(now)}

    def back_to_installed(self) -> None:
        """After an install failed: the position on disk is where reading goes on from (what was read
        since is read again, and its events logged then)."""
        self._unpublished.clear()
        self._unreported.clear()
        metadata = self.writer.durable_metadata
        if metadata is not None:
            self.cursor = metadata.get(self._cursor_key)

    @property
    def _cursor_key(self) -> str:
        # Per cursor file, so that two readers (say, local and aggregated journals) can share a store.
        return "cursor:" + self.config.cursor_path

    def restore_position(self) -> None:
        """Load the committed cursor and position the follower just after it.

        Without one (a new, removed or damaged store) the reader starts one window back:
        the journal holds every login of the window, so the grants come back.
        """
        fallback = self.clock() - self.config.window
        try:
            self.cursor = lookup_metadata(self.config.store_path, self._cursor_key, busy_timeout=1.0)
        except StoreCorruptError as error:
            self.rebuild(error)
            return
        # Any other StoreError (busy, no permission) is the caller's: a store that is merely
        # unreachable now must not be replaced.
        if self.cursor is None:
            if not os.path.exists(self.config.store_path):
                if os.path.exists(self.config.cursor_path):  # there was a store: it is lost
                    log_event(log, logging.WARNING, events.STORE_REBUILT, "the grant store %s is missing; "
                              "rebuilding it from the journal since %s", self.config.store_path, iso_time(fallback))
                else:
                    log.info("no saved journal position; starting one window back, at %s", iso_time(fallback))
                self._start_over(replace=False, manual_history=True)
            else:
                log.info("no saved journal position in the store; starting one window back, at %s",
                         iso_time(fallback))
                self._start_over(replace=False, manual_history=False)
            return
        position = self.follower.seek(self.cursor, fallback)
        if position == Position.RESUMED:
            log.info("resuming after the saved journal position")
        elif position == Position.ENTRY_GONE:
            log_event(log, logging.WARNING, events.CURSOR_RESET,
                      "the saved journal entry is gone (rotated or vacuumed); continuing with the next entry")
        elif position == Position.CURSOR_INVALID:
            log_event(log, logging.WARNING, events.CURSOR_RESET,
                      "the journal does not know the saved cursor; starting one window back, at %s",
                      iso_time(fallback))

    def rebuild(self, error: Exception | None = None) -> None:
        """Start building the store anew from the journal; the next commit replaces it.

        `error` says why (a damaged store); None for a rebuild asked for by hand.
        """
        since = iso_time(self.clock() - self.config.window)
        self._check_journal_readable()
        if error is not None:
            log_event(log, logging.ERROR, events.STORE_REBUILT, "%s; rebuilding it from the journal since %s",
                      error, since)
        else:
            log_event(log, logging.INFO, events.STORE_REBUILT, "rebuilding the grant store from the journal since %s",
                      since)
        self._start_over(replace=True, manual_history=True, salvage=error is not None)
        self._keep_damaged = error is not None

    def _start_over(self, *, replace: bool, manual_history: bool, salvage: bool = False) -> None:
        """Position one window back, with what the journal holds from before that.

        Raises JournalError when no journal file can be read at all (no permission): a
        store built from nothing would withdraw every grant.
        """
        now = self.clock()
        window_start = now - self.config.window
        # A session opened before the window may still hold its grant: read back to its bound.
        start = window_start - (self.config.max_session_length if self.parser.sessions and any(
            source.sessions is not None for source in self.sources) else 0)
        initial: dict[str, Grant] = {}
        self._check_journal_readable()
        earliest = self.follower.earliest_time()
        if earliest is not None and earliest > window_start:
            log.warning("the journal begins at %s, after the start of the window (%s): logins before then cannot "
                        "be read again%s", iso_time(earliest), iso_time(window_start),
                        "; keeping the grants still readable from the old store that are older" if salvage else "")
        if salvage:  # what the journal cannot account for, kept from the damaged store
            for address, grant in salvage_snapshot(self.config.store_path).grants.items():
                if grant.held:  # whether its sessions ended, the lost journal would have said: not held
                    grant = Grant(address, grant.expires_when_released, grant.login_at, grant.source, grant.user)
                if grant.is_live(now) and (earliest is None or grant.login_at < earliest):
                    initial[address] = grant
        if manual_history:  # `poplock add --for` may outlast the window: replay older changes too
            history = self.follower.companion([f"POPLOCK_STORE={self.config.store_path}"])
            try:
                history.seek(None, now - MAX_GRANT_LENGTH)
                for entry in history.read(None):
                    if int(entry["__REALTIME_TIMESTAMP"]) >= start * 1e6:
                        break  # the follower reads the rest, in order with the logins
                    change = parse_change(entry, self.config.store_path, self.change_uids, self.machine_id)
                    if change is not None:
                        apply_change(initial, change, now)
            finally:
                history.close()
        self._initial = initial
        self._replace = replace
        self.cursor = None
        if start < window_start:
            log.info("reading the journal from %s: a session opened before the window may still hold its grant "
                     "([Grants] MaxSessionLength=)", iso_time(start))
            self._quiet_before = window_start
        self.follower.seek(None, start)

    def _check_journal_readable(self) -> None:
        if not self.follower.readable():
            raise JournalError("cannot rebuild the grant store: no journal file could be opened (reading the "
                               "system journal takes root or the systemd-journal group)")

    def process_available(self) -> int:
        """Read, grant and checkpoint every entry available now; returns how many were read."""
        total = 0
        while True:
            items, last_cursor, count = self._read_batch()
            if count == 0 and self._initial is None:
                return total
            try:
                self._commit(items, last_cursor, last=count < BATCH)
            except CursorMoved as moved:  # `poplock rebuild` ran, or the store was removed
                self.cursor = moved.cursor
                if moved.cursor is None:
                    missing = not os.path.exists(self.config.store_path)
                    log_event(log, logging.WARNING, events.STORE_REBUILT, "the grant store %s %s; rebuilding it "
                              "from the journal", self.config.store_path,
                              "is gone" if missing else "lost this reader's journal position")
                    self._start_over(replace=False, manual_history=missing)
                else:
                    log.info("the store was rebuilt by another program; continuing from its journal position")
                    self.follower.seek(moved.cursor, self.clock() - self.config.window)
                continue
            except StoreCorruptError as error:
                self.rebuild(error)
                continue
            total += count
            if count < BATCH:
                return total

    def _read_batch(self) -> tuple[list, str | None, int]:
        """(logins and administrative changes in journal order, the last entry's cursor, entries read)."""
        items: list = []
        count = 0
        store_path = self.config.store_path
        for entry in self.follower.read(BATCH):
            count += 1
            try:
                sender = entry.sender
                # A change is trusted from this host's journal only: a POP host writes any field it likes.
                if sender is None and entry.get("POPLOCK_STORE") is not None:
                    change = parse_change(entry, store_path, self.change_uids, self.machine_id)
                    if change is not None:
                        items.append(change)
                    continue
                found = (self.parser if sender is None else self._parser_for(sender)).examine(entry)
                if isinstance(found, Login):
                    items.append((found, entry.get("_SYSTEMD_UNIT"), sender))
                    self.unmatched.login(found)
                elif isinstance(found, (SessionEnd, ServerRestart)):
                    items.append(found)
                elif isinstance(found, Unmatched):
                    drift = self.unmatched.add(found)
                    if drift is not None:
                        self._warn_drift(drift)
            except Exception:  # a bad entry is logged and skipped, never fatal
                log.exception("skipping a journal entry that could not be read or parsed")
        for drift in self.unmatched.due(self.clock()):
            self._warn_drift(drift)
        return items, self.follower.cursor() if count else self.cursor, count

    def _parser_for(self, sender: str) -> LoginParser:
        """The parser of `sender`'s received journal: the sources listing it (Hosts=), its own sessions."""
        parser = self._parsers.get(sender)
        if parser is None:
            parser = self._parsers[sender] = LoginParser(
                [as_received(source) for source in self.sources if source.reads_from(sender)],
                sessions=self.config.max_session_length > 0, sender=sender)
        return parser

    def _warn_drift(self, drift: Drift) -> None:
        since = f"the last login read was at {iso_time(drift.last_login)}" if drift.last_login else \
            "no login of it has been read yet"
        what = "logins whose connection gave no address" if drift.last.reason == NO_ADDRESS else \
            "lines that look like logins but that no pattern reads"
        lines = "1 line" if drift.count == 1 else f"{drift.count} lines"
        log_event(log, logging.WARNING, events.LOGIN_UNMATCHED, "%s logged %s since %s: %s; %s. The latest: %s",
                  drift.source, lines, iso_time(drift.first), what, since, drift.last.message, source=drift.source)

    def _commit(self, items: list, cursor: str | None, *, last: bool = True) -> None:
        """One batch in one transaction. `last`: nothing more is there to read now, so the grants
        this batch makes are all a decision waiting for this read needs (before_publish)."""
        now = self.clock()
        window = self.config.window
        bounds = Bounds(window, self.config.max_session_length)
        changes = []
        ended = []  # (what ended sessions, how many, the grants released), reported once committed
        rebuilt = self._initial is not None
        replaced = self._replace
        publisher = self.writer.publisher
        queued_before = publisher.queued if publisher is not None else 0
        with self.writer.transaction(replace=self._replace, keep_damaged=self._keep_damaged) as transaction:
            grants = transaction.grants
            if rebuilt:
                for address, grant in self._initial.items():
                    grants[address] = merge_grant(grants.get(address), grant, now)
            elif transaction.metadata.get(self._cursor_key) != self.cursor:
                raise CursorMoved(transaction.metadata.get(self._cursor_key))
            if cursor is not None:
                transaction.metadata[self._cursor_key] = cursor
            metadata = transaction.metadata
            denials = self.denials()  # looked at once a batch: a catch-up commits thousands of logins in one
            for item in items:
                if isinstance(item, Change):
                    if self._replay(grants, item, now):
                        log.debug("replayed from the journal: %s %s", item.kind, item.address or "every grant")
                    continue
                if isinstance(item, SessionEnd):
                    if item.instance is not None:
                        self._note_instance(grants, metadata, item.instance, item.source, min(item.time, now),
                                            bounds, ended)
                    released = close_session(grants, metadata, item.key, min(item.time, now), bounds)
                    if released is not None:
                        ended.append(("ended", item.source, 1, [released]))
                    continue
                if isinstance(item, ServerRestart):
                    for name, prefix in zip((item.source, *item.also), item.sessions_prefixes, strict=True):
                        count, released = end_sessions(grants, metadata, prefix, min(item.time, now), bounds)
                        if count:
                            ended.append(("restart", name, count, released))
                    continue
                login, unit, sender = item
                if login.instance is not None:
                    self._note_instance(grants, metadata, login.instance, login.source, min(login.time, now),
                                        bounds, ended)
                opens = login.session is not None and bounds.max_session_length > 0
                if login.time + window <= now and not (opens and bounds.held_until(int(login.time)) > now):
                    if login.time >= self._quiet_before:  # else read back only for its session: no news
                        changes.append(("too-old", None, login, unit, sender))
                    continue
                kind, detail = self._grant(transaction, login, now, denials)
                if opens and isinstance(detail, Grant):
                    detail = open_session(grants, metadata, detail.address, login.session, min(login.time, now),
                                          bounds) or detail
                changes.append((kind, detail, login, unit, sender))
            if now >= self._next_sweep:
                released = sweep_sessions(grants, metadata, now, bounds)
                if released:
                    ended.append(("bound", None, len(released), released))
                self._next_sweep = now + SESSION_SWEEP_INTERVAL
            self.grant_count = len(transaction.grants)
            made = {detail.address: detail for kind, detail, *_ in changes
                    if kind in ("granted", "extended") and detail.is_live(now)} \
                if publisher is not None or (last and self.before_publish is not None) else {}
            if last and self.before_publish is not None:
                self.before_publish({**self.unpublished_grants(), **made})
        if publisher is not None and publisher.queued != queued_before and made:
            self._unpublished[publisher.queued] = made  # until installed, every early answer counts them
        self._initial = None
        self._replace = self._keep_damaged = False
        if replaced:
            log_event(log, logging.INFO, events.STORE_REBUILT, "rebuilt the grant store %s from the journal: "
                      "%d grants", self.config.store_path, self.grant_count)
        self.cursor = cursor
        if cursor is not None:
            if publisher is not None:
                publisher.then(lambda: self._save_cursor(cursor))  # off the login path too
            else:
                self._save_cursor(cursor)
        if publisher is not None and publisher.queued != queued_before:
            self._unreported[publisher.queued] = (changes, ended)  # logged once installed (report_installed)
        else:
            if publisher is not None:
                self.report_installed(publisher.installed_number)  # those before it first
            self._report_committed(changes, ended)

    def _save_cursor(self, cursor: str) -> None:
        try:
            save_cursor(self.config.cursor_path, cursor)
        except OSError as error:  # the store holds the cursor; the file is only a second copy
            log.warning("cannot write the cursor file %s: %s", self.config.cursor_path, error)

    def report_installed(self, installed: int) -> None:
        """Log the events of the commits the publisher has installed, up to the one numbered `installed`."""
        for number in sorted(number for number in self._unreported if number <= installed):
            self._report_committed(*self._unreported.pop(number))

    def _report_committed(self, changes: list, ended: list) -> None:
        with held_lines():
            for kind, detail, login, unit, sender in changes:  # reported once committed
                self._report(kind, login, unit, detail, sender)
            for why, source, count, released in ended:
                self._report_sessions(why, source, count, released)

    @staticmethod
    def _replay(grants, change: Change, now: float) -> bool:
        """apply_change(), keeping the sessions that hold a grant open through a manual grant."""
        held = grants.get(change.address) if change.address is not None else None
        if held is None or not held.held or change.kind != ADD:
            return apply_change(grants, change, now)
        plain = {change.address: Grant(held.address, held.expires_when_released, held.login_at, held.source,
                                       held.user)}
        if not apply_change(plain, change, now):
            return False
        grants[change.address] = merge_grant(held, plain[change.address], now)
        return True

    @staticmethod
    def _note_instance(grants, metadata, instance, source: str, at: float, bounds: Bounds, ended: list) -> None:
        count, released = note_instance(grants, metadata, instance, at, bounds)
        if count:
            ended.append(("instance", source, count, released))

    def _report_sessions(self, why: str, source: str | None, count: int, released: list[Grant]) -> None:
        """One line per grant whose last session ended, and one for a restart that ended sessions."""
        if why in ("restart", "instance"):
            log_event(log, logging.INFO, events.SESSIONS_ENDED, "%s %s: %d open sessions ended, %d grants released",
                      source, "restarted" if why == "restart" else "logs from a new process (restarted)", count,
                      len(released), source=source)
        for grant in released:
            because = {"ended": "its last session ended", "bound": "its sessions reached [Grants] MaxSessionLength=",
                       "restart": f"{source} restarted", "instance": f"{source} restarted"}[why]
            log_event(log, logging.INFO if why in ("ended", "bound") else logging.DEBUG, events.GRANT_RELEASED,
                      "released %s: %s; it relays until %s", grant.address, because, iso_time(grant.expires_at),
                      address=grant.address, source=grant.source, expires=grant.expires_at, user=grant.user)

    def _grant(self, transaction, login: Login, now: float, denials: DenyList) -> tuple[str, object]:
        """What one login does to the store: ("granted" | "extended" | "unchanged", the grant),
        ("denied", why) or ("over-limit", the user's other live addresses)."""
        config = self.config
        key = grant_key(login.address, config.ipv6_prefix)
        denied = denials.denies(login.address, login.user)
        if denied is not None:
            return "denied", denied
        grants = transaction.grants
        if config.max_addresses_per_user and login.user is not None:
            known = transaction.users.addresses(login.user)
            others = [address for address in known if address != key]
            # Only a full list can be over the limit: the grants are looked up (and the dead
            # ones dropped) then, not for every login of a user with fewer addresses.
            if len(others) >= config.max_addresses_per_user:
                others = [address for address in others if (grant := grants.get(address)) is not None and
                          grant.user == login.user and grant.is_live(now)]
                if len(others) >= config.max_addresses_per_user:
                    if others != known:
                        transaction.users.set(login.user, others)
                    return "over-limit", others
            updated = others + [key]
            if updated != known:
                transaction.users.set(login.user, updated)
        # A timestamp ahead of our clock (another host's journal) must not stretch a grant.
        new = grant_for_login(key, min(login.time, now), config.window, login.source, login.user)
        old = grants.get(key)
        if old is None:
            kind, grant = "granted", new
        else:
            grant = merge_grant(old, new, now)
            if grant == old:
                kind = "unchanged"  # an older or re-read login
            else:
                kind = "extended" if old.is_live(now) else "granted"
        grants[key] = grant
        return kind, grant

    def denials(self) -> DenyList:
        """The deny list, read again whenever its file changes (the next login obeys a new line)."""
        try:
            status = os.stat(self.config.deny_file)
            identity = (status.st_dev, status.st_ino, status.st_mtime_ns, status.st_size)
        except FileNotFoundError:
            identity = None
        except OSError as error:  # cannot even look at it: deny, as for a list that cannot be read
            if self._denials is not DENY_EVERYTHING:
                log_event(log, logging.ERROR, events.CONFIG_INVALID, "%s: cannot read: %s; granting nothing until "
                          "it is fixed", self.config.deny_file, error.strerror)
            self._denials = DENY_EVERYTHING
            self._denials_identity = "unreadable"
            return self._denials
        if identity != self._denials_identity:
            try:
                self._denials = load_deny_list(self.config.deny_file) if identity else NO_DENIALS
            except ConfigError as error:  # fail closed: a list that cannot be read denies every login
                log_event(log, logging.ERROR, events.CONFIG_INVALID, "%s; granting nothing until it is fixed", error)
                self._denials = DENY_EVERYTHING
            self._denials_identity = identity
        return self._denials

    def _report(self, kind: str, login: Login, unit: str | None, grant, host: str | None = None) -> None:
        if kind == "denied":
            log_event(log, logging.INFO, events.LOGIN_DENIED,
                      "login from %s refused by the deny list: %s (%s); no grant", login.address, grant,
                      self.config.deny_file, address=login.address, source=login.source,
                      unit=unit, user=login.user, host=host)
            return
        if kind == "over-limit":
            self._warn_over_limit(login, grant, unit, host)
            return
        if kind == "too-old":
            log_event(log, logging.INFO, events.LOGIN_TOO_OLD,
                      "login from %s at %s is older than the window; no grant",
                      login.address, iso_time(login.time), address=login.address, source=login.source, unit=unit,
                      host=host)
            return
        if kind == "unchanged":
            log.debug("login from %s at %s changes nothing", login.address, iso_time(login.time))
            return
        self.last_login = login
        event = events.LOGIN_GRANTED if kind == "granted" else events.GRANT_EXTENDED
        shown = grant.address if grant.address == login.address else f"{grant.address} ({login.address})"
        held = f", held open by {len(grant.sessions)} session{'s' if len(grant.sessions) > 1 else ''}" \
            if grant.held else ""
        log_event(log, logging.INFO, event, "%s %s until %s (%s login%s%s)",
                  "granted" if kind == "granted" else "extended", shown, iso_time(grant.expires_at),
                  login.source, f" at {host}" if host else "", held, address=grant.address, source=login.source,
                  unit=unit, expires=grant.expires_at, user=login.user, host=host)
        log.debug("login by user %r from %s", login.user, login.address)

    def _warn_over_limit(self, login: Login, others: list[str], unit: str | None, host: str | None = None) -> None:
        """Once per account per window: a botnet with one password logs in from hundreds of addresses."""
        now = self.clock()
        warned = self._over_limit_warned.get(login.user)
        if warned is not None and now - warned < self.config.window:
            log.debug("login by %r from %s over the limit again", login.user, login.address)
            return
        if len(self._over_limit_warned) > 10000:
            self._over_limit_warned = {user: when for user, when in self._over_limit_warned.items()
                                       if now - when < self.config.window}
        self._over_limit_warned[login.user] = now
        log_event(log, logging.WARNING, events.LOGIN_OVER_LIMIT,
                  "login from %s granted nothing: its user already holds live grants for %d addresses "
                  "([Grants] MaxAddressesPerUser=%d): %s", login.address, len(others),
                  self.config.max_addresses_per_user, " ".join(others), address=login.address,
                  source=login.source, unit=unit, user=login.user, host=host)

    def status(self) -> str:
        parts = [f"watching {', '.join(source.name for source in self.sources)}"]
        if self.grant_count is not None:
            parts.append(f"{self.grant_count} grants stored")
        if self.last_login is not None:
            parts.append(f"last login {self.last_login.address} at {iso_time(self.last_login.time)}")
        return "; ".join(parts)


class SyncListener:
    """[Store] ReaderSocket=: a decision that finds no grant asks here for the journal to be
    read up to now, with a line `sync`, and waits for the line `ok` (connection.ask_reader,
    decisions.ReaderSync). Questions that arrive together are answered by one read: a flood
    of refusals costs one read per turn of the loop, not one each. A connection may stay
    open for further questions (the decision services keep theirs). Anyone may ask (mode
    0666): an answer reveals nothing, and a read that finds nothing new costs next to
    nothing; so the connections kept are bounded, the longest quiet closed first, those of
    the reader's own user (the decision services) only when no other is left."""

    MAX_CONNECTIONS = 256
    MAX_PENDING = 4096  # bytes of questions a connection may have sent unanswered
    MAX_EARLY_GRANTS = 1000  # grants in one early answer; a read that made more is answered once committed

    def __init__(self, path: str):
        import socket

        self.path = path
        if os.path.exists(path):
            from poplock.logs import unix_socket_answers

            if unix_socket_answers(path, socket.SOCK_STREAM):
                raise OSError(f"{path}: another reader answers there")
            os.unlink(path)  # left by a reader that was killed
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.socket.bind(path)
        os.chmod(path, 0o666)
        self.socket.listen(socket.SOMAXCONN)
        self.socket.setblocking(False)
        self._connections: dict[int, object] = {}  # descriptor -> connection, the longest quiet first
        self._questions: dict[int, int] = {}  # descriptor -> questions it waits the answers of
        self._early: set[int] = set()  # of those, the ones whose questions may be answered early
        self._trusted: set[int] = set()  # connections whose peers may see grants (connection.peer_is_us)
        # Questions answered once the publisher has installed the state numbered so (storewriter.Publisher).
        self._deferred: list[tuple[int, dict[int, int]]] = []

    def fileno(self) -> int:
        return self.socket.fileno()

    def filenos(self) -> list[int]:
        """The listening socket and every connection kept: any of them readable may bring a question."""
        return [self.socket.fileno(), *self._connections]

    def take_questions(self, readable) -> bool:
        """Accept new connections and read the questions of those `readable`; True if one came."""
        if self.socket.fileno() in readable:
            self._accept_all()
        for fd in [fd for fd in readable if fd in self._connections]:
            self._read(fd)
        return bool(self._questions)

    def _accept_all(self) -> None:
        while True:
            try:
                connection, _ = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # out of descriptors, say: answer those already taken
                return
            connection.setblocking(False)
            if len(self._connections) >= self.MAX_CONNECTIONS:  # the quietest goes, the services' last
                self._drop(next((fd for fd in self._connections if fd not in self._trusted),
                                next(iter(self._connections))))
            self._connections[connection.fileno()] = connection
            if peer_is_us(connection):  # root or this reader's user: it may read the store anyway
                self._trusted.add(connection.fileno())
            self._read(connection.fileno())  # a one-shot asker has sent its question already


    def _read(self, fd: int) -> None:
        connection = self._connections[fd]
        try:
            data = connection.recv(self.MAX_PENDING)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(fd)
            return
        if not data:
            self._drop(fd)
            return
        count = data.count(b"\n")
        if count:
            # Early only if every question it waits on asks for the grants (a decision service may
            # have two in flight).
            early = fd in self._trusted and data == b"sync grants\n" * count and (
                fd in self._early or not self._questions.get(fd))
            self._questions[fd] = self._questions.get(fd, 0) + count
            self._connections[fd] = self._connections.pop(fd)  # the most recently heard from last
            if early:
                self._early.add(fd)
            else:
                self._early.discard(fd)

    def answer_early(self, grants: dict) -> None:
        """Answer the questions `sync grants` of peers that may see grants, before the read's commit
        is synced and published: `ok` and the grants it made, as JSON {key: encoded grant}. The
        journal holds those logins, so the decision may count them at once; a commit that then
        fails is tried again from the journal. Too many for one line: they wait for the commit."""
        if not self._early:
            return
        if len(grants) > self.MAX_EARLY_GRANTS:
            self._early.clear()
            return
        import json

        from poplock.grants import encode_grant

        line = b"ok " + json.dumps({key: encode_grant(grant).decode("utf-8", "surrogateescape")
                                    for key, grant in grants.items()}).encode() + b"\n" if grants else b"ok\n"
        early, self._early = self._early, set()
        deferred = {fd for _, waiting in self._deferred for fd in waiting}  # answered in the order asked
        for fd in early - deferred:
            count = self._questions.pop(fd, 0)
            if count:
                self._send(fd, line * count)

    def answer(self, answer: bytes) -> None:
        """Answer every question taken, one line each, those waiting for an install too."""
        self._early.clear()
        questions, self._questions = self._questions, {}
        deferred, self._deferred = self._deferred, []
        for waiting in [questions] + [waiting for _, waiting in deferred]:
            for fd, count in waiting.items():
                self._send(fd, answer * count)

    def answer_when_installed(self, number: int) -> None:
        """The questions taken and not answered early wait until the state `number` is installed: a
        peer that may not be told the grants reads them from the store."""
        self._early.clear()
        if self._questions:
            self._deferred.append((number, self._questions))
            self._questions = {}

    def answer_installed(self, number: int) -> None:
        """`ok` to the questions waiting for the states up to `number`."""
        while self._deferred and self._deferred[0][0] <= number:
            for fd, count in self._deferred.pop(0)[1].items():
                self._send(fd, b"ok\n" * count)

    def _send(self, fd: int, data: bytes) -> None:
        connection = self._connections.get(fd)
        if connection is None:
            return
        try:
            sent = connection.send(data)
        except OSError:  # gone, or it stopped waiting
            sent = -1
        if sent != len(data):  # a full buffer: it is not reading its answers
            self._drop(fd)

    def _drop(self, fd: int) -> None:
        connection = self._connections.pop(fd, None)
        self._questions.pop(fd, None)
        for _, waiting in self._deferred:  # the descriptor may be reused by another connection
            waiting.pop(fd, None)
        self._early.discard(fd)
        self._trusted.discard(fd)
        if connection is not None:
            connection.close()

    def close(self) -> None:
        for fd in list(self._connections):
            self._drop(fd)
        self.socket.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


class _Stop:
    """SIGTERM/SIGINT set a flag and wake the select() through a self-pipe."""

    def __init__(self):
        self.requested = False
        self.read_fd, write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(write_fd)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def drain(self) -> None:
        try:
            while os.read(self.read_fd, 512):
                pass
        except BlockingIOError:
            pass


def _open_sync_listener(config: Config) -> SyncListener | None:
    if not config.reader_socket or not config.reader_wait:
        return None
    try:
        return SyncListener(config.reader_socket)
    except OSError as error:  # decisions then answer from the store as it is, after ReaderWait=
        log.warning("cannot answer on %s, so a refusal cannot wait for a login just logged: %s",
                    config.reader_socket, error.strerror or error)
        return None


def local_machine_id() -> str | None:
    """This host's machine ID, as journald records it in _MACHINE_ID (None if unknown)."""
    try:
        with open("/etc/machine-id", encoding="ascii") as file:
            return file.read().strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def _watchdog_interval() -> float | None:
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 1e6


def _wait_timeout(*bounds: float | None) -> float | None:
    """How long to block before looking again: the nearest of the given bounds (None: none)."""
    present = [bound for bound in bounds if bound is not None]
    return max(0.0, min(present)) if present else None


def run(reader: Reader, follower: JournalFollower, *, once: bool) -> int:
    """The daemon's loop: read what is there, then sleep until the journal changes.

    journald coalesces the inotify notifications it gives readers on a 250 ms timer, so
    a login could wait that long (up to half a second, measured) for the descriptor to
    turn readable. Instead of re-reading on a timer, the reader reads at once when a
    decision asks on ReaderSocket= (SyncListener): a client that sends mail right after
    checking it is not refused, and an idle reader sleeps (RecheckInterval= is a fallback).
    """
    stop = _Stop()
    reader.restore_position()
    sync = _open_sync_listener(reader.config) if not once else None  # answering once READY= is sent
    status = reader.status()
    reader.notify("READY=1\nSTATUS=" + status)
    log_event(log, logging.INFO, events.READER_STARTED, "following the journal for %s",
              ", ".join(source.name for source in reader.sources))
    watchdog = _watchdog_interval()
    last_ping = last_status = time.monotonic()
    attempt = 0
    writer = reader.writer
    merging = None  # the descriptor that turns readable when a merge into a new base is done
    waiting = False  # decisions wait for the journal to be read up to now
    if sync is not None:  # the questions `sync grants` are answered before the commit's syncs
        reader.before_publish = sync.answer_early
    publisher = writer.publisher  # installs the commits in a thread of its own
    last_reopen = 0.0
    while not stop.requested:
        pause = None
        try:
            if publisher is not None:
                installed = publisher.installed()  # raises the StoreError of an install that failed
                reader.report_installed(installed)
                if sync is not None:
                    sync.answer_installed(installed)
            read = reader.process_available()
            attempt = 0
            if waiting:  # before the directory sync: the new state is visible once renamed
                if read == 0 and time.monotonic() - last_reopen >= REOPEN_INTERVAL:
                    # A question came, so a decision found no grant, and this read found nothing:
                    # look once more with a fresh journal handle, which sees what the long-lived
                    # one may have stepped past (follow.py's _look_again catches most, not all:
                    # 1 in 1,000 measured) or a file it was not told of yet. At most ten times a
                    # second: a flood of refusals (every inbound MX connection) must stay cheap.
                    last_reopen = time.monotonic()
                    follower.look_afresh(reader.cursor, reader.clock() - reader.config.window)
                    reader.process_available()
                if publisher is not None and publisher.busy():
                    sync.answer_early(reader.unpublished_grants())
                    sync.answer_when_installed(publisher.queued)
                else:
                    sync.answer(b"ok\n")
                waiting = False
            writer.sync_directory()
        except (StoreError, JournalError, OSError) as error:  # store, cursor file or journal trouble
            if sync is not None:
                sync.answer(b"error\n")  # they decide from the store as it is
                waiting = False
            if isinstance(error, InstallError):
                reader.back_to_installed()
            event = events.STORE_BUSY if isinstance(error, StoreBusyError) else events.STORE_FAILED
            log_event(log, logging.ERROR, event, "%s; will retry from the last committed position", error)
            if once:
                return os.EX_TEMPFAIL
            pause = RETRY_PAUSES[min(attempt, len(RETRY_PAUSES) - 1)]
            attempt += 1
            follower.reopen(reader.cursor, reader.clock() - reader.config.window)
        if once and pause is None:
            break
        if merging is None and pause is None and writer.merge_due():
            merging = writer.merge_in_background()  # off the login path: logins go on committing meanwhile
        now = time.monotonic()
        status_due = None
        if reader.status() != status:
            if now - last_status >= STATUS_INTERVAL:
                status = reader.status()
                reader.notify("STATUS=" + status)
                last_status = now
            else:
                status_due = last_status + STATUS_INTERVAL - now
        if watchdog and now - last_ping >= watchdog / 2:
            reader.notify("WATCHDOG=1")
            last_ping = now
        recheck = reader.config.recheck_interval if pause is None and reader.config.recheck_interval else None
        timeout = _wait_timeout(pause, status_due, watchdog / 2 if watchdog else None, recheck)
        watched = [follower.fileno(), stop.read_fd] + ([merging] if merging is not None else []) + (
            sync.filenos() if sync is not None else []) + ([publisher.wake_fd] if publisher is not None else [])
        readable, _, _ = select.select(watched, [], [], timeout)
        if stop.read_fd in readable:
            stop.drain()
        if sync is not None:
            waiting = sync.take_questions(readable)  # read at the top of the loop, then answered
        if merging is not None and merging in readable:
            merging = None
            try:
                writer.finish_merge()
            except StoreCorruptError as error:  # the base: the journal has every grant of the window
                reader.rebuild(error)
            except StoreError as error:  # the top merely stays larger; the next merge tries again
                log_event(log, logging.ERROR, events.STORE_FAILED, "%s; the merge is tried again later", error)
        if pause is None:
            follower.process()
    writer.cancel_merge()
    answer = b"ok\n"
    if publisher is not None:
        publisher.drain()  # what was read is installed before the reader goes
        try:
            reader.report_installed(publisher.installed())
        except InstallError as error:
            log_event(log, logging.ERROR, events.STORE_FAILED, "%s; the next start reads it again", error)
            answer = b"error\n"
        publisher.close()
    if sync is not None:
        sync.answer(answer)
        sync.close()
    reader.notify("STOPPING=1")
    log.info("stopping")
    follower.close()
    return os.EX_OK


def journal_matches(config: Config, sources: list[Source], sender: str | None = None) -> list[str]:
    """What the reader reads of `sender`'s received journal (None: this host's own): the entries of
    the sources that read it, and in this host's journal the administrative changes to its store."""
    matches = [match for source in sources if source.reads_from(sender) for match in source.journal_matches() + (
        source.session_matches() if config.max_session_length else [])]
    return matches + [f"POPLOCK_STORE={config.store_path}"] if sender is None else matches


def open_journals(config: Config, sources: list[Source], *, directory: str | None = None,
                  files: list[str] | None = None):
    """The reader's journals: this host's (or the one `directory`/`files` name instead), and with
    [Reader] Directory= the journals received from the POP hosts the sources list (received.py).

    Raises OSError (or ValueError) when a journal cannot be opened."""
    local = JournalFollower(journal_matches(config, sources), directory=directory, files=files,
                            live=not config.received_directory)  # received.py waits on its descriptor
    if not config.received_directory:
        return local
    from poplock.received import ReceivedJournals

    if not os.path.isdir(config.received_directory):
        local.close()
        raise OSError(f"[Reader] Directory={config.received_directory}: no such directory (systemd-journal-remote "
                      f"creates it when it starts)")

    def matches_for(sender: str) -> list[str] | None:
        return journal_matches(config, sources, sender) if any(
            source.reads_from(sender) for source in sources) else None

    return ReceivedJournals(config.received_directory, local, matches_for)


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(
        prog="poplock-reader",
        description="Grant relaying to clients that logged in to the POP3/IMAP server, from the journal.",
    )
    parser.add_argument("-c", "--config", help="configuration file (default /etc/poplock/poplock.conf)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("-D", "--directory", help="read the journal files in DIR instead of the system journal")
    where.add_argument("--file", action="append", metavar="FILE", help="read this journal file (repeatable)")
    parser.add_argument("--once", action="store_true", help="process what is in the journal now, then exit")
    parser.add_argument("-v", "--verbose", action="store_true", help="log each decision (user names included)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    setup_logging("poplock-reader", logging.DEBUG if arguments.verbose else logging.INFO)
    try:
        config = load_config(arguments.config)
        all_sources = build_sources(config)
    except ConfigError as error:
        log_event(log, logging.ERROR, events.CONFIG_INVALID, "%s", error)
        _notify(f"STATUS=invalid configuration: {error.problems[0]}")
        return os.EX_CONFIG
    sources = [all_sources[name] for name in config.sources]
    try:
        follower = open_journals(config, sources, directory=arguments.directory, files=arguments.file)
    except (OSError, ValueError) as error:
        log.error("cannot open the journal: %s", error)
        return os.EX_NOINPUT
    writer = StoreWriter(config.store_path, background_merges=not arguments.once,
                         defer_directory_sync=not arguments.once, publish_in_background=not arguments.once,
                         base_lookups_per_open=None if arguments.once else BASE_LOOKUPS_PER_OPEN)
    reader = Reader(config, sources, follower, writer)
    try:
        return run(reader, follower, once=arguments.once)
    except JournalError as error:
        log.error("%s", error)
        return os.EX_NOINPUT
    except StoreError as error:  # at start: busy, or no permission; systemd restarts the reader
        event = events.STORE_BUSY if isinstance(error, StoreBusyError) else events.STORE_FAILED
        log_event(log, logging.ERROR, event, "%s", error)
        return os.EX_TEMPFAIL


if __name__ == "__main__":
    sys.exit(main())
