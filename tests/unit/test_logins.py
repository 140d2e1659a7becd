"""Login parsing on real Dovecot 2.3 lines (recorded from Dovecot on this kind of machine) and 2.4's wording;
the lines of one connection read together (popa3d, mailutils); format drift (examine, UnmatchedLogins)."""

import pytest

from poplock.config import load_config
from poplock.logins import NO_ADDRESS, Connections, Drift, Login, LoginParser, Unmatched, UnmatchedLogins
from poplock.servers import SERVERS
from poplock.sources import Correlation, build_sources

TIME = "1795699814614230"


@pytest.fixture(scope="module")
def parser(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "poplock.conf"
    path.write_text("")
    return LoginParser(build_sources(load_config(str(path))).values())


def dovecot_entry(message: str, **fields) -> dict:
    entry = {"MESSAGE": message, "SYSLOG_IDENTIFIER": "dovecot", "_UID": "0", "_COMM": "log",
             "__REALTIME_TIMESTAMP": TIME}
    entry.update(fields)
    return entry


SUCCESSES = [
    ("pop3-login: Login: user=<alice>, method=PLAIN, rip=127.0.0.5, lip=127.0.0.1, mpid=5654, "
     "session=<b7aS8S1hfbZ/AAAF>", "127.0.0.5", "alice"),
    ("pop3-login: Login: user=<alice>, method=PLAIN, rip=127.0.0.10, lip=127.0.0.1, mpid=7990, TLS, "
     "session=<nIdPIC5hNYx/AAAK>", "127.0.0.10", "alice"),
    ("imap-login: Login: user=<alice>, method=PLAIN, rip=::1, lip=::1, mpid=7994, secured, "
     "session=<nCdQIC5h7dUAAAAAAAAAAAAAAAAAAAAB>", "::1", "alice"),
    ("pop3-login: Login: user=<alice>, method=APOP, rip=127.0.0.14, lip=127.0.0.1, mpid=7999, "
     "session=<wtJnIC5h0ad/AAAO>", "127.0.0.14", "alice"),
    ("imap-login: Login: user=<bob@example.org>, method=PLAIN, rip=::ffff:198.51.100.23, "
     "lip=::ffff:192.0.2.1, mpid=31, TLS, session=<abcd>", "198.51.100.23", "bob@example.org"),
    ("imap-login: Login: user=<carol>, method=PLAIN, rip=2001:db8::42, lip=2001:db8::1, mpid=12, TLS, "
     "session=<xyz+/AAAB>", "2001:db8::42", "carol"),
    # Dovecot 2.4 says "Logged in:" where 2.3 said "Login:".
    ("imap-login: Logged in: user=<alice>, method=PLAIN, rip=192.0.2.55, lip=192.0.2.1, mpid=4242, TLS, "
     "session=<C4Xx9S1hAAAAAAAA>", "192.0.2.55", "alice"),
    ("pop3-login: Logged in: user=<dave>, method=SCRAM-SHA-256, rip=192.0.2.56, lip=192.0.2.1, mpid=17, "
     "session=<AbCd>", "192.0.2.56", "dave"),
]

NOT_LOGINS = [
    "master: Dovecot v2.3.19.1 (9b53102964) starting up for pop3, imap (core dumps disabled)",
    "auth: passwd-file(alice,127.0.0.6,<6+SS8S1h9aJ/AAAG>): Password mismatch",
    "pop3-login: Disconnected: Connection closed (auth failed, 1 attempts in 2 secs): user=<alice>, "
    "method=PLAIN, rip=127.0.0.6, lip=127.0.0.1, session=<6+SS8S1h9aJ/AAAG>",
    "imap-login: Disconnected: Aborted login by logging out (auth failed, 1 attempts in 2 secs): user=<alice>, "
    "method=PLAIN, rip=127.0.0.13, lip=127.0.0.1, session=<EsNQIC5hH9F/AAAN>",
    "pop3(alice)<5654><b7aS8S1hfbZ/AAAF>: Disconnected: Logged out top=0/0, retr=0/0, del=0/0, size=0",
    "imap-login: Disconnected: Connection closed (no auth attempts in 0 secs): user=<>, rip=127.0.0.1, "
    "lip=127.0.0.1, secured, session=<ywJPIC5hQut/AAAB>",
    "imap-login: Login aborted: Connection closed (auth failed, 1 attempts in 2 secs) (auth_failed): user=<a>, "
    "method=PLAIN, rip=192.0.2.9, lip=192.0.2.1, session=<x>",
    "pop3-login: Login: user=<alice>, method=PLAIN, rip=not-an-address, lip=127.0.0.1, session=<x>",
]


@pytest.mark.parametrize("message, address, user", SUCCESSES)
def test_a_successful_dovecot_login_grants_its_remote_address(parser, message, address, user):
    assert parser.parse(dovecot_entry(message)) == Login(address, 1795699814.61423, user, "dovecot")


@pytest.mark.parametrize("message", NOT_LOGINS)
def test_dovecot_lines_that_are_not_successful_logins_grant_nothing(parser, message):
    assert parser.parse(dovecot_entry(message)) is None


def test_the_same_login_from_the_dovecot_unit_under_systemd_grants(parser):
    entry = dovecot_entry(SUCCESSES[0][0], _SYSTEMD_UNIT="dovecot.service", _UID="0")
    assert parser.parse(entry).address == "127.0.0.5"


def test_the_login_time_is_when_journald_received_the_entry(parser):
    login = parser.parse(dovecot_entry(SUCCESSES[0][0], __REALTIME_TIMESTAMP="1700000000000001"))
    assert login.time == pytest.approx(1700000000.000001)


def test_an_entry_without_a_message_grants_nothing(parser):
    entry = dovecot_entry("")
    del entry["MESSAGE"]
    assert parser.parse(entry) is None


# --- lines of one connection, read together --------------------------------------------------------


BOOT = "9f63f569678647b982c6438c2508fe41"


def correlated_parser(tmp_path, text: str = "", names=("popa3d", "mailutils"), **options) -> LoginParser:
    path = tmp_path / "poplock.conf"
    path.write_text(text)
    return LoginParser(build_sources(load_config(str(path)), list(names)).values(), **options)


def syslog(identifier: str, message: str, at: float, *, uid: int = 0, pid: int = 7736, **fields) -> dict:
    entry = {"MESSAGE": message, "SYSLOG_IDENTIFIER": identifier, "_UID": str(uid), "_PID": str(pid),
             "_BOOT_ID": BOOT, "__REALTIME_TIMESTAMP": str(int(at * 1e6))}
    entry.update(fields)
    return entry


def test_popa3d_logins_take_the_address_tcpd_logged_for_the_same_process_under_systemd(tmp_path):
    parser = correlated_parser(tmp_path)
    inetd = {"_SYSTEMD_UNIT": "inetd.service"}
    assert parser.parse(syslog("popa3d", "connect from 127.25.0.2 (127.25.0.2)", 100.0, **inetd)) is None
    login = parser.parse(syslog("popa3d", "Authentication passed for alice", 101.5, uid=20000, **inetd))
    assert login == Login("127.25.0.2", 101.5, "alice", "popa3d")


def test_popa3d_logins_grant_under_a_plain_journald_once_the_admin_names_the_mail_users(tmp_path):
    parser = correlated_parser(tmp_path, "[Source:popa3d]\nLoginUsers=20000\n")
    parser.parse(syslog("popa3d", "connect from ::1 (::1)", 100.0))
    assert parser.parse(syslog("popa3d", "Authentication passed for alice", 101.0, uid=20000)).address == "::1"


def test_mailutils_logins_take_the_address_the_listener_logged_for_the_same_session(tmp_path):
    parser = correlated_parser(tmp_path)
    parser.parse(syslog("pop3d", "2AQEMFkv connect from 127.24.0.12", 100.0, pid=7705))
    parser.parse(syslog("pop3d", "2AQEMFkv inet://127.24.0.12:57433: undefined ACL result; access allowed", 100.0,
                        pid=7705))
    parser.parse(syslog("pop3d", "2AQEM0kq connect from 0:0:0:0:0:0:0:1", 100.2, pid=7705))
    assert parser.parse(syslog("pop3d", "2AQEM0kq POP3 login: user `bob', source system", 100.4, pid=7746)) \
        == Login("::1", 100.4, "bob", "mailutils")
    assert parser.parse(syslog("pop3d", "2AQEMFkv POP3 login: user `alice', source system", 100.5, pid=7788)) \
        == Login("127.24.0.12", 100.5, "alice", "mailutils")


def test_a_login_whose_address_line_was_never_seen_grants_nothing(tmp_path):
    # Say the reader started after it: failing closed, the next login of the client grants.
    parser = correlated_parser(tmp_path)
    assert parser.parse(syslog("pop3d", "2AQEMFkv POP3 login: user `alice', source system", 100.5)) is None


def test_the_remembered_connections_are_bounded_in_number_and_age():
    connections = Connections(Correlation("pid", (), (), max_age=600.0, max_size=3))
    for number in range(5):
        connections.remember(number, f"192.0.2.{number}", 1000.0 + number)
    assert len(connections) == 3
    assert connections.take(0, 1005.0) is None and connections.take(1, 1005.0) is None
    assert connections.take(4, 1005.0) == "192.0.2.4"
    connections.remember("late", "192.0.2.9", 1700.0)  # everything older than ten minutes goes
    assert len(connections) == 1
    assert connections.take("late", 2300.5) is None  # too old by then


def test_a_connection_address_is_taken_once():
    connections = Connections(Correlation("pid", (), (), max_age=600.0, max_size=10))
    connections.remember("k", "192.0.2.1", 10.0)
    assert connections.take("k", 11.0) == "192.0.2.1"
    assert connections.take("k", 12.0) is None


def test_a_pid_serving_a_new_connection_takes_its_new_address_but_a_session_id_never_changes_address():
    by_pid = Connections(Correlation("pid", (), (), 600.0, 10))
    by_pid.remember("k", "192.0.2.1", 10.0)
    by_pid.remember("k", "192.0.2.2", 20.0)
    assert by_pid.take("k", 21.0) == "192.0.2.2"
    by_session = Connections(Correlation("session", (), (), 600.0, 10))
    by_session.remember("k", "192.0.2.1", 10.0)
    by_session.remember("k", "192.0.2.1", 10.1)  # connect from ... and inet://...: the same address
    assert by_session.take("k", 11.0) == "192.0.2.1"
    by_session.remember("k", "192.0.2.1", 10.0)
    by_session.remember("k", "192.0.2.2", 10.1)
    assert by_session.take("k", 11.0) is None


def test_correlation_time_is_the_entries_own_however_long_ago_they_were_written(tmp_path):
    # Catching up on a year-old journal pairs lines exactly as it would have live.
    parser = correlated_parser(tmp_path, "[Source:popa3d]\nLoginUsers=20000\n")
    parser.parse(syslog("popa3d", "connect from 127.25.0.3 (127.25.0.3)", 1_000_000.0))
    assert parser.parse(syslog("popa3d", "Authentication passed for a", 1_000_599.0, uid=20000)).address \
        == "127.25.0.3"


def test_lines_that_end_an_unauthenticated_popa3d_connection_forget_its_address(tmp_path):
    parser = correlated_parser(tmp_path, "[Source:popa3d]\nLoginUsers=20000\n")
    parser.parse(syslog("popa3d", "connect from 127.25.0.5 (127.25.0.5)", 100.0))
    assert parser.pending_connections("popa3d") == 1
    parser.parse(syslog("popa3d", "Authentication failed for alice", 101.0, uid=108))
    assert parser.pending_connections("popa3d") == 0


class CountingEntry(dict):
    """An entry that counts each field read, as each is a call into the journal."""

    def __init__(self, *arguments, **fields):
        super().__init__(*arguments, **fields)
        self.reads: list[str] = []

    def get(self, key, default=None):
        self.reads.append(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.reads.append(key)
        return super().__getitem__(key)


@pytest.mark.parametrize("message", [
    "counts: retr=<0> top=<0> dele=<0>",
    "pop3(alice)<5654><b7aS8S1hfbZ/AAAF>: Disconnected: Logged out top=0/0, retr=0/0, del=0/0, size=0",
    "process 7740 finished with code 0 (Normal termination)",
])
def test_an_entry_no_pattern_reads_costs_one_field_read(tmp_path, message):
    parser = correlated_parser(tmp_path, names=list(SERVERS))
    entry = CountingEntry(syslog("pop3d", message, 100.0))
    assert parser.parse(entry) is None
    assert entry.reads == ["MESSAGE"]


def test_only_lines_of_a_correlated_source_read_more_fields_than_a_login_needs(tmp_path):
    parser = correlated_parser(tmp_path, names=list(SERVERS))
    entry = CountingEntry(syslog("pop3d", "LOGIN, user=alice, ip=[::ffff:127.22.0.2], port=[59515]", 100.0))
    assert parser.parse(entry).source == "courier"
    assert "_PID" not in entry.reads and "_BOOT_ID" not in entry.reads


# --- format drift ------------------------------------------------------------------------------

DRIFTED = ("imap-login: Logged in: user=<alice>, method=PLAIN, rip=192.0.2.60, lip=192.0.2.1, mpid=1, TLS, "
           "session=<abc>, sni=<mail.example.org>")


def test_a_trusted_line_that_looks_like_a_login_but_no_pattern_reads_is_reported(parser):
    assert parser.examine(dovecot_entry(DRIFTED)) == Unmatched("dovecot", DRIFTED, 1795699814.61423)


def test_examine_returns_the_login_when_a_pattern_reads_it(parser):
    assert parser.examine(dovecot_entry(SUCCESSES[0][0])) == parser.parse(dovecot_entry(SUCCESSES[0][0]))


@pytest.mark.parametrize("message", [message for message in NOT_LOGINS if "not-an-address" not in message])
def test_failures_and_other_lines_are_not_reported_as_unread_logins(parser, message):
    assert parser.examine(dovecot_entry(message)) is None


def test_a_login_line_whose_address_no_pattern_can_read_is_reported(parser):
    message = "pop3-login: Login: user=<alice>, method=PLAIN, rip=not-an-address, lip=127.0.0.1, session=<x>"
    assert parser.examine(dovecot_entry(message)).source == "dovecot"


def test_an_untrusted_line_is_never_reported_as_an_unread_login(parser):
    # A local user could otherwise fill the log with warnings.
    assert parser.examine(dovecot_entry(DRIFTED, _UID="1000")) is None


def test_without_trust_checking_every_unread_login_looking_line_is_reported(tmp_path):
    path = tmp_path / "poplock.conf"
    path.write_text("")
    parser = LoginParser(build_sources(load_config(str(path))).values(), check_trust=False)
    assert parser.examine(dovecot_entry(DRIFTED, _UID="1000")).source == "dovecot"


def test_an_admin_hint_reports_the_lines_it_matches(tmp_path):
    path = tmp_path / "poplock.conf"
    path.write_text("[Source:dovecot]\nHint=-login: .*rip=\n")
    parser = LoginParser(build_sources(load_config(str(path))).values())
    message = "pop3-login: Welcome: user=<a>, rip=192.0.2.61"
    assert parser.examine(dovecot_entry(message)).message == message


def unmatched(at: float, source: str = "dovecot", message: str = DRIFTED) -> Unmatched:
    return Unmatched(source, message, at)


def test_drift_is_reported_once_unread_logins_have_gone_on_for_the_grace_period():
    drift = UnmatchedLogins(grace=300.0)
    assert drift.add(unmatched(1000.0)) is None
    assert drift.add(unmatched(1200.0)) is None
    assert drift.add(unmatched(1300.0)) == Drift("dovecot", 3, 1000.0, unmatched(1300.0), None)
    assert drift.add(unmatched(1310.0)) is None  # counting starts again


def test_drift_is_due_by_journal_time_even_when_no_later_line_comes():
    drift = UnmatchedLogins(grace=300.0)
    drift.add(unmatched(1000.0))
    assert drift.due(1299.0) == []
    assert drift.due(1300.0) == [Drift("dovecot", 1, 1000.0, unmatched(1000.0), None)]
    assert drift.due(5000.0) == []


def test_drift_says_when_the_source_last_had_a_login_read_and_keeps_sources_apart():
    drift = UnmatchedLogins(grace=60.0)
    drift.login(Login("192.0.2.1", 990.0, "alice", "dovecot"))
    drift.add(unmatched(1000.0))
    drift.add(unmatched(1010.0, source="courier", message="LOGIN, user=a, ip=[x], port=[1], tls=1"))
    reports = drift.due(1070.0)
    assert [(report.source, report.count, report.last_login) for report in reports] == [
        ("dovecot", 1, 990.0), ("courier", 1, None)]


def test_with_no_grace_every_unread_login_is_reported_at_once():
    assert UnmatchedLogins(grace=0).add(unmatched(5.0)).count == 1


def test_a_trusted_login_line_whose_connection_gave_no_address_is_reported(tmp_path):
    # mailutils without `connect from ${address}` in its acl, say.
    parser = correlated_parser(tmp_path)
    message = "2AQEMFkv POP3 login: user `alice', source system"
    assert parser.examine(syslog("pop3d", message, 100.5)) == Unmatched("mailutils", message, 100.5, NO_ADDRESS)
    assert parser.examine(syslog("pop3d", message, 100.5, uid=1000)) is None  # not trusted: no report
