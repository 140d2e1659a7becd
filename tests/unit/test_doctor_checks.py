"""`poplock doctor`'s checks as pure functions of the facts gathered: each with a fact that passes
and one that fails."""

import pytest

from poplock.doctor import (
    FAIL,
    NO_STORE,
    NO_USER,
    OK,
    UNKNOWN,
    UNREADABLE,
    WARN,
    Position,
    Result,
    SourceActivity,
    check_allow_list,
    check_deny_list,
    check_dovecot_logging,
    check_listening,
    check_reader_answers,
    check_reader_position,
    check_reader_process,
    check_relay_restrictions,
    check_source_exists,
    check_source_logged,
    check_store_readable,
    exit_status,
    format_result,
    listen_place,
    listen_streams,
    lookup_place,
    parse_doveconf,
    postfix_name,
    resolve_place,
    split_restrictions,
)

NOW = 1_800_000_000.0
DOCUMENTED = ("permit_mynetworks, check_policy_service { unix:private/poplock, timeout=2s, try_limit=1, "
              "default_action=DUNNO }, reject_unauth_destination")


def test_a_failure_prints_its_remedy_on_the_next_line_and_a_pass_prints_none():
    assert format_result(Result(OK, "fine", "never shown")) == "ok    fine"
    assert format_result(Result(FAIL, "broken", "fix it")) == "FAIL  broken\n      fix it"


def test_the_exit_status_is_1_only_when_a_check_failed():
    assert exit_status([Result(OK, "a"), Result(WARN, "b"), Result("skip", "c")]) == 0
    assert exit_status([Result(OK, "a"), Result(FAIL, "b")]) == 1


# --- the reader -----------------------------------------------------------------------------------

def test_a_reader_that_answers_passes_one_that_listens_but_is_silent_or_absent_fails():
    assert check_reader_answers("/run/poplock/reader.sock", True, True).status == OK
    stuck = check_reader_answers("/run/poplock/reader.sock", False, True)
    assert stuck.status == FAIL and "does not answer" in stuck.what
    gone = check_reader_answers("/run/poplock/reader.sock", False, False)
    assert gone.status == FAIL and "not running" in gone.what and "enable --now" in gone.remedy


def test_a_reader_process_is_found_or_reported_missing():
    assert check_reader_process([4242]).status == OK
    assert check_reader_process([]).status == FAIL


def test_a_reader_with_nothing_unread_is_not_behind():
    assert check_reader_position(Position(True, True, 0, None), NOW, 10).status == OK


def test_entries_unread_for_longer_than_allowed_mean_the_reader_is_behind():
    behind = check_reader_position(Position(True, True, 3, NOW - 120), NOW, 10)
    assert behind.status == FAIL
    assert "has not read 3 journal entries" in behind.what and "2min ago" in behind.what


def test_entries_logged_just_now_are_being_read_not_behind():
    assert check_reader_position(Position(True, True, 1, NOW - 2), NOW, 10).status == OK


def test_a_reader_with_no_committed_position_fails_only_when_there_is_something_to_read():
    assert check_reader_position(Position(False, False, 0, None), NOW, 10).status == OK
    assert check_reader_position(Position(False, False, 5, NOW - 60), NOW, 10).status == FAIL


def test_a_committed_position_the_journal_no_longer_holds_fails():
    result = check_reader_position(Position(True, False, 4, NOW - 60), NOW, 10)
    assert result.status == FAIL and "rotated or vacuumed" in result.what


# --- the watched sources --------------------------------------------------------------------------

def test_a_source_exists_by_its_unit_file_or_else_by_its_user():
    assert check_source_exists("dovecot", ("dovecot.service",), ["dovecot.service"], frozenset({0}), ()).status == OK
    by_user = check_source_exists("dovecot", ("dovecot.service",), [], frozenset({0}), ())
    assert by_user.status == WARN and "Units=" in by_user.remedy
    assert check_source_exists("cyrus", ("cyrus-imapd.service",), [], frozenset(), ("cyrus",)).status == FAIL
    assert check_source_exists("custom", ("custom.service",), [], frozenset(), ()).status == FAIL


def test_a_source_that_logged_trusted_entries_passes():
    result = check_source_logged("dovecot", ["SYSLOG_IDENTIFIER=dovecot"], SourceActivity(5, 5, NOW - 30), NOW - 86400)
    assert result.status == OK and "5 times since" in result.what


def test_a_silent_source_fails_and_says_logins_in_a_file_never_arrive():
    result = check_source_logged("dovecot", ["SYSLOG_IDENTIFIER=dovecot"], SourceActivity(0, 0, None), NOW - 86400)
    assert result.status == FAIL and "log file" in result.remedy


def test_a_source_whose_entries_are_all_untrusted_fails_and_names_the_trust_settings():
    result = check_source_logged("dovecot", ["SYSLOG_IDENTIFIER=dovecot"], SourceActivity(7, 0, None), NOW - 86400)
    assert result.status == FAIL
    assert "none comes from a unit or user it trusts" in result.what and "Users=" in result.remedy


# --- Dovecot --------------------------------------------------------------------------------------

def test_doveconf_output_is_read_as_settings():
    assert parse_doveconf("log_path = syslog\ninfo_log_path = \n") == {"log_path": "syslog", "info_log_path": ""}


@pytest.mark.parametrize("settings", [
    {"log_path": "syslog", "info_log_path": ""},
    {"log_path": "", "info_log_path": ""},  # standard error: the journal under systemd
    {"log_path": "/var/log/dovecot-errors.log", "info_log_path": "syslog"},  # errors apart, logins to syslog
])
def test_dovecot_logging_its_logins_to_syslog_or_standard_error_passes(settings):
    assert check_dovecot_logging(settings, "/etc/dovecot/dovecot.conf").status == OK


@pytest.mark.parametrize(("settings", "file"), [
    ({"log_path": "/var/log/dovecot.log", "info_log_path": ""}, "/var/log/dovecot.log"),
    ({"log_path": "syslog", "info_log_path": "/var/log/dovecot-info.log"}, "/var/log/dovecot-info.log"),
])
def test_dovecot_logging_its_logins_to_a_file_fails(settings, file):
    result = check_dovecot_logging(settings, "/etc/dovecot/dovecot.conf")
    assert result.status == FAIL and file in result.what and "= syslog" in result.remedy


# --- Postfix --------------------------------------------------------------------------------------

def test_a_policy_service_with_attributes_is_one_word():
    assert split_restrictions(DOCUMENTED) == [
        "permit_mynetworks", "check_policy_service",
        "{ unix:private/poplock, timeout=2s, try_limit=1, default_action=DUNNO }", "reject_unauth_destination"]


def test_the_place_a_lookup_names_is_found_in_policy_services_and_socketmap_tables():
    assert lookup_place("{ unix:private/poplock, timeout=2s }") == "unix:private/poplock"
    assert lookup_place("socketmap:unix:private/poplock-socketmap:poplock") == "unix:private/poplock-socketmap"
    assert lookup_place("socketmap:inet:127.0.0.1:9000:poplock") == "inet:127.0.0.1:9000"
    assert lookup_place("cidr:/etc/postfix/clients.cidr") == "cidr:/etc/postfix/clients.cidr"


def test_the_documented_restrictions_pass():
    assert check_relay_restrictions("smtpd_relay_restrictions", DOCUMENTED).status == OK
    assert check_relay_restrictions("smtpd_relay_restrictions",
                                    "permit_mynetworks, check_client_access socketmap:unix:private/poplock-socketmap:"
                                    "poplock, reject_unauth_destination").status == OK


def test_a_policy_service_at_a_tcp_port_is_poplock_when_a_poplock_socket_unit_listens_there():
    text = "permit_mynetworks, check_policy_service inet:127.0.0.1:10040, reject_unauth_destination"
    assert check_relay_restrictions("smtpd_relay_restrictions", text).status == FAIL
    assert check_relay_restrictions("smtpd_relay_restrictions", text, ["inet:127.0.0.1:10040"]).status == OK


@pytest.mark.parametrize(("text", "expected"), [
    ("", "does not ask poplock"),
    ("permit_mynetworks, permit_sasl_authenticated, defer_unauth_destination", "does not ask poplock"),
    ("permit_mynetworks, reject_unauth_destination, check_policy_service unix:private/poplock", "only after"),
    ("permit_mynetworks, defer_unauth_destination, check_policy_service unix:private/poplock", "only after"),
    ("permit, check_policy_service unix:private/poplock, reject_unauth_destination", "open relay"),
    ("permit_mynetworks, check_policy_service unix:private/poplock", "nothing after it refuses"),
])
def test_restrictions_that_never_let_poplock_decide_or_let_everyone_relay_fail(text, expected):
    result = check_relay_restrictions("smtpd_relay_restrictions", text)
    assert result.status == FAIL and expected in result.what


def test_asking_poplock_before_permit_mynetworks_works_but_warns():
    text = "check_policy_service unix:private/poplock, permit_mynetworks, reject_unauth_destination"
    assert check_relay_restrictions("smtpd_relay_restrictions", text).status == WARN


def test_postfix_places_resolve_relative_to_the_queue_directory():
    assert resolve_place("unix:private/poplock", "/var/spool/postfix") == ("unix", "/var/spool/postfix/private/poplock")
    assert resolve_place("private/poplock", "/var/spool/postfix/") == ("unix", "/var/spool/postfix/private/poplock")
    assert resolve_place("unix:/run/poplock.sock", "/var/spool/postfix") == ("unix", "/run/poplock.sock")
    assert resolve_place("inet:127.0.0.1:10040", "/q") == ("inet", "127.0.0.1", 10040)
    assert resolve_place("inet:[::1]:10040", "/q") == ("inet", "::1", 10040)
    assert resolve_place("inet:127.0.0.1:x", "/q") is None


# --- socket units ---------------------------------------------------------------------------------

def test_a_drop_in_with_an_empty_listen_stream_replaces_the_units_places():
    unit = "[Socket]\nListenStream=/var/spool/postfix/private/poplock\nSocketMode=0660\n"
    drop_in = "[Socket]\nListenStream=\nListenStream=127.0.0.1:10040\n"
    assert listen_streams([unit]) == ["/var/spool/postfix/private/poplock"]
    assert listen_streams([unit, drop_in]) == ["127.0.0.1:10040"]
    assert listen_streams(["[Service]\nListenStream=/elsewhere\n"]) == []


def test_listen_stream_values_become_places_to_connect_to():
    assert listen_place("/run/x.sock") == ("unix", "/run/x.sock")
    assert listen_place("25") == ("inet", "127.0.0.1", 25)
    assert listen_place("0.0.0.0:25") == ("inet", "127.0.0.1", 25)
    assert listen_place("[::]:25") == ("inet", "::1", 25)
    assert listen_place("192.0.2.1:10040") == ("inet", "192.0.2.1", 10040)
    assert listen_place("@abstract") is None
    assert postfix_name(("inet", "127.0.0.1", 10040)) == "inet:127.0.0.1:10040"
    assert postfix_name(("unix", "/run/x.sock")) == "unix:/run/x.sock"


def test_a_place_that_accepts_passes_and_one_that_refuses_fails_with_the_unit_to_start():
    assert check_listening("poplock-policy.socket", ("unix", "/run/x"), None).status == OK
    result = check_listening("poplock-policy.socket", ("inet", "127.0.0.1", 10040), "Connection refused")
    assert result.status == FAIL and "127.0.0.1:10040" in result.what
    assert result.remedy == "`systemctl enable --now poplock-policy.socket`"


# --- the store and the lists ----------------------------------------------------------------------

def test_the_store_check_says_what_to_do_for_each_kind_of_problem():
    path = "/var/lib/poplock/grants.db"
    assert check_store_readable(path, "poplock", None).status == OK
    assert "systemd-sysusers" in check_store_readable(path, "poplock", (NO_USER, "")).remedy
    assert "poplock-reader creates it" in check_store_readable(path, "poplock", (NO_STORE, "")).remedy
    assert check_store_readable(path, "poplock", (UNKNOWN, "only root")).status == WARN
    denied = check_store_readable(path, "poplock", (UNREADABLE, "Permission denied"))
    assert denied.status == FAIL and "Permission denied" in denied.what


def test_an_allow_list_of_networks_passes_and_one_with_the_whole_internet_fails():
    assert check_allow_list("/etc/poplock/static-allowed", "192.0.2.0/24\n10.0.0.0/8\n", None).status == OK
    assert check_allow_list("/etc/poplock/static-allowed", None, None).status == OK  # missing: empty
    for everyone in ("0.0.0.0/0", "::/0", "0.0.0.0/0.0.0.0"):
        result = check_allow_list("/etc/poplock/static-allowed", f"192.0.2.0/24\n{everyone}\n", None)
        assert result.status == FAIL and "static-allowed:2:" in result.what, everyone
    assert check_allow_list("/etc/poplock/static-allowed", "not an address\n", None).status == FAIL
    assert check_allow_list("/etc/poplock/static-allowed", None, "Permission denied").status == FAIL


def test_a_deny_list_with_a_bad_line_fails():
    assert check_deny_list("/etc/poplock/denied", "203.0.113.0/24\nuser mallory\n", None).status == OK
    assert check_deny_list("/etc/poplock/denied", "user\n", None).status == FAIL
    assert check_deny_list("/etc/poplock/denied", None, "Permission denied").status == FAIL
