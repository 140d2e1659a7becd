"""Sessions: open connections hold a grant live past its window (grants.py's format 3, sessions.py's
arithmetic), and the lines that open and end them, read from the recorded corpus of real servers."""

import json
from pathlib import Path

import pytest

from poplock.config import load_config
from poplock.grants import Grant, GrantDecodeError, decode_grant, encode_grant, grant_for_login, merge_grant
from poplock.logins import Login, LoginParser, ServerRestart, SessionEnd
from poplock.servers import SERVERS
from poplock.sessions import (
    INDEX_PREFIX,
    Bounds,
    close_session,
    end_sessions,
    note_instance,
    open_session,
    sweep_sessions,
)
from poplock.sources import build_sources

CORPUS = Path(__file__).resolve().parents[1] / "corpus"
T0 = 1_795_699_814
WINDOW = 1800
BOUNDS = Bounds(WINDOW, 12 * 3600)
ADDRESS = "192.0.2.7"


def logged_in(grants: dict, metadata: dict, key: str, at: int, address: str = ADDRESS, user: str = "alice"):
    """What the reader does for a login that opens session `key`."""
    grants[address] = merge_grant(grants.get(address), grant_for_login(address, at, WINDOW, "dovecot", user), at)
    return open_session(grants, metadata, address, key, at, BOUNDS)


# --- the grant value --------------------------------------------------------------------------

def test_a_held_grant_is_stored_as_format_3_and_read_back_whole():
    grant = Grant(ADDRESS, T0 + 45000, T0, "dovecot", "alice b", (("dovecot:7085/ARy2nC5hbcx/FAAH", T0),),
                  T0 + WINDOW)
    value = encode_grant(grant)
    assert value == (b"3 %d %d dovecot %d dovecot:7085/ARy2nC5hbcx/FAAH@%d alice b"
                     % (T0 + 45000, T0, T0 + WINDOW, T0))
    assert decode_grant(ADDRESS, value) == grant


def test_a_grant_no_session_holds_is_still_written_in_format_2_and_formats_1_and_2_still_read():
    grant = Grant(ADDRESS, T0 + WINDOW, T0, "dovecot", "alice")
    assert encode_grant(grant).startswith(b"2 ")
    assert decode_grant(ADDRESS, b"2 %d %d dovecot alice" % (T0 + WINDOW, T0)) == grant
    assert decode_grant(ADDRESS, b"1 %d %d dovecot" % (T0 + WINDOW, T0)) == Grant(ADDRESS, T0 + WINDOW, T0, "dovecot")


@pytest.mark.parametrize("value", [
    b"3 100 50 dovecot 60 key@50",  # no user field at all
    b"3 100 50 dovecot 60 key alice",  # a session without its time
    b"3 100 50 dovecot 160 key@50 alice",  # released after its own expiry
    b"3 100 50 dovecot sixty key@50 alice",
])
def test_a_malformed_held_grant_is_an_error_not_a_grant(value):
    with pytest.raises(GrantDecodeError):
        decode_grant(ADDRESS, value)


def test_a_user_name_cannot_add_sessions_to_a_held_grant():
    grant = Grant(ADDRESS, T0 + 45000, T0, "dovecot", "x key2@1 y", (("k", T0),), T0 + WINDOW)
    assert decode_grant(ADDRESS, encode_grant(grant)).sessions == (("k", T0),)


def test_a_new_login_keeps_the_sessions_that_hold_the_grant_and_its_own_expiry_for_when_they_end():
    grants, metadata = {}, {}
    logged_in(grants, metadata, "dovecot:1/a", T0)
    manual = Grant(ADDRESS, T0 + 7200, T0 + 60, "manual")
    merged = merge_grant(grants[ADDRESS], manual, T0 + 60)
    assert merged.sessions == (("dovecot:1/a", T0),)
    assert merged.expires_at == BOUNDS.held_until(T0) and merged.expires_when_released == T0 + 7200


# --- opening and closing ----------------------------------------------------------------------

def test_an_open_session_keeps_the_grant_live_long_after_the_window():
    grants, metadata = {}, {}
    logged_in(grants, metadata, "dovecot:1/a", T0)
    assert grants[ADDRESS].is_live(T0 + 3 * 3600)
    assert metadata == {INDEX_PREFIX + "dovecot:1/a": f"{ADDRESS} {T0}"}


def test_after_its_last_session_ends_the_grant_lasts_the_window_from_the_end_then_expires():
    grants, metadata = {}, {}
    logged_in(grants, metadata, "dovecot:1/a", T0)
    released = close_session(grants, metadata, "dovecot:1/a", T0 + 3 * 3600, BOUNDS)
    assert released == grants[ADDRESS] and not released.held
    assert released.expires_at == T0 + 3 * 3600 + WINDOW
    assert released.is_live(T0 + 3 * 3600 + WINDOW - 1) and not released.is_live(T0 + 3 * 3600 + WINDOW)
    assert metadata == {}


def test_a_second_connection_keeps_the_grant_when_the_first_logs_out():
    grants, metadata = {}, {}
    logged_in(grants, metadata, "dovecot:1/a", T0)
    logged_in(grants, metadata, "dovecot:2/b", T0 + 60)
    assert close_session(grants, metadata, "dovecot:1/a", T0 + 3600, BOUNDS) is None
    assert grants[ADDRESS].held and grants[ADDRESS].is_live(T0 + 5 * 3600)
    assert close_session(grants, metadata, "dovecot:2/b", T0 + 5 * 3600, BOUNDS).expires_at == T0 + 5 * 3600 + WINDOW


def test_a_session_counts_as_ended_max_session_length_after_it_opened():
    grants, metadata = {}, {}
    logged_in(grants, metadata, "dovecot:1/a", T0)
    assert grants[ADDRESS].is_live(T0 + BOUNDS.max_session_length + WINDOW - 1)
    assert not grants[ADDRESS].is_live(T0 + BOUNDS.max_session_length + WINDOW)
    # Its end line read a day later does not stretch it either.
    released = close_session(grants, metadata, "dovecot:1/a", T0 + 86400, BOUNDS)
    assert released.expires_at == T0 + BOUNDS.max_session_length + WINDOW


def test_an_end_no_trusted_login_opened_changes_nothing():
    grants = {ADDRESS: grant_for_login(ADDRESS, T0, WINDOW, "dovecot")}
    metadata: dict = {}
    assert close_session(grants, metadata, "dovecot:1/a", T0 + 600, BOUNDS) is None
    assert grants[ADDRESS] == grant_for_login(ADDRESS, T0, WINDOW, "dovecot")


def test_an_end_read_twice_changes_nothing_the_second_time():
    grants, metadata = {}, {}
    logged_in(grants, metadata, "dovecot:1/a", T0)
    close_session(grants, metadata, "dovecot:1/a", T0 + 600, BOUNDS)
    after = grants[ADDRESS]
    assert close_session(grants, metadata, "dovecot:1/a", T0 + 3000, BOUNDS) is None
    assert grants[ADDRESS] == after


def test_a_removed_grant_takes_its_sessions_with_it_and_their_ends_bring_nothing_back():
    grants, metadata = {}, {}
    logged_in(grants, metadata, "dovecot:1/a", T0)
    del grants[ADDRESS]  # poplock remove
    assert close_session(grants, metadata, "dovecot:1/a", T0 + 600, BOUNDS) is None
    assert ADDRESS not in grants
    logged_in(grants, metadata, "dovecot:2/b", T0 + 700)  # a new grant; the old session's end must not touch it
    metadata[INDEX_PREFIX + "dovecot:1/a"] = f"{ADDRESS} {T0}"  # an index entry left behind
    assert close_session(grants, metadata, "dovecot:1/a", T0 + 800, BOUNDS) is None
    assert grants[ADDRESS].sessions == (("dovecot:2/b", T0 + 700),)


def test_a_key_the_server_gives_a_new_connection_ends_the_old_one_first():
    grants, metadata = {}, {}
    logged_in(grants, metadata, "cyrus:9f63f5696786/7741", T0, address="192.0.2.8")
    logged_in(grants, metadata, "cyrus:9f63f5696786/7741", T0 + 60, address="192.0.2.9")
    assert not grants["192.0.2.8"].held and grants["192.0.2.8"].expires_at == T0 + 60 + WINDOW
    assert grants["192.0.2.9"].held


def test_a_restart_ends_every_session_of_that_server_only():
    grants, metadata = {}, {}
    logged_in(grants, metadata, "dovecot:1/a", T0, address="192.0.2.8")
    logged_in(grants, metadata, "dovecot:2/b", T0, address="192.0.2.9")
    logged_in(grants, metadata, "courier:imapd/b/7/::1/4", T0, address="192.0.2.10")
    count, released = end_sessions(grants, metadata, "dovecot:", T0 + 900, BOUNDS)
    assert count == 2 and {grant.address for grant in released} == {"192.0.2.8", "192.0.2.9"}
    assert grants["192.0.2.8"].expires_at == T0 + 900 + WINDOW and grants["192.0.2.10"].held


def test_a_new_logging_process_of_a_per_instance_server_ends_the_old_ones_sessions():
    grants, metadata = {}, {}
    assert note_instance(grants, metadata, ("courier:imapd", "b/7018"), T0, BOUNDS) == (0, [])
    logged_in(grants, metadata, "courier:imapd/b/7018/::ffff:192.0.2.8/4000", T0, address="192.0.2.8")
    logged_in(grants, metadata, "courier:pop3d/b/7016/::ffff:192.0.2.9/4000", T0, address="192.0.2.9")
    assert note_instance(grants, metadata, ("courier:imapd", "b/7018"), T0 + 5, BOUNDS) == (0, [])
    count, released = note_instance(grants, metadata, ("courier:imapd", "b/9999"), T0 + 900, BOUNDS)
    assert count == 1 and [grant.address for grant in released] == ["192.0.2.8"]
    assert grants["192.0.2.9"].held


def test_the_sweep_ends_sessions_past_their_bound_and_drops_index_entries_of_gone_grants():
    grants, metadata = {}, {}
    logged_in(grants, metadata, "dovecot:1/a", T0, address="192.0.2.8")
    logged_in(grants, metadata, "dovecot:2/b", T0 + 7200, address="192.0.2.9")
    logged_in(grants, metadata, "dovecot:3/c", T0, address="192.0.2.10")
    del grants["192.0.2.10"]
    released = sweep_sessions(grants, metadata, T0 + BOUNDS.max_session_length + 1, BOUNDS)
    assert [grant.address for grant in released] == ["192.0.2.8"]
    assert list(metadata) == [INDEX_PREFIX + "dovecot:2/b"]


def test_a_grant_holds_at_most_256_sessions_and_forgets_the_oldest():
    grants, metadata = {}, {}
    for number in range(300):
        logged_in(grants, metadata, f"dovecot:{number}/s", T0 + number)
    assert len(grants[ADDRESS].sessions) == 256 and grants[ADDRESS].sessions[0][0] == "dovecot:44/s"
    assert len(metadata) == 256


# --- the lines that open and end sessions, from the recorded corpus ----------------------------

@pytest.fixture(scope="module")
def corpus_parser(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "poplock.conf"
    path.write_text("[Source:cyrus]\nUsers=107\n")
    return LoginParser(build_sources(load_config(str(path)), list(SERVERS)).values(), sessions=True)


def read_corpus(parser: LoginParser, name: str) -> list:
    found = []
    for line in (CORPUS / f"{name}.jsonl").read_text().splitlines():
        item = parser.read(json.loads(line)["fields"])
        if item is not None:
            found.append(item)
    return found


@pytest.mark.parametrize("name, opened", [("dovecot", 11), ("dovecot-anyname", 16), ("courier", 24), ("cyrus", 17),
                                          ("mailutils", 6)])
def test_every_recorded_session_a_login_opens_is_ended_by_its_own_end_line(corpus_parser, name, opened):
    grants, metadata, released = {}, {}, []
    items = read_corpus(corpus_parser, name)
    for item in items:
        if isinstance(item, Login):
            assert item.session is not None, item
            logged_in(grants, metadata, item.session, int(item.time), address=item.address)
        elif isinstance(item, SessionEnd):
            grant = close_session(grants, metadata, item.key, item.time, BOUNDS)
            if grant is not None:
                released.append(grant.address)
    assert sum(isinstance(item, Login) for item in items) == opened
    assert len(released) == opened and metadata == {}


def test_dovecot_start_and_stop_lines_are_restarts(corpus_parser):
    restarts = [item.message for item in read_corpus(corpus_parser, "dovecot") if isinstance(item, ServerRestart)]
    assert restarts == ["master: Dovecot v2.3.19.1 (9b53102964) starting up for pop3, imap (core dumps disabled)",
                        "master: Warning: Killed with signal 15 (by pid=6946 uid=0 code=kill)"]


def test_a_dovecot_reload_is_not_a_restart(corpus_parser):
    entry = {"MESSAGE": "master: Warning: SIGHUP received - reloading configuration", "SYSLOG_IDENTIFIER": "dovecot",
             "_UID": "0", "_PID": "21448", "__REALTIME_TIMESTAMP": f"{T0}000000"}
    assert corpus_parser.read(entry) is None


def test_solid_pop3d_sessions_open_only_under_systemd_as_it_logs_their_ends_as_the_mail_user(corpus_parser):
    logins = [item for item in read_corpus(corpus_parser, "solid-pop3d") if isinstance(item, Login)]
    assert logins and all(login.session is None for login in logins)
    entry = {"MESSAGE": "user alice authenticated - 127.26.0.2", "SYSLOG_IDENTIFIER": "solid-pop3d",
             "_SYSTEMD_UNIT": "inetd.service", "_UID": "0", "_PID": "7737", "_BOOT_ID": "9f63f569678647b982c6",
             "__REALTIME_TIMESTAMP": f"{T0}000000"}
    end = dict(entry, MESSAGE="session ended for user alice - 127.26.0.2", _UID="20000")
    login = corpus_parser.read(entry)
    assert login.session == "solid-pop3d:9f63f5696786/7737"
    assert corpus_parser.read(end) == SessionEnd("solid-pop3d", login.session, float(T0))


def test_without_sessions_the_parser_reads_logins_only_and_names_no_connection(tmp_path):
    path = tmp_path / "poplock.conf"
    path.write_text("")
    parser = LoginParser(build_sources(load_config(str(path))).values())
    items = read_corpus(parser, "dovecot")
    assert items and all(isinstance(item, Login) and item.session is None for item in items)


def unit_job(message_id: str, unit: str = "dovecot.service", **fields) -> dict:
    entry = {"MESSAGE": f"Stopping {unit} - Dovecot IMAP/POP3 email server...", "MESSAGE_ID": message_id,
             "UNIT": unit, "_PID": "1", "_UID": "0", "_TRANSPORT": "journal", "_SYSTEMD_UNIT": "init.scope",
             "SYSLOG_IDENTIFIER": "systemd", "__REALTIME_TIMESTAMP": f"{T0}000000"}
    entry.update(fields)
    return entry


STOPPING = "de5b426a63be47a7b6ac3eaac82e2f6f"


def test_pid_1_stopping_the_sources_unit_is_a_restart(corpus_parser):
    assert corpus_parser.read(unit_job(STOPPING)) == ServerRestart(
        "dovecot", float(T0), "Stopping dovecot.service - Dovecot IMAP/POP3 email server...")


@pytest.mark.parametrize("fields", [
    {"_PID": "4242"},  # anyone else
    {"_UID": "1000"},
    {"_TRANSPORT": "syslog"},
    {"MESSAGE_ID": "39f53479d3a045ac8e11786248231fbf"},  # started: logins may precede the message
    {"UNIT": "cron.service"},
])
def test_only_pid_1_stopping_or_starting_the_sources_own_unit_ends_its_sessions(corpus_parser, fields):
    assert corpus_parser.read(unit_job(STOPPING, **fields)) is None


# Seen from Dovecot 2.3.19.1 here: a client that drops its connection (no LOGOUT), one that drops
# it in IDLE, a POP3 client that closes without QUIT, and the stop with a client still connected
# (no end line at all: the restart ends it).
OBSERVED_ENDS = [
    ("imap(alice)<21923><NG2W7Jxhwet/AAAF>: Disconnected: Connection closed (No commands sent) in=0 out=409 "
     "deleted=0 expunged=0 trashed=0 hdr_count=0 hdr_bytes=0 body_count=0 body_bytes=0", "21923/NG2W7Jxhwet/AAAF"),
    ("imap(alice)<21929><VKyW7JxhM8x/AAAG>: Disconnected: Connection closed (IDLE running for 0.001 + waiting "
     "input for 0.501 secs, 0.001 in locks, 2 B in + 10 B out, state=wait-input) in=32 out=730 deleted=0 "
     "expunged=0 trashed=0 hdr_count=0 hdr_bytes=0 body_count=0 body_bytes=0", "21929/VKyW7JxhM8x/AAAG"),
    ("pop3(alice)<21934><sZ+e7Jxhnrx/AAAB>: Disconnected: Connection closed top=0/0, retr=0/0, del=0/0, size=0",
     "21934/sZ+e7Jxhnrx/AAAB"),
    # Dovecot 2.4 no longer says "Disconnected: " before the reason.
    ("imap(alice)<4242><C4Xx9S1hAAAAAAAA>: Logged out in=79 out=875 deleted=0 expunged=0 trashed=0 "
     "hdr_count=0 hdr_bytes=0 body_count=0 body_bytes=0", "4242/C4Xx9S1hAAAAAAAA"),
]


@pytest.mark.parametrize("message, key", OBSERVED_ENDS)
def test_however_a_dovecot_connection_ends_its_end_line_names_it(corpus_parser, message, key):
    entry = {"MESSAGE": message, "SYSLOG_IDENTIFIER": "dovecot", "_UID": "0", "_PID": "21908",
             "__REALTIME_TIMESTAMP": f"{T0}000000"}
    assert corpus_parser.read(entry) == SessionEnd("dovecot", f"dovecot:{key}", float(T0))


def test_lines_of_a_connection_still_running_end_nothing(corpus_parser):
    for message in ("imap(alice)<21929><VKyW7JxhM8x/AAAG>: Error: Mailbox INBOX: sync failed",
                    "imap-login: Disconnected: Connection closed (no auth attempts in 0 secs): user=<>, "
                    "rip=127.0.0.1, lip=127.0.0.1, secured, session=<hzqW7Jxhtst/AAAB>"):
        entry = {"MESSAGE": message, "SYSLOG_IDENTIFIER": "dovecot", "_UID": "0", "_PID": "21908",
                 "__REALTIME_TIMESTAMP": f"{T0}000000"}
        assert corpus_parser.read(entry) is None


def test_max_session_length_defaults_to_12_hours_and_is_bounded_so_that_no_held_grant_outlives_seven_days(tmp_path):
    from poplock.errors import ConfigError

    path = tmp_path / "poplock.conf"
    path.write_text("")
    assert load_config(str(path)).max_session_length == 12 * 3600
    for value, seconds in (("0", 0), ("6d", 6 * 86400)):
        path.write_text(f"[Grants]\nMaxSessionLength={value}\n")
        assert load_config(str(path)).max_session_length == seconds
    path.write_text("[Grants]\nMaxSessionLength=7d\n")
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    assert caught.value.problems == [f"{path}:2: [Grants] MaxSessionLength=7d: must be at most 6 days (0: sessions "
                                     "hold no grant open): it bounds how long a connection whose end line was lost "
                                     "keeps its client relaying"]


# --- UW imapd and ipop3d: one process per connection, which logs as the mail user -------------
# Their lines come from UW's source (tests/corpus/documented.jsonl cites each); under systemd they
# carry the unit of inetd (or xinetd), the process's own pid and the mail user's uid.

UW_BOOT = "9f63f569678647b982c6a1b2c3d4e5f6"
UW_HOST = "client.example.net [192.0.2.7]"


def uw_entry(message: str, pid: str = "4242", identifier: str = "imapd", **fields) -> dict:
    entry = {"MESSAGE": message, "SYSLOG_IDENTIFIER": identifier, "_SYSTEMD_UNIT": "inetd.service", "_UID": "20000",
             "_PID": pid, "_BOOT_ID": UW_BOOT, "_TRANSPORT": "syslog", "__REALTIME_TIMESTAMP": f"{T0}000000"}
    entry.update(fields)
    return {name: value for name, value in entry.items() if value is not None}


def uw_key(pid: str = "4242") -> str:
    return f"uw-imap:{UW_BOOT[:12]}/{pid}"


def documented_uw() -> list[dict]:
    records = [json.loads(line) for line in (CORPUS / "documented.jsonl").read_text().splitlines()]
    return [record for record in records if record["server"] in ("uw-imapd", "uw-ipop3d")
            and "SYSLOG_PID" in record["fields"]]


UW_LOGIN = {"imapd": f"Login user=alice host={UW_HOST}", "ipop3d": f"Login user=alice host={UW_HOST} nmsgs=3/3"}


@pytest.mark.parametrize("record", [record for record in documented_uw()
                                    if record["scenario"].startswith("end of a logged-in")],
                         ids=lambda record: record["scenario"])
def test_every_uw_end_line_ends_the_session_its_own_process_logged_in(corpus_parser, record):
    fields = record["fields"]
    identifier, pid = fields["SYSLOG_IDENTIFIER"], fields["SYSLOG_PID"]
    login = corpus_parser.read(uw_entry(UW_LOGIN[identifier], pid, identifier))
    assert (login.address, login.source, login.session) == ("192.0.2.7", "uw-imap", uw_key(pid))
    end = corpus_parser.read(uw_entry(fields["MESSAGE"], pid, identifier))
    assert end == SessionEnd("uw-imap", uw_key(pid), float(T0))
    grants, metadata = {}, {}
    logged_in(grants, metadata, login.session, T0, address=login.address)
    assert close_session(grants, metadata, end.key, T0 + 3600, BOUNDS).expires_at == T0 + 3600 + WINDOW


def test_the_uw_lines_that_end_no_logged_in_session_are_read_as_ends_of_nothing_or_not_at_all(corpus_parser):
    grants, metadata = {}, {}
    for record in documented_uw():
        if record["scenario"].startswith("end of a logged-in"):
            continue
        fields = record["fields"]
        found = corpus_parser.read(uw_entry(fields["MESSAGE"], fields["SYSLOG_PID"], fields["SYSLOG_IDENTIFIER"]))
        if record["grants"]:
            assert isinstance(found, Login) and found.address == record["grants"], record["scenario"]
        elif isinstance(found, SessionEnd):  # an end of a connection nobody opened a session for
            assert record["scenario"].startswith("end of an"), record["scenario"]
            assert close_session(grants, metadata, found.key, T0, BOUNDS) is None
        else:
            assert found is None, record["scenario"]


@pytest.mark.parametrize("message", [
    # Older UW versions' ipop3d, as Orca_Services' Pop.pm quotes it (ORCA in tests/unit/test_corpus.py):
    # no comma before "while", and the counts after the host.
    "Connection reset by peer while reading line user=luser555 host=[12.5.19.16]",
    "Command stream end of file while reading line user=luser234 host=9-9-9-domain.pt [13.16.4.5]",
    "Connection timed out while reading line user=luser7985 host=4-5-6.domain.pt [13.16.1.15]",
    "Logout user=luser4 host=[14.6.8.10] nmsgs=0 ndele=0",
    "Autologout user=luser5 host=3-0-0.domain.pt [13.16.1.18]",
    # imapd 2004.357's inerror (): "%.80s, while %s user=%.80s host=%.80s".
    "Command stream end of file, while reading literal user=alice host=[192.0.2.7]",
    # A client with no reverse DNS name, and stdin no socket (tcp_clienthost ()'s other forms).
    "Logout user=alice host=[2001:db8::7]",
    "Logout user=alice host=UNKNOWN",
])
def test_older_and_other_forms_of_uw_end_lines_end_the_session_too(corpus_parser, message):
    assert corpus_parser.read(uw_entry(message, identifier="ipop3d")) == SessionEnd("uw-imap", uw_key(), float(T0))


@pytest.mark.parametrize("message", [
    f"Update user=alice host={UW_HOST} nmsgs=3 ndele=1 nseen=3",
    f"Fatal mailbox error user=alice host={UW_HOST} mbx=INBOX: Mailbox is not in valid format",
    f"Overlong (20000) client literal user=alice host={UW_HOST}",
    f"Retrying after disk error user=alice host={UW_HOST} mbx=INBOX: No space left on device",
    "AUTHENTICATE Logout user=alice failure host=[192.0.2.7]",
    f"Login failed user=Logout user=alice host=[192.0.2.7] auth=x host={UW_HOST}",
    "imap service init from 192.0.2.7",
    f"Line too long before authentication host={UW_HOST}",
    f"Preauthenticated user=alice host={UW_HOST}",
    # Not UW's wording: a reason it never writes, a reason holding `=`, text after the host.
    f"Goodbye user=alice host={UW_HOST}",
    f"Killed (by=root) user=alice host={UW_HOST}",
    f"Logout user=alice host={UW_HOST} session=4250",
])
def test_lines_of_a_uw_connection_still_running_end_nothing(corpus_parser, message):
    assert corpus_parser.read(uw_entry(message)) is None


def test_uw_cuts_user_and_host_at_80_characters_and_a_line_longer_than_it_writes_ends_nothing(corpus_parser):
    host = ("a-very-long-reverse-dns-name-of-a-dial-up-pool.customers.isp.example.net [192.0.2.9]")
    user = "u" * 80
    assert corpus_parser.read(uw_entry(f"Logout user={user} host={host[:80]}")) == SessionEnd(
        "uw-imap", uw_key(), float(T0))
    assert corpus_parser.read(uw_entry(f"Logout user={user} host={host[:81]}")) is None
    assert corpus_parser.read(uw_entry(f"Logout user={user}u host={host[:80]}")) is None


@pytest.mark.parametrize("name", [
    "alice host=client.example.net [192.0.2.7]",
    "alice host=[192.0.2.7] nmsgs=0 ndele=0",
    "x _PID=4242 _BOOT_ID=9f63f569678647b982c6a1b2c3d4e5f6",
    "Logout user=alice host=client.example.net [192.0.2.7]",
    "alice\tcarol  dave",
])
def test_a_uw_user_name_cannot_end_another_connections_session(corpus_parser, name):
    # alice is connected through process 4242; mallory's own connection (process 4250) logged in
    # with a crafted name, and ends: only mallory's session ends.
    grants, metadata = {}, {}
    alice = corpus_parser.read(uw_entry(UW_LOGIN["imapd"]))
    logged_in(grants, metadata, alice.session, T0, address="192.0.2.7")
    mallory = corpus_parser.read(uw_entry(f"Login user={name} host=[198.51.100.4]", pid="4250", _UID="20001"))
    assert (mallory.address, mallory.session) == ("198.51.100.4", uw_key("4250"))
    logged_in(grants, metadata, mallory.session, T0, address="198.51.100.4", user=name)
    end = corpus_parser.read(uw_entry(f"Logout user={name} host=[198.51.100.4]", pid="4250", _UID="20001"))
    assert end == SessionEnd("uw-imap", uw_key("4250"), float(T0))
    assert close_session(grants, metadata, end.key, T0 + 60, BOUNDS).address == "198.51.100.4"
    assert grants["192.0.2.7"].held and grants["192.0.2.7"].is_live(T0 + 5 * 3600)


@pytest.mark.parametrize("fields", [
    {"_SYSTEMD_UNIT": "session-3.scope", "_UID": "1000"},  # `logger -t imapd` from a login session
    {"_SYSTEMD_UNIT": "user@1000.service", "_UID": "1000"},  # from a user's own service
    {"_SYSTEMD_UNIT": "run-u42.service", "_UID": "0"},  # root, but not the server's unit
    {"_SYSTEMD_UNIT": None, "_UID": "20000"},  # plain journald: the mail user's uid is no evidence
    {"_SYSTEMD_UNIT": None, "_UID": "1000"},
])
def test_a_uw_end_line_not_written_in_the_sources_unit_ends_nothing(corpus_parser, fields):
    assert corpus_parser.read(uw_entry(f"Logout user=alice host={UW_HOST}", **fields)) is None


def test_uw_sessions_open_only_under_systemd_as_uw_logs_their_ends_as_the_mail_user(tmp_path):
    # Under a plain journald even an admin who lists the mail users as trusted (Users=) gets no
    # sessions: their uids could write any end line, so UW's grants last the window after the login.
    path = tmp_path / "poplock.conf"
    path.write_text("[Source:uw-imap]\nUsers=0 20000\n")
    parser = LoginParser(build_sources(load_config(str(path)), ["uw-imap"]).values(), sessions=True)
    for uid in ("0", "20000"):
        login = parser.read(uw_entry(UW_LOGIN["imapd"], _SYSTEMD_UNIT=None, _UID=uid))
        assert login.address == "192.0.2.7" and login.session is None
    assert parser.read(uw_entry(UW_LOGIN["imapd"])).session == uw_key()
    # A login that its unit does not vouch for opens nothing, even from the right pid.
    assert parser.read(uw_entry(UW_LOGIN["imapd"], _SYSTEMD_UNIT="session-3.scope")) is None


def test_pid_1_stopping_inetd_ends_the_uw_sessions(tmp_path):
    path = tmp_path / "poplock.conf"
    path.write_text("")
    parser = LoginParser(build_sources(load_config(str(path)), ["uw-imap"]).values(), sessions=True)
    stopping = "Stopping inetd.service - Internet superserver..."
    restart = parser.read(unit_job(STOPPING, unit="inetd.service", MESSAGE=stopping))
    assert restart == ServerRestart("uw-imap", float(T0), stopping) and uw_key().startswith(restart.sessions_prefix)


def test_pid_1_stopping_a_unit_two_sources_share_ends_the_sessions_of_both(tmp_path):
    """solid-pop3d and UW both under inetd.service: one stop ends the sessions of each."""
    path = tmp_path / "poplock.conf"
    path.write_text("")
    parser = LoginParser(build_sources(load_config(str(path)), ["solid-pop3d", "uw-imap"]).values(), sessions=True)
    stopping = "Stopping inetd.service - Internet superserver..."
    restart = parser.read(unit_job(STOPPING, unit="inetd.service", MESSAGE=stopping))
    assert {restart.source, *restart.also} == {"solid-pop3d", "uw-imap"}
    assert set(restart.sessions_prefixes) == {"solid-pop3d:", "uw-imap:"}


def test_a_unit_that_failed_without_a_job_ends_its_sessions(corpus_parser):
    """Its main process killed (OOM, SIGKILL) with no Restart=: PID 1 logs only the failure."""
    failed = unit_job("d9b373ed55a64feb8242e02dbe79a49c", MESSAGE="dovecot.service: Failed with result 'signal'.")
    assert corpus_parser.read(failed) == ServerRestart("dovecot", float(T0), "dovecot.service: Failed with result "
                                                       "'signal'.")
