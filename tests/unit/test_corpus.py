"""Every built-in parser over the whole login corpus, as poplock-reader runs it.

tests/corpus/README.md says what the files hold. Recorded entries go, file by file and
in journal order, through one LoginParser with trust checking on, as the reader would
read them. Lines published by others (documented.jsonl, and PUBLISHED below for servers
the corpus has no file for) carry no trusted fields; they go through the patterns alone,
and once more as the server's root process would have written them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from poplock.config import load_config
from poplock.logins import Login, LoginParser, Unmatched
from poplock.servers import SERVERS
from poplock.sources import build_sources

CORPUS = Path(__file__).parents[1] / "corpus"
RECORDED = sorted(path for path in CORPUS.glob("*.jsonl") if path.name != "documented.jsonl")
INSTALL_ROOT = Path("/opt/poplock-test-servers")

# The recording machine (tests/corpus/README.md): its cyrus account had uid 107, and each
# server's mail users had uids from 20000 on, in the server's own mount namespace.
RECORDING_UIDS = {"root": 0, "cyrus": 107}
MAIL_USER_UIDS = range(20000, 20010)
SERVERS_LOGGING_AS_THE_MAIL_USER = ("popa3d", "mailutils", "solid-pop3d")

# What an admin of the recording machine would write: the local cyrus uid, and for the
# servers that log logins as the mail user, those users (mail-only accounts there).
RECORDING_SETTINGS = "[Source:cyrus]\nUsers=107\n" + "".join(
    f"[Source:{name}]\nLoginUsers={' '.join(map(str, MAIL_USER_UIDS))}\n" for name in SERVERS_LOGGING_AS_THE_MAIL_USER)

# The unit each recorded entry would carry under systemd with Debian's packages, by file and identifier.
UNITS = {
    "dovecot": {"dovecot": "dovecot.service"},
    "dovecot-anyname": {"dovecot": "dovecot.service"},
    "courier": {"pop3d": "courier-pop.service", "pop3d-ssl": "courier-pop-ssl.service",
                "imapd": "courier-imap.service", "imapd-ssl": "courier-imap-ssl.service",
                "authdaemond": "courier-authdaemon.service"},
    "mailutils": {"pop3d": "mailutils-pop3d.service", "imap4d": "mailutils-imap4d.service"},
    "popa3d": {"popa3d": "inetd.service"},
    "solid-pop3d": {"solid-pop3d": "inetd.service"},
}

# Published lines of servers that cannot run here: (server, SYSLOG_IDENTIFIER, MESSAGE, grants, source).
RENOIRBOULANGER = ("https://renoirboulanger.com/blog/2008/04/tester-le-fonctionnement-dun-serveur-smtp/ "
                   "(a DirectAdmin server: UW imapd 2004.357, vm-pop3d 1.1.7f-DA-2)")
EPYLOG = "smokris/epylog (GitHub), file modules/logins_mod.py, its test lines (Duke University's UW imapd)"
POPBEFORED = "popbefored.pl by chacha (v0.111, 2025), its comment quoting three ipop3d lines"
ORCA = "Orca_Services Pop.pm (Sjaak Westdijk; Carlos Canau and Jose Carlos Pereira, KPNQwest), its comments"
QPOPPER_FORUM = ("forum thread 'Postfix & Gmail SMTP Relay Cert Issue', post of 2009-03-08 quoting "
                 "/var/log/mail.log (qpopper 4.0.9 from inetd)")
POPAUTH_WATCHER = "popauth.watcher (Harlan Stenn; teapop support by Ivan F. Martinez), its teapop comment"
PUBLISHED = [
    ("uw-imapd", "imapd", "imap service init from 127.0.0.1", None, RENOIRBOULANGER),
    ("uw-imapd", "imapd", "Login user=test@renoirboulanger.com host=web1 [127.0.0.1]", "127.0.0.1", RENOIRBOULANGER),
    ("uw-imapd", "imapd", "Logout user=test@renoirboulanger.com host=web1 [127.0.0.1]", None, RENOIRBOULANGER),
    ("vm-pop3d", "vm-pop3d", "User 'test@renoirboulanger.com' logged in from 69.159.235.26, nmsgs=3",
     "69.159.235.26", RENOIRBOULANGER),
    ("vm-pop3d", "vm-pop3d", "bytes: domain renoirboulanger.com 491 bytes", None, RENOIRBOULANGER),
    ("vm-pop3d", "vm-pop3d", "Session ended for user: 'test@renoirboulanger.com' from 69.159.235.26, nmsgs=3, ndel=0",
     None, RENOIRBOULANGER),
    ("uw-imapd", "imapd", "Authenticated user=djcecile host=login2.phy.duke.edu [152.3.182.75]", "152.3.182.75",
     EPYLOG),
    ("uw-imapd", "imapd", "Login failed user=AryaBhatta auth=AryaBhatta host=login1.phy.duke.edu [152.3.182.74]",
     None, EPYLOG),
    ("uw-ipop3d", "ipop3d", "Login user=shke host=momentum.chem.duke.edu [152.3.169.5] nmsgs=144/144",
     "152.3.169.5", EPYLOG),
    ("uw-ipop3d", "ipop3d", "Login failed user=leluo auth=leluo host=res-152-16-222-235.dorm.duke.edu "
     "[152.16.222.235]", None, EPYLOG),
    # Only a host name, no address: nothing to grant.
    ("uw-ipop3d", "ipop3d", "Login user=tony host=YahooBB218.bbtec.net", None, POPBEFORED),
    ("uw-ipop3d", "ipop3d", "Login user=tony host=[202.32.124.66] nmsgs=5/5", "202.32.124.66", POPBEFORED),
    ("uw-ipop3d", "ipop3d", "Login user=tony host=ns1.example.com [61.209.254.2] nmsgs=0/0", "61.209.254.2",
     POPBEFORED),
    ("uw-ipop3d", "ipop3d", "connect from 14.5.8.10", None, ORCA),
    ("uw-ipop3d", "ipop3d", "Login user=luser2 host=host.domain.pt [13.16.6.27] nmsgs=0/0", "13.16.6.27", ORCA),
    ("uw-ipop3d", "ipop3d", "Auth user=luser3 host=2-4-4.domain.pt [13.16.2.18] nmsgs=0/0", "13.16.2.18", ORCA),
    ("uw-ipop3d", "ipop3d", "Logout user=luser4 host=[14.6.8.10] nmsgs=0 ndele=0", None, ORCA),
    ("uw-ipop3d", "ipop3d", "Autologout user=luser5 host=3-0-0.domain.pt [13.16.1.18]", None, ORCA),
    ("uw-ipop3d", "ipop3d", "Login failure user=luser44 host=4-0-0.domain.pt [13.16.12.1]", None, ORCA),
    ("uw-ipop3d", "ipop3d", "AUTHENTICATE LOGIN failure host=4-0-0.domain.pt [13.16.12.1]", None, ORCA),
    ("uw-ipop3d", "ipop3d", "AUTHENTICATE luser323 failure host=[13.12.24.24]", None, ORCA),
    ("uw-ipop3d", "ipop3d", "refused connect from 13.17.8.28", None, ORCA),
    ("uw-ipop3d", "ipop3d", "Error opening or locking INBOX user=luser10 host=3-4-3.domain.pt [13.16.4.7]", None,
     ORCA),
    ("uw-ipop3d", "ipop3d", "Connection reset by peer while reading line user=luser555 host=[12.5.19.16]", None,
     ORCA),
    ("perdition", "perdition", 'Connect: 10.0.0.1->12.1.1.1 user="id1" server="host1.KPNQwest.pt" port="110"',
     None, ORCA),
    ("perdition", "perdition", 'Auth: 10.0.0.1->12.1.1.1 user="id1" server="host1.KPNQwest.pt" port="110"',
     "10.0.0.1", ORCA),
    ("perdition", "perdition", 'Closing: 10.0.0.1->12.1.1.1 user=id1 12 18', None, ORCA),
    ("perdition", "perdition", 'Close: 11.1.1.2->13.3.3.4 user="user2" received=6 sent=0', None, ORCA),
    ("perdition", "perdition", 'Fatal Error reading authentication information from client "10.0.0.1->12.1.1.1 ": '
     "Exiting child", None, ORCA),
    ("perdition", "perdition", "Fail reauthentication for user id1", None, ORCA),
    ("qpopper", "in.qpopper", '(v4.0.9) Servicing request from "yw-out-2526.google.com" at 74.125.46.32 '
     "[pop_init.c:1408]", None, QPOPPER_FORUM),
    ("qpopper", "in.qpopper", "(null) at yw-out-2526.google.com (74.125.46.32): -ERR POP EOF or I/O Error "
     "[popper.c:828]", None, QPOPPER_FORUM),
    ("qpopper", "in.qpopper", "Unable to open bulletin directory '/var/spool/popbull': No such file or directory (2) "
     "[pop_bull.c:386]", None, QPOPPER_FORUM),
    ("qpopper", "in.qpopper", '(v4.0.9) POP login by user "nick" at (yw-out-2526.google.com) 74.125.46.35 '
     "[pop_log.c:244]", "74.125.46.35", QPOPPER_FORUM),
    ("teapop", "teapop", "Successful login for user@domain [127.0.0.1] from localhost [127.0.0.1]", "127.0.0.1",
     POPAUTH_WATCHER),
]


def unit_of(path: Path, fields: dict) -> str:
    """The unit the recorded entry would carry under systemd with Debian's packages."""
    if path.stem == "cyrus":
        return "cyrus-imapd.service"  # master and every service it starts
    return UNITS[path.stem][fields["SYSLOG_IDENTIFIER"]]


def load(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def sources(tmp_path: Path, settings: str = ""):
    """Every built-in source, from a configuration holding `settings`."""
    path = tmp_path / "poplock.conf"
    path.write_text(settings)
    return list(build_sources(load_config(str(path)), list(SERVERS)).values())


def grants(parser: LoginParser, entries: list[dict]) -> list[tuple[int, str]]:
    found = []
    for index, fields in enumerate(entries):
        login = parser.parse(fields)
        if login is not None:
            found.append((index, login.address))
    return found


def labels(records: list[dict], keep=lambda record: True) -> list[tuple[int, str]]:
    return [(index, record["grants"]) for index, record in enumerate(records) if record["grants"] and keep(record)]


def published_entry(identifier: str, message: str, **trusted) -> dict:
    return {"MESSAGE": message, "SYSLOG_IDENTIFIER": identifier, "__REALTIME_TIMESTAMP": "1700000000000000",
            **trusted}


def documented() -> list[tuple[str, dict, str | None]]:
    """(server, fields, grants) for documented.jsonl and PUBLISHED."""
    items = []
    for record in load(CORPUS / "documented.jsonl"):
        items.append((record["server"], dict(record["fields"], __REALTIME_TIMESTAMP="1700000000000000"),
                      record["grants"]))
    for server, identifier, message, address, _ in PUBLISHED:
        items.append((server, published_entry(identifier, message), address))
    return items


@pytest.mark.parametrize("path", RECORDED, ids=lambda path: path.stem)
def test_every_recorded_entry_grants_exactly_what_its_label_says(tmp_path, path):
    records = load(path)
    parser = LoginParser(sources(tmp_path, RECORDING_SETTINGS))
    assert grants(parser, [record["fields"] for record in records]) == labels(records)


@pytest.mark.parametrize("path", RECORDED, ids=lambda path: path.stem)
def test_under_systemd_the_default_settings_grant_exactly_the_labels(tmp_path, path):
    records = load(path)
    entries = [dict(record["fields"], _SYSTEMD_UNIT=unit_of(path, record["fields"])) for record in records]
    assert grants(LoginParser(sources(tmp_path)), entries) == labels(records)


def written_by_the_server_itself(record: dict) -> bool:
    return int(record["fields"]["_UID"]) in RECORDING_UIDS.values()


@pytest.mark.parametrize("path", RECORDED, ids=lambda path: path.stem)
def test_under_a_plain_journald_the_defaults_grant_no_login_the_mail_user_wrote(tmp_path, path):
    # Only the cyrus uid is the recording machine's; every other setting is the default.
    records = load(path)
    parser = LoginParser(sources(tmp_path, "[Source:cyrus]\nUsers=107\n"))
    assert grants(parser, [record["fields"] for record in records]) == labels(records, written_by_the_server_itself)


def test_the_logins_a_plain_journald_misses_by_default_are_those_of_popa3d_imap4d_and_apop(tmp_path):
    missed = {path.stem: [record["scenario"] for record in load(path)
                          if record["grants"] and not written_by_the_server_itself(record)] for path in RECORDED}
    assert {name for name, scenarios in missed.items() if scenarios} == {"popa3d", "mailutils", "solid-pop3d"}
    assert all(record["server"] == "mailutils-imap4d" for record in load(CORPUS / "mailutils.jsonl")
               if record["grants"] and not written_by_the_server_itself(record))
    assert all("APOP" in scenario for scenario in missed["solid-pop3d"])


@pytest.mark.parametrize("path", RECORDED, ids=lambda path: path.stem)
@pytest.mark.parametrize("check_trust", [True, False], ids=["trusted", "all-sources"])
def test_no_recorded_entry_is_reported_as_an_unread_login(tmp_path, path, check_trust):
    # The hints do not fire on failures, not even those whose user name is a success line.
    parser = LoginParser(sources(tmp_path, RECORDING_SETTINGS), check_trust=check_trust)
    results = [parser.examine(record["fields"]) for record in load(path)]
    assert not [result for result in results if isinstance(result, Unmatched)]
    assert [(index, result.address) for index, result in enumerate(results) if isinstance(result, Login)] \
        == labels(load(path))


@pytest.mark.parametrize("path", RECORDED, ids=lambda path: path.stem)
def test_without_trust_checking_every_pattern_on_every_entry_still_grants_exactly_the_labels(tmp_path, path):
    # `poplock scan --all-sources`: no server's pattern reads another server's lines.
    records = load(path)
    parser = LoginParser(sources(tmp_path), check_trust=False)
    assert grants(parser, [record["fields"] for record in records]) == labels(records)


def test_all_recorded_files_read_as_one_journal_grant_exactly_all_labels(tmp_path):
    # Recorded side by side on one machine: merged in journal-time order, as one journal holds them.
    entries = [(record["fields"], record["grants"]) for path in RECORDED for record in load(path)]
    entries.sort(key=lambda item: int(item[0]["__REALTIME_TIMESTAMP"]))
    parser = LoginParser(sources(tmp_path, RECORDING_SETTINGS))
    assert grants(parser, [fields for fields, _ in entries]) == \
        [(index, address) for index, (_, address) in enumerate(entries) if address]


@pytest.mark.parametrize("path", RECORDED, ids=lambda path: path.stem)
def test_each_default_trusted_user_is_the_one_the_recorded_server_wrote_as(tmp_path, path):
    # Every login line was written by one of its source's default Users, or by a mail user
    # of a server that logs logins as one; every address line by one of the default Users.
    parser = LoginParser(sources(tmp_path, RECORDING_SETTINGS))
    correlated = [source for source in parser.sources if source.correlation is not None]
    for record in load(path):
        fields = record["fields"]
        uid = int(fields["_UID"])
        login = parser.parse(fields)
        if login is not None:
            allowed = {RECORDING_UIDS[user] for user in SERVERS[login.source].users}
            if login.source in SERVERS_LOGGING_AS_THE_MAIL_USER:
                allowed |= set(MAIL_USER_UIDS)
            assert uid in allowed, record["scenario"]
        for source in correlated:
            if fields["SYSLOG_IDENTIFIER"] in source.identifiers and any(
                    pattern.fullmatch(fields["MESSAGE"]) for pattern in source.correlation.connections):
                assert uid in {RECORDING_UIDS[user] for user in SERVERS[source.name].users}, record["scenario"]


@pytest.mark.parametrize("name, package", [
    ("courier", "courier-pop"), ("courier", "courier-imap"), ("cyrus", "cyrus-common"),
    ("mailutils", "mailutils-pop3d"), ("mailutils", "mailutils-imap4d"),
])
def test_the_default_units_are_the_ones_the_debian_packages_ship(unpacked_servers, name, package):
    unit_folder = INSTALL_ROOT / package / "lib/systemd/system"
    shipped = {path.name for path in unit_folder.glob("*.service")}
    assert shipped and shipped <= set(SERVERS[name].units)


@pytest.mark.parametrize("server, fields, address", documented(),
                         ids=lambda value: value if isinstance(value, str) else None)
def test_every_published_line_grants_exactly_what_its_label_says(tmp_path, server, fields, address):
    login = LoginParser(sources(tmp_path), check_trust=False).parse(fields)
    assert (login.address if login else None) == address


def test_published_lines_are_read_by_the_source_of_their_identifier_when_root_wrote_them(tmp_path):
    # As the server's root process would have logged them under a plain journald.
    parser = LoginParser(sources(tmp_path))
    for _, fields, address in documented():
        login = parser.parse(dict(fields, _UID="0"))
        assert (login.address if login else None) == address, fields


def test_published_lines_cover_every_server_added_from_published_lines_only():
    recorded_or_published = {server for server, *_ in PUBLISHED} | {
        record["server"] for record in load(CORPUS / "documented.jsonl")}
    assert {"uw-imapd", "uw-ipop3d", "vm-pop3d", "qpopper", "teapop", "perdition"} <= recorded_or_published
