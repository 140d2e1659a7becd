import pwd
from pathlib import Path

import pytest

from poplock.config import load_config
from poplock.errors import ConfigError
from poplock.sources import build_sources

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
        f"{path}:10: [Source:other] Pattern: not a valid regular expression: missing ), unterminated subpattern at position 0",
    ]


def test_a_source_that_trusts_or_selects_nothing_is_refused(tmp_path):
    path = tmp_path / "poplock.conf"
    path.write_text("[Reader]\nSources=bare\n[Source:bare]\nPattern=(?P<address>.*)\n")
    with pytest.raises(ConfigError) as caught:
        build_sources(load_config(str(path)))
    assert caught.value.problems == [
        f"{path}:4: [Source:bare]: trusts nothing: set Units= (systemd) or Users= (the server's uid)",
        f"{path}:4: [Source:bare]: selects nothing: set Identifiers= or Units=",
    ]


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
