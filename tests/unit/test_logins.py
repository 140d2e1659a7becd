"""Login parsing on real Dovecot 2.3 lines (recorded from Dovecot on this kind of machine) and 2.4's wording."""

import pytest

from poplock.config import load_config
from poplock.logins import Login, LoginParser
from poplock.sources import build_sources

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
