"""Every POP3/IMAP server besides Dovecot that tests/support/popservers.py runs, live: a real
login and a real refused login into a real journald, read by poplock-reader with the built-in
source as poplock ships it. An update of a server that changes the line poplock reads makes
its successful login grant nothing, and this fails; tests/corpus/ has the recorded lines to
compare with (tests/corpus/record.py records them again).

Each server logs into a journald of its own (support.journald.PrivateJournald), so its
entries keep the identifiers the server really uses (`pop3d` is both Courier's and
mailutils'), no other test's lines mix in, nothing is left over from an earlier run, and
the reader reads exactly that journal (`poplock-reader --once -D`). The servers run at
once, one thread each, and so do a server's POP3 and IMAP logins: most of the time goes in
the servers' delays after a refused login (Courier 5 s, Cyrus 3 s, PAM 2 s).
"""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
from support import popservers
from support.journald import PrivateJournald
from support.mailclients import imap_login, pop3_login
from support.poplock import Setup

pytestmark = pytest.mark.system

# One mail user per protocol: POP3 and IMAP log in at the same time, and Cyrus refuses one
# of two first logins of one user that race to create its INBOX.
USERS = {"alice": "alice-secret-1", "bob": "bob-secret-2"}
USER_OF = {"pop3": "alice", "imap": "bob"}
WRONG_PASSWORD = "not-the-password"

# popa3d and mailutils imap4d write the successful login as the mail user (uids FIRST_UID,
# FIRST_UID + 1, ... in the order of USERS, in the server's namespace). With no systemd here
# there is no _SYSTEMD_UNIT to trust, and by design the built-in source then trusts those
# uids only when LoginUsers= lists them (poplock/servers.py): the one setting a site on a
# plain journald must add, and the only one these tests add. The defaults alone grant
# nothing for these logins; a test below proves that too.
LOGIN_USERS = " ".join(str(popservers.Popa3d.FIRST_UID + number) for number in range(len(USERS)))


@dataclass(frozen=True)
class Server:
    name: str  # the built-in source that reads it, and the `Sources=` of its configuration
    support_class: type  # from support.popservers
    protocols: tuple[str, ...]


SERVERS = {
    server.name: server for server in (
        Server("courier", popservers.Courier, ("pop3", "imap")),
        Server("cyrus", popservers.Cyrus, ("pop3", "imap")),
        Server("mailutils", popservers.Mailutils, ("pop3", "imap")),
        Server("popa3d", popservers.Popa3d, ("pop3",)),
        Server("solid-pop3d", popservers.SolidPop3d, ("pop3",)),
    )
}


@dataclass(frozen=True)
class Case:
    """One service of one server: a refused login from `refused`, then a login from `accepted`."""

    server: str
    protocol: str
    identifier: str  # the SYSLOG_IDENTIFIER its lines carry
    # The line the refused login logs, as re.search on MESSAGE finds it ({address}: the refused
    # client, {user}: its user name). The reader runs once it is in the journal. A server update
    # that changes it fails the test too, which matters: poplock reads some failure lines (a
    # popa3d one ends a connection).
    refused_line: str
    settings: str = ""  # beyond Sources=: only what a plain journald forces (see LOGIN_USERS)
    accepted: str = ""
    refused: str = ""

    @property
    def name(self) -> str:
        return f"{self.server}-{self.protocol}"


CASES = [
    Case("courier", "pop3", "pop3d", r"^LOGIN FAILED, user={user}, ip=\[::ffff:{address}\], "),
    Case("courier", "imap", "imapd", r"^LOGIN FAILED, user={user}, ip=\[::ffff:{address}\], "),
    Case("cyrus", "pop3", "cyrus/pop3", r"^badlogin: \[{address}\] plaintext \({user}\) "),
    Case("cyrus", "imap", "cyrus/imap", r"^badlogin: \[{address}\] plaintext \({user}\) "),
    Case("mailutils", "pop3", "pop3d", r"^\S+ user `{user}': authentication failed$"),
    Case("mailutils", "imap", "imap4d", r"^\S+ login failed: {user}$",
         settings=f"[Source:mailutils]\nLoginUsers={LOGIN_USERS}\n"),
    Case("popa3d", "pop3", "popa3d", r"^Authentication failed for {user}$",
         settings=f"[Source:popa3d]\nLoginUsers={LOGIN_USERS}\n"),
    Case("solid-pop3d", "pop3", "solid-pop3d", r"^authentication failed for user {user} - {address}$"),
]
# Two client addresses of its own for each case: 127.31.<n>.2 logs in, 127.31.<n>.3 is refused.
CASES = [replace(case, accepted=f"127.31.{number}.2", refused=f"127.31.{number}.3")
         for number, case in enumerate(CASES, start=1)]
assert {(case.server, case.protocol) for case in CASES} == {
    (server.name, protocol) for server in SERVERS.values() for protocol in server.protocols}


@dataclass
class Outcome:
    """What one case's clients saw, and what poplock made of the server's journal."""

    accepted: bool = False  # the client's right password was accepted
    refused: bool = False  # the client's wrong password was refused
    refused_line_logged: bool = False  # Case.refused_line reached the journal
    granted: dict[str, bool] = field(default_factory=dict)  # client address -> may relay
    granted_by_defaults: dict[str, bool] = field(default_factory=dict)  # with Sources= alone
    reader_output: str = ""
    journal: str = ""  # what the server logged, for the assertion messages


def log_in(case: Case, server: object, password: str, source: str) -> bool:
    user = USER_OF[case.protocol]
    if case.protocol == "pop3":
        return pop3_login("127.0.0.1", server.pop3_port, user, password, source=source)
    return imap_login("127.0.0.1", server.imap_port, user, password, source=source)


def read_journal(setup: Setup, journal: PrivateJournald, until_allowed: str | None, timeout: float = 10.0) -> str:
    """`poplock-reader --once` on the server's journal, again until `until_allowed` may relay
    or `timeout` has passed (a line can reach the journal after the client saw the answer)."""
    deadline = time.monotonic() + timeout
    first = setup.run_reader("-D", str(journal.storage)).stderr
    later = ""
    while until_allowed is not None and not setup.may_relay(until_allowed) and time.monotonic() < deadline:
        time.sleep(0.05)
        later = setup.run_reader("-D", str(journal.storage)).stderr
    return first + (f"(and at the last of the runs that followed)\n{later}" if later else "")


def run_case(case: Case, server: object, journal: PrivateJournald, directory: Path) -> Outcome:
    outcome = Outcome()
    outcome.refused = not log_in(case, server, WRONG_PASSWORD, case.refused)
    outcome.accepted = log_in(case, server, USERS[USER_OF[case.protocol]], case.accepted)
    refused_line = re.compile(case.refused_line.format(address=re.escape(case.refused), user=USER_OF[case.protocol]))
    try:
        journal.wait_for(lambda entry: entry.get("SYSLOG_IDENTIFIER") == case.identifier
                         and bool(refused_line.search(entry.get("MESSAGE", ""))))
        outcome.refused_line_logged = True
    except TimeoutError:
        pass  # the test says so, with what the server logged instead
    directory.mkdir()
    setup = Setup(directory, extra=f"Sources={case.server}\n{case.settings}")
    outcome.reader_output = read_journal(setup, journal, until_allowed=case.accepted)
    outcome.granted = {address: setup.may_relay(address) for address in (case.accepted, case.refused)}
    if case.settings:
        (directory / "defaults").mkdir()
        defaults = Setup(directory / "defaults", extra=f"Sources={case.server}\n")
        read_journal(defaults, journal, until_allowed=None)
        outcome.granted_by_defaults = {address: defaults.may_relay(address)
                                       for address in (case.accepted, case.refused)}
    return outcome


def run_server(server: Server, directory: Path) -> dict[str, Future]:
    """Starts the server with a journald of its own and runs its cases at once.

    Returns each case's finished Future: a case that raised raises in its own tests only.
    """
    cases = [case for case in CASES if case.server == server.name]
    directory.mkdir()
    directory.chmod(0o755)
    with PrivateJournald(directory / "journal") as journal, \
            server.support_class(directory / "server", USERS, journal_sockets=journal.sockets) as running:
        with ThreadPoolExecutor(len(cases)) as pool:
            futures = {case.name: pool.submit(run_case, case, running, journal, directory / case.name)
                       for case in cases}
        lines = "\n".join(f"  {entry.get('SYSLOG_IDENTIFIER')}[_UID={entry.get('_UID')}]: {entry.get('MESSAGE')}"
                          for entry in journal.entries() if entry.get("_TRANSPORT") == "syslog")
    for future in futures.values():
        if future.exception() is None:
            future.result().journal = lines
    return futures


@pytest.fixture(scope="module")
def outcomes(journald, unpacked_servers) -> Iterator[dict[str, Future]]:
    """Each server's Future of run_server(), by server name."""
    # journald: /dev/log must lead to /run/systemd/journal/dev-log, where each server finds its own.
    # Not under pytest's temporary folder: every pytest run on the machine makes
    # /tmp/pytest-of-root private again, and the servers' unprivileged processes (cyrus,
    # courier, the mail users) must keep reaching their files while they run.
    directory = Path(tempfile.mkdtemp(prefix="poplock-pop-servers-"))
    directory.chmod(0o755)
    try:
        with ThreadPoolExecutor(len(SERVERS)) as pool:
            futures = {server.name: pool.submit(run_server, server, directory / server.name)
                       for server in SERVERS.values()}
        yield futures
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def outcome_of(outcomes: dict[str, Future], case: Case) -> Outcome:
    """The case's Outcome; raises what its server's start, or the case itself, raised."""
    return outcomes[case.server].result()[case.name].result()


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_the_successful_login_grants_and_the_refused_one_does_not(outcomes, case):
    outcome = outcome_of(outcomes, case)
    what = f"\npoplock-reader said:\n{outcome.reader_output}\n{case.server} logged:\n{outcome.journal}"
    assert (outcome.accepted, outcome.refused) == (True, True), f"{case.name}: not the answers expected{what}"
    assert outcome.refused_line_logged, f"{case.name}: no {case.identifier} line like {case.refused_line!r}{what}"
    assert outcome.granted[case.accepted], f"{case.name}: the login from {case.accepted} granted nothing{what}"
    assert not outcome.granted[case.refused], f"{case.name}: the refused login from {case.refused} granted{what}"


@pytest.mark.parametrize("case", [case for case in CASES if case.settings], ids=lambda case: case.name)
def test_under_a_plain_journald_the_defaults_grant_no_login_the_mail_user_wrote(outcomes, case):
    outcome = outcome_of(outcomes, case)
    assert outcome.granted_by_defaults == {case.accepted: False, case.refused: False}
