"""Every way found to make poplock grant what it must not: each stays here as a regression test.

Attacker-controlled text (user names, anything a client sends, anything a local user
can log) must never produce a grant, whatever the server echoes into its log.
"""

import pwd

import pytest

from poplock.config import load_config
from poplock.logins import LoginParser
from poplock.servers import SERVERS
from poplock.sources import build_sources

GENUINE = ("pop3-login: Login: user=<alice>, method=PLAIN, rip=203.0.113.66, lip=192.0.2.1, mpid=5654, "
           "session=<b7aS8S1hfbZ/AAAF>")


@pytest.fixture(scope="module")
def parser(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "poplock.conf"
    path.write_text("")
    return LoginParser(build_sources(load_config(str(path))).values())


def entry(message: str, **trusted) -> dict:
    fields = {"MESSAGE": message, "SYSLOG_IDENTIFIER": "dovecot", "_UID": "0",
              "__REALTIME_TIMESTAMP": "1795699814000000"}
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


# --- every built-in server ---------------------------------------------------------------------
# Unless a test says otherwise, lines are as the server's own root process writes them under a
# plain journald (the recorded corpus has the originals); the mail users of the servers that
# log logins as the mail user are uids 20000 and up (LoginUsers), local shell users 1000 and up.


MAIL_USERS = "20000 20001 20002"
# poplock-logauth runs as the chain's user: here a vpopmail-like uid 20100, set by the admin.
EVERY_SOURCE_SETTINGS = "[Source:cyrus]\nUsers=107\n[Source:logauth]\nUsers=20100\n" + "".join(
    f"[Source:{name}]\nLoginUsers={MAIL_USERS}\n" for name in ("popa3d", "mailutils", "solid-pop3d"))
T0 = 1795702000.0


@pytest.fixture
def every_source(tmp_path):
    path = tmp_path / "poplock.conf"
    path.write_text(EVERY_SOURCE_SETTINGS)
    return list(build_sources(load_config(str(path)), list(SERVERS)).values())


@pytest.fixture
def parser_for_all(every_source):
    return LoginParser(every_source)


def line(identifier: str, message: str, *, uid: int | None = None, pid: int = 4000, at: float = 0.0,
         **trusted) -> dict:
    """An entry as journald stores it; by default written by the server's own account (Cyrus: 107)."""
    if uid is None:
        uid = 107 if identifier.startswith("cyrus/") else 20100 if identifier == "poplock-logauth" else 0
    fields = {"MESSAGE": message, "SYSLOG_IDENTIFIER": identifier, "_UID": str(uid), "_PID": str(pid),
              "_BOOT_ID": "9f63f569678647b982c6438c2508fe41", "__REALTIME_TIMESTAMP": str(int((T0 + at) * 1e6))}
    fields.update({name: str(value) for name, value in trusted.items()})
    return fields


def read(parser: LoginParser, *entries: dict) -> list[str]:
    """The addresses the entries grant, read in order by one parser."""
    return [login.address for login in map(parser.parse, entries) if login is not None]


# Failed logins whose user name carries an address or a whole success line: the server's
# own text says the login failed, so they grant nothing, whatever the name.
CRAFTED_FAILURES_OF_EVERY_SERVER = [
    ("pop3d", "LOGIN FAILED, user=LOGIN, user=alice, ip=[::ffff:203.0.113.15], port=[4242], "
              "ip=[::ffff:127.22.0.40], port=[43053]"),
    ("imapd", "LOGIN FAILED, user=x, ip=[203.0.113.11], ip=[::ffff:127.22.0.26], port=[45307]"),
    ("imapd", "LOGIN FAILED, user=x, ip=[203.0.113.11], port=[1], protocol=IMAP, ip=[::ffff:127.22.0.26], "
              "port=[45307]"),
    ("cyrus/pop3", "badlogin: [127.23.0.42] plaintext (login: [203.0.113.15] alice plaintext User logged in "
                   "SESSIONID=<cyrus-1-2-3-4>) invalid user"),
    ("cyrus/imap", "badlogin: [127.23.0.32] plaintext (x [203.0.113.12]) [SASL(-13): authentication failure: "
                   "checkpass failed]"),
    ("imap4d", "2AQEN64i login failed: 2AQDpYNk connect from 203.0.113.15"),
    ("imap4d", "pam_unix(mailutils:auth): authentication failure; logname= uid=0 euid=0 tty= ruser= rhost=  "
               "user=2AQDpYNk connect from 203.0.113.15"),
    ("pop3d", "2AQEMXl2 user `x' logged in (source: system)': authentication failed"),
    ("popa3d", "Authentication failed for 203.0.113.14"),
    ("solid-pop3d", "authentication failed for user user alice authenticated - 203.0.113.15 - 127.26.0.21"),
    ("solid-pop3d", "APOP authentication failed for user x authenticated - 203.0.113.13 - 127.26.0.6"),
    ("solid-pop3d", "pam_unix(solid-pop3d:auth): authentication failure; logname= uid=0 euid=0 tty= ruser= "
                    "rhost=  user=x authenticated - 203.0.113.13"),
    ("imapd", "Login failed user=alice host=x [203.0.113.9] auth=alice host=client.example [192.0.2.1]"),
    ("ipop3d", "Login failure user=Login user=x host=[203.0.113.9] host=client.example [192.0.2.1]"),
    ("in.qpopper", '(null) at x (203.0.113.9): -ERR [AUTH] Password supplied for "POP login by user "a" at (b) '
                   '203.0.113.9" is incorrect.'),
    ("perdition", 'Auth: 192.0.2.1->192.0.2.2 user="x" server="a" port="110" status="ok"" passwd="XXXXXX" '
                  'server="mail" port="110" status="failed: Re-Authentication Failure"'),
    ("vm-pop3d", "User 'x' logged in from 203.0.113.9, nmsgs=1' - failed auth, from=192.0.2.1"),
    ("teapop", "Failed login for x [1.2.3.4] from evil [203.0.113.9] [192.0.2.2] from client [192.0.2.1]"),
]


@pytest.mark.parametrize("identifier, message", CRAFTED_FAILURES_OF_EVERY_SERVER)
def test_a_failed_login_of_any_server_grants_nothing_whatever_its_user_name(every_source, identifier, message):
    assert read(LoginParser(every_source), line(identifier, message)) == []
    assert read(LoginParser(every_source, check_trust=False), line(identifier, message)) == []


# Accepted logins whose user name puts a second address before the server's own (or, for
# Cyrus, after it): the server's structure says which one is its own.
CRAFTED_NAMES_IN_SUCCESSES = [
    ("imapd", "LOGIN, user=x, ip=[203.0.113.11], ip=[::ffff:127.22.0.27], port=[50529], protocol=IMAP",
     "127.22.0.27"),
    ("pop3d", "LOGIN, user=LOGIN, user=alice, ip=[::ffff:203.0.113.15], port=[4242], ip=[::ffff:127.22.0.41], "
              "port=[55831]", "127.22.0.41"),
    ("pop3d", "LOGIN, user=x, ip=[203.0.113.9], port=[1], protocol=IMAP, ip=[::ffff:192.0.2.5], port=[2]",
     "192.0.2.5"),
    ("pop3d", "LOGIN, user=198.51.100.7, ip=[::ffff:127.22.0.21], port=[54211]", "127.22.0.21"),
    ("cyrus/imap", "login: [127.23.0.33] x [203.0.113.12] plaintext User logged in "
                   "SESSIONID=<cyrus-1795702989-7734-1-18362941838208235486>", "127.23.0.33"),
    ("cyrus/imap", "login: [127.23.0.25] 198.51.100.7 plaintext User logged in SESSIONID=<cyrus-1-2-3>",
     "127.23.0.25"),
    ("cyrus/imap", "login: 198.51.100.99.example.net [127.23.9.9] alice plaintext User logged in", "127.23.9.9"),
    ("solid-pop3d", "user x authenticated - 203.0.113.13 authenticated - 127.26.0.18", "127.26.0.18"),
    ("solid-pop3d", "user user alice authenticated - 203.0.113.15 authenticated - 127.26.0.22", "127.26.0.22"),
    ("solid-pop3d", "user x - h (203.0.113.5) authenticated - 198.51.100.99 (127.26.9.9)", "127.26.9.9"),
    ("solid-pop3d", "user 198.51.100.7 authenticated - 127.26.0.12", "127.26.0.12"),
    ("imapd", "Login user=x host=evil [203.0.113.9] host=client.example [192.0.2.1]", "192.0.2.1"),
    ("ipop3d", "Login user=x host=[203.0.113.9] nmsgs=1/1 host=[192.0.2.1] nmsgs=0/0", "192.0.2.1"),
    ("in.qpopper", '(v4.0.9) POP login by user "x" at (evil) 203.0.113.9" at (client.example) 192.0.2.1',
     "192.0.2.1"),
    ("vm-pop3d", "User 'x' logged in from 203.0.113.9, nmsgs=1' logged in from 192.0.2.1, nmsgs=0", "192.0.2.1"),
    ("teapop", "Successful login for x [1.2.3.4] from evil [203.0.113.9] [192.0.2.2] from client [192.0.2.1]",
     "192.0.2.1"),
    ("perdition", 'Auth: 192.0.2.1->192.0.2.2 user="Auth: 203.0.113.9->1.1.1.1 user=" passwd="XXXXXX" '
                  'server="mail" port="110" status="ok"', "192.0.2.1"),
    # poplock-logauth writes the address first; the user name (checkpassword's $USER) comes after.
    ("poplock-logauth", "successful POP3 login from 192.0.2.1 (user x) from 203.0.113.9 (user y)", "192.0.2.1"),
    ("poplock-logauth", "successful IMAP login from 192.0.2.1 (user 198.51.100.7)", "192.0.2.1"),
]


@pytest.mark.parametrize("identifier, message, address", CRAFTED_NAMES_IN_SUCCESSES)
def test_a_user_name_never_chooses_the_address_of_a_successful_login(every_source, identifier, message, address):
    assert read(LoginParser(every_source), line(identifier, message)) == [address]


def test_a_uw_host_name_cut_off_before_its_address_is_ambiguous_and_grants_nothing(parser_for_all):
    # UW prints host= with at most 80 characters; a long client host name loses the
    # [address], or part of it. The line then has no address of the server's own.
    name = "a" * 70 + ".example.net"
    assert read(parser_for_all, line("imapd", f"Login user=alice host={name[:80]}")) == []
    assert read(parser_for_all, line("imapd", f"Login user=alice host={'b' * 64} [203.0.113.12")) == []
    # ... even when the user name supplies a complete host= of its own.
    assert read(parser_for_all, line("imapd", f"Login user=a host=x [203.0.113.9] host={name[:80]}")) == []


# --- lines written on different lines of one connection ----------------------------------------

POPA3D_CONNECT = "connect from 192.0.2.10 (192.0.2.10)"


def test_popa3d_logins_grant_nothing_under_a_plain_journald_by_default(tmp_path):
    # Its login line is written as the mail user, whose uid any local user with a mailbox shares.
    path = tmp_path / "poplock.conf"
    path.write_text("")
    parser = LoginParser(build_sources(load_config(str(path)), ["popa3d"]).values())
    assert read(parser, line("popa3d", POPA3D_CONNECT),
                line("popa3d", "Authentication passed for alice", uid=20000, at=1)) == []


def test_a_local_users_popa3d_login_line_with_a_recycled_pid_grants_nothing(parser_for_all):
    # The attacker connects from 203.0.113.66 and leaves; popa3d says so; a process of a
    # local user later gets the same pid and logs a login line.
    assert read(parser_for_all,
                line("popa3d", "connect from 203.0.113.66 (203.0.113.66)", pid=7736),
                line("popa3d", "Didn't attempt authentication", uid=108, pid=7736, at=1),
                line("popa3d", "Authentication passed for mallory", uid=1000, pid=7736, at=30),
                line("popa3d", "Authentication passed for alice", uid=20000, pid=7736, at=31)) == []


def test_a_popa3d_login_line_from_a_uid_not_in_login_users_grants_nothing(parser_for_all):
    assert read(parser_for_all, line("popa3d", POPA3D_CONNECT, pid=7736),
                line("popa3d", "Authentication passed for mallory", uid=1000, pid=7736, at=1)) == []


def test_an_address_line_a_local_user_wrote_gives_no_address(parser_for_all):
    assert read(parser_for_all, line("popa3d", "connect from 203.0.113.66 (203.0.113.66)", uid=1000, pid=7736),
                line("popa3d", "Authentication passed for alice", uid=20000, pid=7736, at=1)) == []


def test_an_address_line_written_as_a_login_user_gives_no_address(parser_for_all):
    # LoginUsers only ever confirm logins; a mail user writing "connect from" is a forgery.
    assert read(parser_for_all, line("popa3d", "connect from 203.0.113.66 (203.0.113.66)", uid=20000, pid=7736),
                line("popa3d", "Authentication passed for alice", uid=20000, pid=7736, at=1)) == []


def test_popa3d_address_and_login_from_different_boots_grant_nothing(parser_for_all):
    assert read(parser_for_all, line("popa3d", POPA3D_CONNECT, pid=7736),
                line("popa3d", "Authentication passed for alice", uid=20000, pid=7736, at=5,
                     _BOOT_ID="0123456789abcdef0123456789abcdef")) == []


def test_a_popa3d_address_older_than_ten_minutes_is_never_used(parser_for_all):
    assert read(parser_for_all, line("popa3d", POPA3D_CONNECT, pid=7736),
                line("popa3d", "Authentication passed for alice", uid=20000, pid=7736, at=601)) == []


def test_one_popa3d_connection_grants_once(parser_for_all):
    assert read(parser_for_all, line("popa3d", POPA3D_CONNECT, pid=7736),
                line("popa3d", "Authentication passed for alice", uid=20000, pid=7736, at=1),
                line("popa3d", "Authentication passed for alice", uid=20000, pid=7736, at=2)) == ["192.0.2.10"]


def test_under_systemd_popa3d_lines_count_only_from_its_units(every_source):
    parser = LoginParser(every_source)
    inetd = {"_SYSTEMD_UNIT": "inetd.service"}
    assert read(parser, line("popa3d", POPA3D_CONNECT, pid=7736, **inetd),
                line("popa3d", "Authentication passed for alice", uid=1000, pid=7736, at=1,
                     _SYSTEMD_UNIT="session-3.scope")) == []
    assert read(parser, line("popa3d", "connect from 203.0.113.66 (203.0.113.66)", pid=7737,
                             _SYSTEMD_UNIT="session-3.scope"),
                line("popa3d", "Authentication passed for alice", uid=20000, pid=7737, at=1, **inetd)) == []
    assert read(parser, line("popa3d", POPA3D_CONNECT, pid=7738, **inetd),
                line("popa3d", "Authentication passed for alice", uid=31337, pid=7738, at=1, **inetd)) \
        == ["192.0.2.10"]


MAILUTILS_CONNECT = "2AQEM74O connect from 192.0.2.20"


def test_an_imap4d_login_line_a_local_user_forged_with_a_real_session_id_grants_nothing(parser_for_all):
    # Session ids are no secret: the attacker connects from 203.0.113.77 and logs the login line.
    assert read(parser_for_all, line("imap4d", "2AQEM74X connect from 203.0.113.77", pid=7706),
                line("imap4d", "2AQEM74X user `mallory' logged in (source: system)", uid=1000, pid=9999, at=1)) == []


def test_imap4d_logins_grant_nothing_under_a_plain_journald_by_default(tmp_path):
    path = tmp_path / "poplock.conf"
    path.write_text("")
    parser = LoginParser(build_sources(load_config(str(path)), ["mailutils"]).values())
    assert read(parser, line("imap4d", MAILUTILS_CONNECT, pid=7706),
                line("imap4d", "2AQEM74O user `alice' logged in (source: system)", uid=20000, pid=7765, at=1)) == []
    # pop3d writes its login line as root: that one grants.
    assert read(parser, line("pop3d", "2AQELxkp connect from 192.0.2.21", pid=7705),
                line("pop3d", "2AQELxkp POP3 login: user `alice', source system", pid=7740, at=1)) \
        == ["192.0.2.21"]


def test_a_mailutils_address_line_a_local_user_wrote_gives_no_address(parser_for_all):
    assert read(parser_for_all, line("pop3d", "2AQELxkq connect from 203.0.113.78", uid=1000, pid=9999),
                line("pop3d", "2AQELxkq POP3 login: user `alice', source system", pid=7740, at=1)) == []


def test_a_mailutils_session_that_gives_two_addresses_grants_nothing(parser_for_all):
    assert read(parser_for_all, line("pop3d", "2AQELxkr connect from 192.0.2.22", pid=7705),
                line("pop3d", "2AQELxkr connect from 203.0.113.79", pid=7705),
                line("pop3d", "2AQELxkr POP3 login: user `alice', source system", pid=7741, at=1)) == []


def test_a_user_name_holding_a_session_and_an_address_takes_its_own_sessions_address(parser_for_all):
    assert read(parser_for_all, line("imap4d", "2AQDpYNk connect from 203.0.113.15", pid=7706),
                line("imap4d", "2AQEN84j connect from 127.24.0.45", pid=7706, at=1),
                line("imap4d", "2AQEN84j user `2AQDpYNk connect from 203.0.113.15' logged in (source: system)",
                     uid=20001, pid=7917, at=2)) == ["127.24.0.45"]


def test_courier_and_mailutils_both_logging_as_pop3d_do_not_read_each_others_lines(every_source):
    parser = LoginParser(every_source)
    assert parser.parse(line("pop3d", "LOGIN, user=alice, ip=[::ffff:192.0.2.30], port=[5]")).source == "courier"
    logins = [parser.parse(entry) for entry in (
        line("pop3d", "2AQELxks connect from 192.0.2.31", pid=7705),
        line("pop3d", "2AQELxks POP3 login: user `alice', source system", pid=7742, at=1))]
    assert [(login.source, login.address) for login in logins if login] == [("mailutils", "192.0.2.31")]
    # Under systemd each unit vouches for its own server only.
    assert parser.parse(line("pop3d", "LOGIN, user=alice, ip=[::ffff:192.0.2.32], port=[5]",
                             _SYSTEMD_UNIT="mailutils-pop3d.service")) is None
    assert read(parser, line("pop3d", "2AQELxkt connect from 192.0.2.33", pid=7705,
                             _SYSTEMD_UNIT="courier-pop.service"),
                line("pop3d", "2AQELxkt POP3 login: user `alice', source system", pid=7743, at=1,
                     _SYSTEMD_UNIT="mailutils-pop3d.service")) == []


def test_a_solid_pop3d_apop_line_written_as_the_mail_user_must_agree_with_the_roots_address(parser_for_all):
    apop = "user alice authenticated through APOP - 203.0.113.80"
    # No address line of that process: nothing.
    assert read(parser_for_all, line("solid-pop3d", apop, uid=20000, pid=7760)) == []
    # The process's address line says another address: nothing.
    assert read(parser_for_all, line("solid-pop3d", "connect from 192.0.2.40 (192.0.2.40)", pid=7761),
                line("solid-pop3d", apop, uid=20000, pid=7761, at=1)) == []
    # A uid that is not a login user: nothing.
    assert read(parser_for_all, line("solid-pop3d", "connect from 203.0.113.80", pid=7762),
                line("solid-pop3d", apop, uid=1000, pid=7762, at=1)) == []
    # The same address, from the same process: granted.
    assert read(parser_for_all, line("solid-pop3d", "connect from 203.0.113.80", pid=7763),
                line("solid-pop3d", apop, uid=20000, pid=7763, at=1)) == ["203.0.113.80"]


# --- what the MTA and TLS put in the journal ----------------------------------------------------

SUCCESS_LINES = [
    "pop3-login: Login: user=<a>, method=PLAIN, rip=203.0.113.90, lip=192.0.2.1, mpid=1, session=<x>",
    "LOGIN, user=a, ip=[::ffff:203.0.113.90], port=[1]",
    "login: [203.0.113.90] a plaintext User logged in SESSIONID=<x>",
    "user a authenticated - 203.0.113.90",
    '(v4.0.9) POP login by user "admin" at (203.0.113.90) 203.0.113.90',
    "Login user=a host=[203.0.113.90]",
]


@pytest.mark.parametrize("success", SUCCESS_LINES)
@pytest.mark.parametrize("identifier, template", [
    # A client's MAIL FROM as the MTAs log it (Nessus's POP-before-SMTP probe sends the qpopper line).
    ("postfix/smtpd", "NOQUEUE: reject: RCPT from unknown[203.0.113.90]: 554 5.7.1 <x@example.org>: Relay access "
                      "denied; from=<\"{}\"@example.org> to=<x@example.org> proto=ESMTP helo=<x>"),
    ("postfix/cleanup", "4D88D27C42E: message-id=<{}>"),
    ("sm-mta", "x1ABC: from=\"{}\"@example.org, size=0, class=0, nrcpts=0, proto=ESMTP, relay=[203.0.113.90]"),
    ("exim", "H=(x) [203.0.113.90] F=<\"{}\"@example.org> rejected RCPT <x@example.org>: relay not permitted"),
    # A TLS server name (SNI) a client chose, as a server's error line quotes it.
    ("dovecot", "imap-login: Error: SSL: Unknown SNI hostname {}"),
    ("imapd-ssl", "couriertls: Unknown SNI server name: {}"),
])
def test_a_success_line_inside_what_the_mta_or_tls_logs_grants_nothing(parser_for_all, every_source, identifier,
                                                                       template, success):
    entry = line(identifier, template.format(success))
    assert parser_for_all.parse(entry) is None
    assert LoginParser(every_source, check_trust=False).parse(entry) is None


def test_an_mta_line_that_is_exactly_a_success_line_grants_nothing(parser_for_all):
    # Only the source's identifiers or units select an entry, even from root.
    for success in SUCCESS_LINES:
        assert parser_for_all.parse(line("postfix/smtpd", success)) is None
        assert parser_for_all.parse(line("sm-mta", success)) is None


def test_a_login_line_logged_with_another_servers_identifier_grants_nothing(parser_for_all):
    # Dovecot's line under courier's identifier: no source both selects it and reads it.
    assert parser_for_all.parse(line("pop3d", SUCCESS_LINES[0])) is None
    assert parser_for_all.parse(line("cyrus/imap", SUCCESS_LINES[1])) is None


def test_an_ip_looking_user_name_of_a_correlated_server_is_not_its_address(parser_for_all):
    assert read(parser_for_all, line("popa3d", "connect from 127.25.0.10 (127.25.0.10)", pid=7801),
                line("popa3d", "Authentication passed for 198.51.100.7", uid=20001, pid=7801, at=1)) \
        == ["127.25.0.10"]
    assert read(parser_for_all, line("popa3d", "Authentication passed for 198.51.100.7", uid=20001, pid=7802)) == []


def test_every_built_in_server_has_crafted_lines_here():
    identifiers = {identifier for identifier, *_ in CRAFTED_FAILURES_OF_EVERY_SERVER + CRAFTED_NAMES_IN_SUCCESSES}
    uncovered = [name for name, server in SERVERS.items()
                 if name != "dovecot" and not identifiers & set(server.identifiers)]
    assert uncovered == []


def test_poplock_logauth_run_by_a_local_user_grants_nothing(every_source):
    # Anyone can run the program; only the chain's own uid (Users=) counts.
    forged = line("poplock-logauth", "successful POP3 login from 203.0.113.9 (user mallory)", uid=1000)
    genuine = line("poplock-logauth", "successful POP3 login from 192.0.2.1 (user alice)")
    assert read(LoginParser(every_source), forged, genuine) == ["192.0.2.1"]


def test_poplock_logauth_trusts_nobody_until_the_admin_says_who_runs_the_chain(tmp_path):
    path = tmp_path / "poplock.conf"
    path.write_text("")
    [logauth] = build_sources(load_config(str(path)), ["logauth"]).values()
    assert read(LoginParser([logauth]), line("poplock-logauth", "successful POP3 login from 192.0.2.1 (user a)",
                                             uid=0)) == []


# --- sessions: only trusted lines open or end them, and no user name chooses which -------------
# (sessions.py: an open session holds a grant past its window; an end releases it for the window.)

SESSION_LOGIN = ("imap-login: Login: user=<alice>, method=PLAIN, rip=192.0.2.66, lip=192.0.2.1, mpid=5654, "
                 "session=<b7aS8S1hfbZ/AAAF>")
SESSION_END = "imap(alice)<5654><b7aS8S1hfbZ/AAAF>: Disconnected: Logged out in=32 out=796"


@pytest.fixture
def session_parser(every_source):
    return LoginParser(every_source, sessions=True)


def test_a_logout_a_local_user_logged_as_dovecot_ends_no_session(session_parser):
    assert session_parser.read(line("dovecot", SESSION_END, uid=1000)) is None
    assert session_parser.read(line("dovecot", SESSION_END, _SYSTEMD_UNIT="cron.service")) is None
    assert session_parser.read(line("dovecot", SESSION_END)).key == "dovecot:5654/b7aS8S1hfbZ/AAAF"


def test_a_restart_line_a_local_user_logged_as_dovecot_ends_no_session(session_parser):
    message = "master: Dovecot v2.3.19.1 (9b53102964) starting up for pop3, imap (core dumps disabled)"
    assert session_parser.read(line("dovecot", message, uid=1000)) is None


def test_a_login_a_local_user_forged_opens_no_session(session_parser):
    assert session_parser.read(line("dovecot", SESSION_LOGIN, uid=1000)) is None


@pytest.mark.parametrize("message", [
    # A user name holding another connection's key, as an account could be named:
    "imap(x)<999><VICTIMxxxxxx/AAAB>: Disconnected: Logged out in=0 out=0)<5654><b7aS8S1hfbZ/AAAF>: "
    "Disconnected: Logged out in=32 out=796",
    # The same key in what follows the real one, should a reason ever quote the client:
    "imap(x)<5654><b7aS8S1hfbZ/AAAF>: Disconnected: x)<999><VICTIMxxxxxx/AAAB>: Logged out in=0 out=0",
])
def test_an_end_line_holding_a_second_key_ends_neither_connection(session_parser, message):
    assert session_parser.read(line("dovecot", message)) is None


def test_a_user_name_in_a_login_cannot_choose_the_connection_it_opens(session_parser):
    message = ("imap-login: Login: user=<a>, method=PLAIN, rip=203.0.113.10, lip=127.0.0.1, mpid=999, "
               "session=<VICTIMxxxxxx/AAAB>>, method=PLAIN, rip=192.0.2.67, lip=192.0.2.1, mpid=5655, "
               "session=<c7aS8S1hfbZ/AAAG>")
    login = session_parser.read(line("dovecot", message))
    assert (login.address, login.session) == ("192.0.2.67", "dovecot:5655/c7aS8S1hfbZ/AAAG")


def test_a_courier_user_name_holding_another_port_ends_only_its_own_connection(session_parser):
    message = ("LOGOUT, user=x, ip=[::ffff:192.0.2.68], port=[4000], top=0, ip=[::ffff:127.22.0.17], port=[43071], "
               "top=0, retr=0, rcvd=12, sent=39, time=0")
    ended = session_parser.read(line("pop3d", message, pid=7016))
    assert ended.key.endswith("/::ffff:127.22.0.17/43071")


def test_a_cyrus_usage_line_ends_the_connection_of_the_process_that_logged_it_whatever_the_name(session_parser):
    ended = session_parser.read(line("cyrus/imap", "USAGE x user: 0.1 sys: 0.1 user: 0.2 sys: 0.2", pid=7734))
    assert ended.key == "cyrus:9f63f5696786/7734"


def test_an_end_as_the_mail_user_ends_nothing_under_a_plain_journald(session_parser):
    # solid-pop3d and mailutils' children log their ends as the mail user: any process of that user could.
    assert session_parser.read(line("solid-pop3d", "session ended for user alice - 127.26.0.2", uid=20000)) is None
    assert session_parser.read(line("pop3d", "2AQELxkp session ended for user: alice", uid=20000)) is None
