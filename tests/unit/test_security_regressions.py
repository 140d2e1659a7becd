"""Every way found to make poplock grant what it must not: each stays here as a regression test.

Attacker-controlled text (user names, anything a client sends, anything a local user
can log) must never produce a grant, whatever the server echoes into its log.
"""

import pwd

import pytest

from poplock.config import load_config
from poplock.logins import LoginParser
from poplock.sources import build_sources

GENUINE = ("pop3-login: Login: user=<alice>, method=PLAIN, rip=203.0.113.66, lip=192.0.2.1, mpid=5654, "
           "session=<b7aS8S1hfbZ/AAAF>")


@pytest.fixture(scope="module")
def parser(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "poplock.conf"
    path.write_text("")
    return LoginParser(build_sources(load_config(str(path))).values())


def entry(message: str, **trusted) -> dict:
    fields = {"MESSAGE": message, "SYSLOG_IDENTIFIER": "dovecot", "_UID": "0", "__REALTIME_TIMESTAMP": "1795699814000000"}
    fields.update(trusted)
    return fields


def test_logger_t_dovecot_by_a_local_user_grants_nothing(parser):
    # `logger -t dovecot "pop3-login: Login: ... rip=203.0.113.66 ..."` run by uid 1000
    assert parser.parse(entry(GENUINE, _UID="1000", _COMM="logger")) is None


def test_syslog_from_a_web_script_as_www_data_grants_nothing(parser):
    www_data = str(pwd.getpwnam("www-data").pw_uid)
    assert parser.parse(entry(GENUINE, _UID=www_data, _COMM="php-fpm8.2")) is None


def test_a_forgery_from_another_unit_grants_nothing_even_as_root(parser):
    assert parser.parse(entry(GENUINE, _SYSTEMD_UNIT="apache2.service", _UID="0")) is None


def test_a_stale_comm_does_not_make_an_entry_trusted(parser):
    assert parser.parse(entry(GENUINE, _UID="1000", _COMM="log", _EXE="/usr/lib/dovecot/log")) is None


# Real Dovecot 2.3 output for failed logins with crafted user names: Dovecot copies the
# attempted name into the line unescaped.
CRAFTED_FAILURES = [
    "pop3-login: Disconnected: Connection closed (auth failed, 1 attempts in 2 secs): user=<x, rip=203.0.113.9>, "
    "method=PLAIN, rip=127.0.0.7, lip=127.0.0.1, session=<SRGq8S1hGZl/AAAH>",
    "auth: plain(?,127.0.0.7,<SRGq8S1hGZl/AAAH>): Username character disallowed by auth_username_chars: 0x2c "
    "(username: x, rip=203.0.113.9)",
    "pop3-login: Disconnected: Connection closed (auth failed, 1 attempts in 2 secs): user=<a>, method=PLAIN, "
    "rip=203.0.113.10, lip=127.0.0.1, mpid=1, session=<x>>, method=PLAIN, rip=127.0.0.8, lip=127.0.0.1, "
    "session=<96LI8S1hcaR/AAAI>",
    "auth: plain(?,127.0.0.8,<96LI8S1hcaR/AAAI>): Username character disallowed by auth_username_chars: 0x3e "
    "(username: a>, method=PLAIN, rip=203.0.113.10, lip=127.0.0.1, mpid=1, session=<x>)",
    # The whole success line as a user name, in an auth error (Dovecot logs the attempted name).
    "auth: Error: Username character disallowed by auth_username_chars: 0x3a (username: x Login: user=<x>, "
    "method=PLAIN, rip=203.0.113.11, lip=192.0.2.1, mpid=1, session=<x>)",
    "imap-login: Disconnected: Aborted login by logging out (auth failed, 1 attempts in 2 secs): "
    "user=<pop3-login: Login: user=<x>, method=PLAIN, rip=203.0.113.12, lip=127.0.0.1, mpid=1, session=<a>>, "
    "method=PLAIN, rip=127.0.0.9, lip=127.0.0.1, session=<Q2Fv8S1hRIF/AAAJ>",
]


@pytest.mark.parametrize("message", CRAFTED_FAILURES)
def test_a_failed_login_with_a_crafted_user_name_grants_nothing(parser, message):
    assert parser.parse(entry(message)) is None


def test_a_crafted_user_name_in_a_successful_login_cannot_choose_the_address(parser):
    # Should a passdb ever accept such a name, the address is still the server's own rip=.
    message = ("pop3-login: Login: user=<x>, method=PLAIN, rip=203.0.113.13, lip=127.0.0.1, mpid=1, "
               "session=<a>, method=PLAIN, rip=127.0.0.5, lip=127.0.0.1, mpid=77, session=<Q2Fv8S1hRIF/AAAJ>")
    assert parser.parse(entry(message)).address == "127.0.0.5"


def test_an_ip_looking_user_name_is_not_the_client_address(parser):
    message = ("pop3-login: Login: user=<198.51.100.7>, method=PLAIN, rip=127.0.0.5, lip=127.0.0.1, "
               "mpid=9, session=<Q2Fv8S1hRIF/AAAJ>")
    assert parser.parse(entry(message)).address == "127.0.0.5"


def test_a_login_line_with_trailing_text_grants_nothing(parser):
    assert parser.parse(entry(GENUINE + " rip=203.0.113.99")) is None
    assert parser.parse(entry(GENUINE + "\nrip=203.0.113.99")) is None


def test_a_login_line_that_does_not_start_the_message_grants_nothing(parser):
    assert parser.parse(entry("auth: " + GENUINE)) is None
