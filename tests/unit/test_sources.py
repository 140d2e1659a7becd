import dataclasses
import pwd
from pathlib import Path

import pytest

from poplock.config import load_config
from poplock.errors import ConfigError
from poplock.logins import LoginParser
from poplock.servers import SERVERS
from poplock.sources import LOGIN_ONLY, TRUSTED, UNTRUSTED, build_sources

DOVECOT_LOGIN = ("pop3-login: Login: user=<alice>, method=PLAIN, rip=192.0.2.7, lip=192.0.2.1, "
                 "mpid=5654, session=<b7aS8S1hfbZ/AAAF>")


def config_from(tmp_path: Path, text: str):
    path = tmp_path / "poplock.conf"
    path.write_text(text)
    return load_config(str(path))


@pytest.fixture
def dovecot(tmp_path):
    return build_sources(config_from(tmp_path, ""))["dovecot"]


def test_dovecot_under_a_plain_journald_is_trusted_by_its_root_log_process(dovecot):
    assert dovecot.trusts({"_UID": "0", "SYSLOG_IDENTIFIER": "dovecot", "_COMM": "log"})


def test_dovecot_under_systemd_is_trusted_by_its_unit(dovecot):
    assert dovecot.trusts({"_UID": "0", "_SYSTEMD_UNIT": "dovecot.service"})
    assert dovecot.trusts({"_UID": "108", "_SYSTEMD_UNIT": "dovecot.service"})


def test_a_local_user_claiming_to_be_dovecot_is_not_trusted(dovecot):
    assert not dovecot.trusts({"_UID": "1000", "SYSLOG_IDENTIFIER": "dovecot", "_COMM": "dovecot"})


def test_a_web_script_claiming_to_be_dovecot_is_not_trusted(dovecot):
    www_data = str(pwd.getpwnam("www-data").pw_uid)
    assert not dovecot.trusts({"_UID": www_data, "SYSLOG_IDENTIFIER": "dovecot"})
    assert not dovecot.trusts({"_UID": www_data, "SYSLOG_IDENTIFIER": "dovecot",
                               "_SYSTEMD_UNIT": "php8.2-fpm.service"})


def test_under_systemd_the_unit_decides_even_for_root(dovecot):
    assert not dovecot.trusts({"_UID": "0", "SYSLOG_IDENTIFIER": "dovecot", "_SYSTEMD_UNIT": "cron.service"})


def test_an_entry_without_trusted_fields_is_not_trusted(dovecot):
    assert not dovecot.trusts({"SYSLOG_IDENTIFIER": "dovecot", "_COMM": "log"})


def test_a_source_can_be_told_its_unit_and_user(tmp_path):
    source = build_sources(config_from(
        tmp_path, "[Source:dovecot]\nUnits=dovecot@mail.service\nUsers=root 108\n"))["dovecot"]
    assert source.trusts({"_SYSTEMD_UNIT": "dovecot@mail.service", "_UID": "5"})
    assert not source.trusts({"_SYSTEMD_UNIT": "dovecot.service", "_UID": "0"})
    assert source.trusts({"_UID": "108"})
    assert source.journal_matches() == ["SYSLOG_IDENTIFIER=dovecot", "_SYSTEMD_UNIT=dovecot@mail.service"]


def test_an_admin_defined_source_needs_a_pattern_with_an_address_group(tmp_path):
    path = tmp_path / "poplock.conf"
    path.write_text(
        "[Reader]\nSources=dovecot mypop\n"
        "[Source:mypop]\nIdentifiers=mypop\nUsers=root\nPattern=login ok from (?P<client>\\S+)\n"
        "[Source:other]\nIdentifiers=other\nUsers=nosuchuser-xyz\nPattern=(unclosed\n"
    )
    with pytest.raises(ConfigError) as caught:
        build_sources(load_config(str(path)))
    assert caught.value.problems == [
        f"{path}:6: [Source:mypop] Pattern: needs a named group (?P<address>...)",
        f"{path}:9: [Source:other] Users: no such user 'nosuchuser-xyz'",
        f"{path}:10: [Source:other] Pattern: not a valid regular expression: missing ), "
        "unterminated subpattern at position 0",
    ]


def test_a_source_that_trusts_or_selects_nothing_is_refused(tmp_path):
    path = tmp_path / "poplock.conf"
    path.write_text("[Reader]\nSources=bare\n[Source:bare]\nPattern=(?P<address>.*)\n")
    with pytest.raises(ConfigError) as caught:
        build_sources(load_config(str(path)))
    assert caught.value.problems == [
        f"{path}:4: [Source:bare]: trusts nothing: set Units= (systemd) or Users= (the server's uid)",
        f"{path}:4: [Source:bare]: selects nothing: set Identifiers= or Units= "
        "(a Units= pattern with * only decides trust)",
    ]


def test_a_source_with_only_a_unit_pattern_selects_nothing(tmp_path):
    # A glob decides trust; the journal is searched by identifiers and exact unit names.
    path = tmp_path / "poplock.conf"
    path.write_text("[Reader]\nSources=mypop\n[Source:mypop]\nUnits=mypop@*.service\nPattern=(?P<address>.*)\n")
    with pytest.raises(ConfigError, match="selects nothing"):
        build_sources(load_config(str(path)))


def test_watching_an_unknown_source_names_the_line_that_asks_for_it(tmp_path):
    path = tmp_path / "poplock.conf"
    path.write_text("[Reader]\nSources=dovecot qpoper\n")
    with pytest.raises(ConfigError) as caught:
        build_sources(load_config(str(path)))
    assert caught.value.problems[0].startswith(f"{path}:2: [Reader] Sources: unknown source 'qpoper'")


def test_watching_nothing_is_refused(tmp_path):
    path = tmp_path / "poplock.conf"
    path.write_text("[Reader]\nSources=\n")
    with pytest.raises(ConfigError, match="is empty"):
        build_sources(load_config(str(path)))


# --- every built-in source; LoginUsers; users that do not exist here -----------------------------




def test_every_built_in_source_builds_when_not_watched(tmp_path):
    sources = build_sources(config_from(tmp_path, ""), list(SERVERS))
    assert list(sources) == list(SERVERS)


@pytest.mark.parametrize("name, identifiers, units, users", [
    ("courier", {"pop3d", "pop3d-ssl", "imapd", "imapd-ssl"},
     {"courier-pop.service", "courier-pop-ssl.service", "courier-imap.service", "courier-imap-ssl.service"},
     ("root",)),
    ("cyrus", {"cyrus/pop3", "cyrus/pop3s", "cyrus/imap", "cyrus/imaps"}, {"cyrus-imapd.service"}, ("cyrus",)),
    ("mailutils", {"pop3d", "imap4d"}, {"mailutils-pop3d.service", "mailutils-imap4d.service"}, ("root",)),
    ("popa3d", {"popa3d"}, {"inetd.service", "popa3d.service"}, ("root",)),
    ("solid-pop3d", {"solid-pop3d"}, {"inetd.service", "solid-pop3d.service"}, ("root",)),
])
def test_the_recorded_servers_defaults_are_what_they_were_seen_to_run_as(name, identifiers, units, users):
    server = SERVERS[name]
    assert identifiers <= set(server.identifiers)
    assert units <= set(server.units)
    assert server.users == users
    assert server.login_users == ()  # nothing trusted by the mail user's uid unless the admin says so


def test_a_missing_default_user_of_a_source_not_watched_is_no_error(tmp_path, monkeypatch):
    # Cyrus's default user, say, on a machine without Cyrus: `poplock scan --source cyrus` still works.
    monkeypatch.setitem(SERVERS, "cyrus", dataclasses.replace(SERVERS["cyrus"], users=("no-such-user-xyz",)))
    source = build_sources(config_from(tmp_path, ""), ["cyrus"])["cyrus"]
    assert source.unresolved_users == ("no-such-user-xyz",)
    assert not source.trusts({"_UID": "0"})


def test_a_missing_default_user_of_a_watched_source_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setitem(SERVERS, "cyrus", dataclasses.replace(SERVERS["cyrus"], users=("no-such-user-xyz",)))
    with pytest.raises(ConfigError) as caught:
        build_sources(config_from(tmp_path, "[Reader]\nSources=cyrus\n"))
    assert caught.value.problems == ["built-in source cyrus: [Source:cyrus] Users: no such user 'no-such-user-xyz'"]


def test_login_users_trust_a_line_less_than_users(tmp_path):
    source = build_sources(config_from(tmp_path, "[Source:popa3d]\nLoginUsers=20000 www-data\n"),
                           ["popa3d"])["popa3d"]
    www_data = str(pwd.getpwnam("www-data").pw_uid)
    assert source.trust_level({"SYSLOG_IDENTIFIER": "popa3d", "_UID": "0"}) == TRUSTED
    assert source.trust_level({"SYSLOG_IDENTIFIER": "popa3d", "_UID": "20000"}) == LOGIN_ONLY
    assert source.trust_level({"SYSLOG_IDENTIFIER": "popa3d", "_UID": www_data}) == LOGIN_ONLY
    assert source.trust_level({"SYSLOG_IDENTIFIER": "popa3d", "_UID": "1000"}) == UNTRUSTED
    assert not source.admits({"SYSLOG_IDENTIFIER": "popa3d", "_UID": "20000"})
    # Under systemd the unit alone decides.
    assert source.trust_level({"SYSLOG_IDENTIFIER": "popa3d", "_UID": "20000",
                               "_SYSTEMD_UNIT": "session-2.scope"}) == UNTRUSTED
    assert source.trust_level({"SYSLOG_IDENTIFIER": "popa3d", "_UID": "1000",
                               "_SYSTEMD_UNIT": "inetd.service"}) == TRUSTED


def test_login_users_need_a_source_whose_connection_lines_give_the_address(tmp_path):
    path = tmp_path / "poplock.conf"
    path.write_text("[Source:dovecot]\nLoginUsers=20000\n")
    with pytest.raises(ConfigError) as caught:
        build_sources(load_config(str(path)))
    assert caught.value.problems == [
        f"{path}:2: [Source:dovecot] LoginUsers: this source has no connection lines to take the address from; "
        "use Users= or Units="]


def test_units_may_be_glob_patterns_for_per_connection_services(tmp_path):
    source = build_sources(config_from(tmp_path, "[Source:popa3d]\nUnits=popa3d@*.service\n"),
                           ["popa3d"])["popa3d"]
    assert source.trusts({"_SYSTEMD_UNIT": "popa3d@7-192.0.2.1:110-198.51.100.2:40000.service", "_UID": "20000"})
    assert not source.trusts({"_SYSTEMD_UNIT": "popa3d.service", "_UID": "0"})
    assert source.journal_matches() == ["SYSLOG_IDENTIFIER=popa3d"]


def test_an_admin_defined_source_can_be_tried_before_it_is_watched(tmp_path):
    config = config_from(tmp_path, "[Source:mypop]\nIdentifiers=mypop\nUsers=root\n"
                                   "Pattern=OK login (?P<user>\\S+) from (?P<address>\\S+)\n")
    parser = LoginParser(build_sources(config, ["mypop"]).values())
    login = parser.parse({"MESSAGE": "OK login alice from ::ffff:192.0.2.70", "SYSLOG_IDENTIFIER": "mypop",
                          "_UID": "0", "__REALTIME_TIMESTAMP": "1700000000000000"})
    assert (login.address, login.user, login.source) == ("192.0.2.70", "alice", "mypop")


def test_an_admin_hint_that_is_no_regular_expression_is_refused_with_its_place(tmp_path):
    path = tmp_path / "poplock.conf"
    path.write_text("[Source:dovecot]\nHint=login: (\n")
    with pytest.raises(ConfigError) as caught:
        build_sources(load_config(str(path)))
    assert caught.value.problems[0].startswith(f"{path}:2: [Source:dovecot] Hint: not a valid regular expression")
