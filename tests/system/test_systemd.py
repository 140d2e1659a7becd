"""poplock under a real systemd: installed by `make install DESTDIR=...` into a container that
systemd-nspawn boots, with Dovecot as dovecot.service and mailfront behind the socket-activated
relaylock, driven from the host the way an admin would.

The tests run in order, as one story on one container: enable the units; a POP3 login lets
that client relay and nobody else, and a forged log line lets nobody relay; the timer purges
the grant once its (short) window has passed; restarts and crashes of the reader lose no
grant and replay no login; a broken configuration leaves the reader failed, saying why;
the man pages render and the journal finds the events of the first steps by their fields;
and Dovecot stopped by PID 1 without a line of its own ends the session of a client still connected.

The container shares the host's /usr, so poplock goes under /opt/poplock and its units,
drop-ins and configuration under the container's /etc, as a local admin would install it.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from support.dovecot import container_files
from support.mailclients import imap_connection, pop3_login
from support.nspawn import Container, build_root, wait_until
from support.ports import free_port, wait_for_port
from support.smtpservers import LOCAL_DOMAIN, try_relay

from poplock import events
from poplock.servers import UNIT_JOB_MESSAGE_IDS

pytestmark = pytest.mark.system

REPOSITORY = Path(__file__).resolve().parents[2]

PREFIX = "/opt/poplock"
BINDIR = f"{PREFIX}/bin"
MANDIR = f"{PREFIX}/share/man"
INSTALL = {
    "PREFIX": PREFIX,
    "SYSCONFDIR": "/etc",
    "UNITDIR": "/etc/systemd/system",
    "TMPFILESDIR": "/etc/tmpfiles.d",
    "SYSUSERSDIR": "/etc/sysusers.d",
    # journalctl reads catalogs only under /usr, which is the host's here (read-only): the
    # catalog is installed but unused; tests/quality checks it with journalctl --root.
    "CATALOGDIR": "/etc/systemd/catalog",
}
POPLOCK = f"{BINDIR}/poplock"

# Short enough for the timer's purge to come within the test, long enough for the restart
# and crash tests to finish well inside one grant's life.
WINDOW = 20
EXPIRE_EVERY = 5  # seconds between the timer's runs, from its drop-in
RESTART_SEC = 5  # poplock-reader.service's RestartSec=

USER, PASSWORD = "alice", "secret"
GRANTED = "127.0.0.5"
REFUSED = "127.0.0.6"
QMAILHOME = "/var/qmail"

READER = "poplock-reader.service"
TIMER = "poplock-expire.timer"
EXPIRE = "poplock-expire.service"
SOCKET = "poplock-smtp.socket"

MAILFRONT_REFUSAL = "5.1.0 Mail system is not configured to accept that recipient"


@dataclass
class Site:
    """The booted container with poplock, Dovecot and the SMTP socket set up, and how to reach them."""

    container: Container
    pop3_port: int
    smtp_port: int

    def poplock(self, *arguments: str, check: bool = True) -> subprocess.CompletedProcess:
        """The CLI, run as root inside the container."""
        return self.container.run(POPLOCK, *arguments, check=check)

    def grants(self) -> dict[str, dict]:
        """`poplock show --json --all`: every stored grant, purged or not, by address."""
        records = map(json.loads, self.poplock("show", "--json", "--all").stdout.splitlines())
        return {record["address"]: record for record in records if record["kind"] == "grant"}

    def may_relay(self, address: str) -> bool:
        return self.poplock("check", address, check=False).returncode == 0

    def wait_until_granted(self, address: str, timeout: float = 15.0) -> dict:
        return wait_until(lambda: self.grants().get(address), f"a grant for {address}", timeout)

    def login(self, source: str, password: str = PASSWORD) -> bool:
        return pop3_login("127.0.0.1", self.pop3_port, USER, password, source=source)

    def relay(self, source: str) -> tuple[int, str]:
        return try_relay("127.0.0.1", self.smtp_port, source=source)

    def reader(self) -> dict[str, str]:
        return self.container.show(READER, "ActiveState", "SubState", "MainPID", "NRestarts", "Result",
                                   "ExecMainStatus", "InvocationID", "StatusText")

    def events(self, *matches: str) -> list[dict[str, str]]:
        """poplock's events (entries with a POPLOCK_EVENT) matching FIELD=value `matches`."""
        return [entry for entry in self.container.journal(*matches) if "POPLOCK_EVENT" in entry]

    def wait_for_events(self, *matches: str) -> list[dict[str, str]]:
        """The events matching, once there is one: programs log an event after the change it reports."""
        return wait_until(lambda: self.events(*matches), f"an event with {' '.join(matches)}", timeout=10)

    def login_events(self, address: str) -> list[dict[str, str]]:
        """Every time the reader acted on a login from `address` (granted, extended, or too old), once it has."""
        kinds = {events.LOGIN_GRANTED.name, events.GRANT_EXTENDED.name, events.LOGIN_TOO_OLD.name}
        return [entry for entry in self.wait_for_events(f"POPLOCK_CLIENT_ADDRESS={address}", f"_SYSTEMD_UNIT={READER}")
                if entry["POPLOCK_EVENT"] in kinds]

    def logged_lines(self, text: str, *matches: str, count: int = 1) -> list[dict[str, str]]:
        """The journal entries matching whose MESSAGE contains `text`, once there are `count` of them."""
        return wait_until(
            lambda: (found := [entry for entry in self.container.journal(*matches) if text in entry["MESSAGE"]])
            and len(found) >= count and found,
            f"{count} entries with {text!r}", timeout=10)

    def cursor(self) -> str:
        return self.container.read_file("/var/lib/poplock/cursor").strip()


def make_install(root: Path) -> None:
    variables = [f"{name}={value}" for name, value in INSTALL.items()]
    result = subprocess.run(["make", "-s", "install", f"DESTDIR={root}", *variables], cwd=REPOSITORY,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"make install failed:\n{result.stdout}{result.stderr}"


def configure(root: Path, pop3_port: int, smtp_port: int) -> None:
    """What the admin of the container writes: Dovecot's configuration, mailfront's, and drop-ins."""
    files = {
        # Dovecot on loopback only, logging through syslog into the journal as dovecot.service.
        **container_files({USER: PASSWORD}, pop3_port),
        # mailfront accepts mail for the local domain; other recipients need RELAYCLIENT.
        f"{QMAILHOME.lstrip('/')}/control/rcpthosts": f"{LOCAL_DOMAIN}\n",
        # `systemctl edit poplock-smtp.socket`: a loopback port of our own instead of 25.
        "etc/systemd/system/poplock-smtp.socket.d/listen.conf": f"""\
[Socket]
ListenStream=
ListenStream=127.0.0.1:{smtp_port}
""",
        # `systemctl edit poplock-smtp@.service`: mailfront instead of qmail-smtpd, run as the
        # shipped User=poplock-smtp.
        "etc/systemd/system/poplock-smtp@.service.d/mailfront.conf": f"""\
[Service]
ExecStart=
ExecStart={BINDIR}/relaylock -- /usr/sbin/smtpfront-echo relayclient qmail-validate
Environment=QMAILHOME={QMAILHOME}
""",
        # `systemctl edit poplock-expire.timer`: purge every few seconds instead of every 5 minutes
        # (an empty OnBootSec= drops every trigger the unit had, OnUnitActiveSec= included).
        "etc/systemd/system/poplock-expire.timer.d/often.conf": f"""\
[Timer]
OnBootSec=
OnActiveSec=1s
OnUnitActiveSec={EXPIRE_EVERY}s
AccuracySec=1s
""",
        "etc/poplock/poplock.conf.d/50-window.conf": f"[Grants]\nWindow={WINDOW}s\n",
    }
    for path, text in files.items():
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    mail = root / "srv/mail"
    mail.mkdir(parents=True, exist_ok=True)
    uid, gid = user_ids(root, "nobody")
    mail.chmod(0o750)
    os.chown(mail, uid, gid)


def user_ids(root: Path, name: str) -> tuple[int, int]:
    for line in (root / "etc/passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return int(fields[2]), int(fields[3])
    raise KeyError(name)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Site:
    directory = tmp_path_factory.mktemp("systemd")
    root = build_root(directory / "root")
    make_install(root)
    pop3_port, smtp_port = free_port(), free_port()
    configure(root, pop3_port, smtp_port)
    with Container(root) as container:
        # What `make install` does without DESTDIR, here inside the container.
        container.run("systemd-sysusers", f"{INSTALL['SYSUSERSDIR']}/poplock.conf")
        container.run("systemd-tmpfiles", "--create", f"{INSTALL['TMPFILESDIR']}/poplock.conf")
        container.systemctl("enable", "--now", "dovecot.service")
        wait_for_port("127.0.0.1", pop3_port)
        yield Site(container, pop3_port, smtp_port)


def login_line(address: str) -> str:
    return (f"pop3-login: Login: user=<{USER}>, method=PLAIN, rip={address}, lip=127.0.0.1, mpid=4242, "
            f"session=<b7aS8S1hfbZ/AAAF>")


# --- 1. enabling --------------------------------------------------------------------------------

def test_sysusers_and_tmpfiles_create_the_poplock_user_and_its_state_directory(site):
    container = site.container
    assert container.run("getent", "passwd", "poplock").stdout.startswith("poplock:x:")
    assert container.run("stat", "--format=%U:%G %a", "/var/lib/poplock").stdout.split() == ["poplock:poplock", "750"]
    unit = container.read_file(f"/etc/systemd/system/{READER}")
    assert f"ExecStart={BINDIR}/poplock-reader\n" in unit


def test_enable_now_starts_the_reader_the_expire_timer_and_the_smtp_socket(site):
    container = site.container
    container.systemctl("enable", "--now", READER, TIMER, SOCKET)
    for unit in (READER, TIMER, SOCKET):
        assert container.systemctl("is-enabled", unit).stdout.strip() == "enabled", unit
        assert container.systemctl("is-active", unit).stdout.strip() == "active", unit
    status = container.status(READER)
    assert re.search(r"Active: active \(running\)", status), status
    assert re.search(r'Status: "watching dovecot[";]', status), status
    assert "Loaded: loaded (/etc/systemd/system/poplock-reader.service; enabled" in status


# --- 2. a login lets that client relay; nothing else does ------------------------------------------

def test_a_pop3_login_lets_that_client_relay_through_the_socket_and_no_one_else(site):
    assert site.login(GRANTED) is True
    assert site.login(REFUSED, password="wrong") is False
    grant = site.wait_until_granted(GRANTED)
    assert grant["source"] == "dovecot" and grant["live"]

    # Dovecot's login line is trusted because journald says it came from dovecot.service.
    [dovecot_login] = site.logged_lines(f"Login: user=<{USER}>, method=PLAIN, rip={GRANTED},",
                                        "_SYSTEMD_UNIT=dovecot.service")
    assert dovecot_login["SYSLOG_IDENTIFIER"] == "dovecot"
    [granted] = site.login_events(GRANTED)
    assert granted["MESSAGE_ID"] == events.LOGIN_GRANTED.message_id
    assert granted["POPLOCK_SOURCE_UNIT"] == "dovecot.service"
    assert granted["MESSAGE"].startswith(f"granted {GRANTED} until ")
    # The reader's STATUS= follows (sent at most once a second).
    wait_until(lambda: f"; last login {GRANTED} at " in site.reader()["StatusText"], "the reader's status", 5)
    assert site.reader()["StatusText"].startswith("watching dovecot; ")

    assert site.relay(GRANTED)[0] == 250
    assert site.relay(REFUSED) == (550, MAILFRONT_REFUSAL)
    assert site.may_relay(GRANTED) and not site.may_relay(REFUSED)
    assert REFUSED not in site.grants()

    # relaylock ran in an instance of the socket's service, and said what it decided.
    [allowed] = site.wait_for_events(f"MESSAGE_ID={events.RELAY_ALLOWED.message_id}",
                                     f"POPLOCK_CLIENT_ADDRESS={GRANTED}")
    assert allowed["_SYSTEMD_UNIT"].startswith("poplock-smtp@") and allowed["SYSLOG_IDENTIFIER"] == "relaylock"
    [refused] = site.wait_for_events(f"MESSAGE_ID={events.RELAY_REFUSED.message_id}",
                                     f"POPLOCK_CLIENT_ADDRESS={REFUSED}")
    assert refused["MESSAGE"] == f"no relay for {REFUSED}: no grant"


def test_a_logger_forgery_by_an_unprivileged_user_grants_nothing(site):
    container = site.container
    by_syslog, by_native, by_stream, by_service, witness = (
        "127.0.0.7", "127.0.0.8", "127.0.0.10", "127.0.0.11", "127.0.0.9")
    # What any local user can send to journald claiming to be Dovecot: through syslog(3) ...
    container.run("logger", "-t", "dovecot", login_line(by_syslog), user="nobody")
    # ... natively, trying the trusted fields too (journald drops fields that start with "_") ...
    container.run("logger", "--journald", user="nobody", input=(
        f"MESSAGE={login_line(by_native)}\nSYSLOG_IDENTIFIER=dovecot\n"
        "_SYSTEMD_UNIT=dovecot.service\n_UID=0\n_COMM=dovecot\n"))
    # ... as a standard output stream, and from a service that runs as that user.
    container.run("systemd-cat", "-t", "dovecot", "echo", login_line(by_stream), user="nobody")
    container.run("systemd-run", "--quiet", "--wait", "--uid=nobody", "--gid=nogroup",
                  "--property=SyslogIdentifier=dovecot", "echo", login_line(by_service))
    # All four are in the system journal, which the reader reads, and none is Dovecot's.
    forgeries = {re.search(r"rip=([0-9.]+),", entry["MESSAGE"]).group(1): entry for entry in site.logged_lines(
        "mpid=4242", "--system", "SYSLOG_IDENTIFIER=dovecot", count=4)}
    assert {address: (entry["_UID"], entry["_TRANSPORT"]) for address, entry in forgeries.items()} == {
        by_syslog: ("65534", "syslog"), by_native: ("65534", "journal"),
        by_stream: ("65534", "stdout"), by_service: ("65534", "stdout")}
    units = {address: entry.get("_SYSTEMD_UNIT") for address, entry in forgeries.items()}
    assert [units[by_syslog], units[by_native], units[by_stream]] == [None, None, None], units
    assert re.fullmatch(r"run-u[0-9]+\.service", units[by_service]), units
    # The reader reads the journal in order: once a later real login is granted, it has read the forgeries.
    assert site.login(witness)
    site.wait_until_granted(witness)
    grants = site.grants()
    for address in (by_syslog, by_native, by_stream, by_service):
        assert address not in grants
        assert site.events(f"POPLOCK_CLIENT_ADDRESS={address}") == []
        assert site.relay(address) == (550, MAILFRONT_REFUSAL)


def test_under_systemd_the_unit_not_the_uid_is_what_makes_a_login_line_dovecots(site):
    """Dovecot's lines come from root (its log process) in dovecot.service; root in another unit is not Dovecot."""
    container = site.container
    by_root_elsewhere, witness = "127.0.0.12", "127.0.0.13"
    container.run("systemd-run", "--quiet", "--wait", "--property=SyslogIdentifier=dovecot",
                  "echo", login_line(by_root_elsewhere))
    [forged] = site.logged_lines(f"rip={by_root_elsewhere},", "SYSLOG_IDENTIFIER=dovecot")
    assert forged["_UID"] == "0" and forged["_SYSTEMD_UNIT"] != "dovecot.service"
    assert site.login(witness)
    [real] = site.logged_lines(f"Login: user=<{USER}>, method=PLAIN, rip={witness},", "SYSLOG_IDENTIFIER=dovecot")
    assert (real["_UID"], real["_SYSTEMD_UNIT"]) == ("0", "dovecot.service")
    site.wait_until_granted(witness)
    assert by_root_elsewhere not in site.grants()
    assert site.events(f"POPLOCK_CLIENT_ADDRESS={by_root_elsewhere}") == []


def test_smtp_connections_run_as_the_shipped_user_and_fail_clearly_without_the_server(site):
    import socket

    container = site.container
    uid = container.run("id", "-u", "poplock-smtp").stdout.strip()
    [allowed] = site.wait_for_events(f"MESSAGE_ID={events.RELAY_ALLOWED.message_id}",
                                     f"POPLOCK_CLIENT_ADDRESS={GRANTED}")
    assert allowed["_UID"] == uid  # User=poplock-smtp exists wherever poplock is installed: no 217/USER
    # The shipped ExecStart names qmail-smtpd, which Debian does not have.
    override = "/etc/systemd/system/poplock-smtp@.service.d/zz-shipped-server.conf"
    container.write_file(override, f"[Service]\nExecStart=\nExecStart={BINDIR}/relaylock -- "
                                   "/var/qmail/bin/qmail-smtpd\n")
    container.systemctl("daemon-reload")
    try:
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", site.smtp_port), timeout=10) as connection:
                try:
                    assert connection.recv(1024) == b""  # closed without a greeting
                except ConnectionResetError:
                    pass
        site.logged_lines("cannot run /var/qmail/bin/qmail-smtpd: No such file or directory",
                          "SYSLOG_IDENTIFIER=relaylock", count=3)
        # CollectMode=inactive-or-failed: failed instances do not pile up, one per connection.
        wait_until(lambda: container.systemctl("list-units", "--all", "--plain", "--no-legend",
                                               "poplock-smtp@*").stdout.strip() == "",
                   "the failed instances to be collected", 10)
    finally:
        container.run("rm", "-f", override)
        container.systemctl("daemon-reload")
    assert site.relay(REFUSED) == (550, MAILFRONT_REFUSAL)  # mailfront answers again


# --- 3. the timer purges expired grants ------------------------------------------------------------

def test_the_timer_purges_the_grant_after_its_window_and_the_client_is_refused_again(site):
    container = site.container
    before = site.poplock("show").stdout
    assert re.search(rf"^{re.escape(GRANTED)} .* dovecot ", before, re.M), before
    expires = site.grants()[GRANTED]["expires"]

    wait_until(lambda: GRANTED not in site.grants(), f"the timer to purge {GRANTED}",
               timeout=WINDOW + 3 * EXPIRE_EVERY + 10, pause=0.5)
    after = site.poplock("show").stdout
    assert GRANTED not in after, after

    [expired] = site.wait_for_events(f"MESSAGE_ID={events.GRANT_EXPIRED.message_id}",
                                     f"POPLOCK_CLIENT_ADDRESS={GRANTED}")
    assert expired["_SYSTEMD_UNIT"] == EXPIRE  # purged by the service the timer runs
    assert expired["MESSAGE"] == f"grant for {GRANTED} expired at {expires}"
    timer = container.show(TIMER, "LastTriggerUSec", "ActiveState")
    assert timer["ActiveState"] == "active" and timer["LastTriggerUSec"] not in ("", "n/a", "0")
    assert "Triggers: ● poplock-expire.service" in container.systemctl("status", TIMER).stdout

    assert site.relay(GRANTED) == (550, MAILFRONT_REFUSAL)
    assert not site.may_relay(GRANTED)
    site.wait_for_events(f"MESSAGE_ID={events.RELAY_REFUSED.message_id}", f"POPLOCK_CLIENT_ADDRESS={GRANTED}")


# --- 4. restarts and crashes lose nothing and replay nothing ----------------------------------------

def journal_entries_after(site: Site, cursor: str) -> list[str]:
    """The cursors of the entries the reader selects (its matches, OR-ed with "+") after `cursor`."""
    return [entry["__CURSOR"] for entry in site.container.journal(
        "SYSLOG_IDENTIFIER=dovecot", "+", "_SYSTEMD_UNIT=dovecot.service", after_cursor=cursor)]


def assert_each_login_acted_on_once(site: Site, *addresses: str) -> None:
    for address in addresses:
        acted = site.login_events(address)
        assert [entry["POPLOCK_EVENT"] for entry in acted] == [events.LOGIN_GRANTED.name], (address, acted)
        reader_lines = [entry["MESSAGE"] for entry in site.container.journal(f"_SYSTEMD_UNIT={READER}")]
        assert sum(line.startswith(f"granted {address} until") for line in reader_lines) == 1, address


def test_restarting_the_reader_loses_no_grant_and_replays_no_login(site):
    container = site.container
    kept, removed, in_flight, after_restart = "127.0.0.21", "127.0.0.22", "127.0.0.23", "127.0.0.24"
    for address in (kept, removed):
        assert site.login(address)
        site.wait_until_granted(address)
    site.poplock("remove", removed)
    grants_before, cursor_before, reader_before = site.grants(), site.cursor(), site.reader()
    assert removed not in grants_before
    # Written by root, the store still belongs to the reader's user, and the SMTP side reads it through the group.
    assert container.run("stat", "--format=%U:%G %a", "/var/lib/poplock/grants.db").stdout.split() == [
        "poplock:poplock", "640"]

    # A login the old reader may or may not read before it stops: either way, granted exactly once.
    assert site.login(in_flight)
    container.systemctl("restart", READER)
    reader_after = site.reader()
    assert reader_after["ActiveState"] == "active"
    assert reader_after["MainPID"] != reader_before["MainPID"]
    assert reader_after["NRestarts"] == reader_before["NRestarts"]  # a restart asked for is not a crash
    site.wait_until_granted(in_flight)
    assert site.login(after_restart)
    site.wait_until_granted(after_restart)

    grants_after = site.grants()
    assert grants_after[kept] == grants_before[kept]
    assert removed not in grants_after
    cursor_after = site.cursor()
    assert cursor_after == cursor_before or cursor_after in journal_entries_after(site, cursor_before)
    invocation = [entry["MESSAGE"] for entry in container.journal(
        f"_SYSTEMD_INVOCATION_ID={reader_after['InvocationID']}")]
    assert "resuming after the saved journal position" in invocation, invocation
    assert not [line for line in invocation if "window back" in line or "cursor" in line]
    assert_each_login_acted_on_once(site, kept, removed, in_flight, after_restart)


def test_killing_the_reader_loses_no_grant_and_logins_while_it_is_down_are_granted_when_it_is_back(site):
    container = site.container
    kept, removed, while_down = "127.0.0.31", "127.0.0.32", "127.0.0.33"
    for address in (kept, removed):
        assert site.login(address)
        site.wait_until_granted(address)
    site.poplock("remove", removed)
    grants_before, cursor_before, reader_before = site.grants(), site.cursor(), site.reader()

    container.run("sh", "-c", f"kill -9 {reader_before['MainPID']}")
    down = wait_until(lambda: (state := site.reader())["SubState"] == "auto-restart" and state,
                      "systemd to schedule the reader's restart", timeout=10, pause=0.02)
    assert down["Result"] == "signal" and down["MainPID"] == "0"
    assert site.login(while_down)
    assert site.relay(kept)[0] == 250  # relaylock reads the store: mail flows while the reader is down
    assert site.reader()["SubState"] == "auto-restart"  # the login was made while the reader was down
    assert while_down not in site.grants()

    back = wait_until(lambda: (state := site.reader())["ActiveState"] == "active" and state,
                      "systemd to restart the reader", timeout=RESTART_SEC + 15, pause=0.1)
    assert int(back["NRestarts"]) == int(reader_before["NRestarts"]) + 1
    assert back["MainPID"] != reader_before["MainPID"]
    site.wait_until_granted(while_down)

    grants_after = site.grants()
    assert grants_after[kept] == grants_before[kept]
    assert removed not in grants_after
    # The cursor file is the second copy, written right after the store: wait for it to move on.
    cursor_after = wait_until(lambda: (cursor := site.cursor()) != cursor_before and cursor, "the cursor to move", 5)
    assert cursor_after in journal_entries_after(site, cursor_before)
    invocation = [entry["MESSAGE"] for entry in container.journal(f"_SYSTEMD_INVOCATION_ID={back['InvocationID']}")]
    assert "resuming after the saved journal position" in invocation, invocation
    assert_each_login_acted_on_once(site, kept, removed, while_down)


# --- 5. a configuration error ------------------------------------------------------------------------

def test_a_configuration_error_leaves_the_reader_failed_with_its_message_and_not_restarting(site):
    container = site.container
    broken = container.write_file("/etc/poplock/poplock.conf.d/90-broken.conf", "[Grants]\nWindow=soon\n")
    try:
        assert container.systemctl("restart", READER, check=False).returncode != 0
        failed = site.reader()
        assert (failed["ActiveState"], failed["SubState"], failed["Result"], failed["ExecMainStatus"]) == (
            "failed", "failed", "exit-code", "78")
        status = container.status(READER)
        assert "Active: failed (Result: exit-code)" in status, status
        assert "status=78/CONFIG" in status, status
        assert "/etc/poplock/poplock.conf.d/90-broken.conf:2: [Grants] Window=soon" in status, status
        assert failed["StatusText"].startswith(
            "invalid configuration: /etc/poplock/poplock.conf.d/90-broken.conf:2: [Grants] Window=soon: ")
        # Not restarting: still failed, and no restart counted, for longer than RestartSec.
        deadline = time.monotonic() + RESTART_SEC + 1
        while time.monotonic() < deadline:
            state = site.reader()
            assert (state["ActiveState"], state["NRestarts"], state["InvocationID"]) == (
                "failed", failed["NRestarts"], failed["InvocationID"]), state
            time.sleep(0.25)
    finally:
        broken.unlink()
    container.systemctl("start", READER)
    assert site.reader()["ActiveState"] == "active"


# --- 6. documentation and the journal ----------------------------------------------------------------

def test_every_installed_man_page_renders(site):
    container = site.container
    pages = sorted((container.root / MANDIR.lstrip("/")).glob("man*/*"))
    assert sorted(page.name for page in pages) == sorted(page.name for page in (REPOSITORY / "man").glob("*.[0-9]"))
    assert pages
    for page in pages:
        path = "/" + str(page.relative_to(container.root))
        result = container.run("man", "-l", path, environment={"MANWIDTH": "80"}, check=False)
        assert (result.returncode, result.stderr) == (0, ""), (path, result.stderr)
        name = page.name.rsplit(".", 1)[0]
        assert result.stdout.lstrip().startswith(f"{name.upper()}({page.suffix[1:]})"), path
        assert "NAME" in result.stdout and "DESCRIPTION" in result.stdout, path


def test_journalctl_finds_a_clients_events_by_its_address_and_each_event_by_its_message_id(site):
    container = site.container
    by_address = site.events(f"POPLOCK_CLIENT_ADDRESS={GRANTED}")
    # The POP3 session opened by the login ends with its logout: the grant is released then.
    assert [entry["POPLOCK_EVENT"] for entry in by_address] == [
        events.LOGIN_GRANTED.name, events.GRANT_RELEASED.name, events.RELAY_ALLOWED.name, events.GRANT_EXPIRED.name,
        events.RELAY_REFUSED.name]
    released = by_address[1]["POPLOCK_EXPIRES"]
    text = container.run("journalctl", "--no-pager", "--output=cat", f"POPLOCK_CLIENT_ADDRESS={GRANTED}").stdout
    lines = text.splitlines()
    assert lines[0].startswith(f"granted {GRANTED} until ") and "(dovecot login" in lines[0], text
    assert lines[1].startswith(f"released {GRANTED}: its last session ended; it relays until {released}"), text
    assert lines[2:] == [
        f"relay allowed for {GRANTED}: dovecot grant",
        f"grant for {GRANTED} expired at {released}",
        f"no relay for {GRANTED}: no grant",
    ], text

    for event in (events.LOGIN_GRANTED, events.RELAY_ALLOWED, events.GRANT_EXPIRED, events.RELAY_REFUSED):
        found = site.events(f"MESSAGE_ID={event.message_id}")
        assert {entry["POPLOCK_EVENT"] for entry in found} == {event.name}
        assert GRANTED in {entry.get("POPLOCK_CLIENT_ADDRESS") for entry in found}, event.name
    # Every client logged in once, so each was granted once: nothing was read twice all along,
    # and no login was read so late (a replay after its window) that it was too old to grant.
    assert site.events(f"MESSAGE_ID={events.LOGIN_TOO_OLD.message_id}") == []
    assert site.events(f"MESSAGE_ID={events.GRANT_EXTENDED.message_id}") == []
    granted = [entry["POPLOCK_CLIENT_ADDRESS"] for entry in site.events(
        f"MESSAGE_ID={events.LOGIN_GRANTED.message_id}")]
    assert sorted(granted) == sorted([GRANTED, "127.0.0.9", "127.0.0.13", "127.0.0.21", "127.0.0.22", "127.0.0.23",
                                      "127.0.0.24", "127.0.0.31", "127.0.0.32", "127.0.0.33"])


# --- 7. a server stopped without a word of its own ---------------------------------------------------



def test_pid_1_stopping_dovecot_ends_the_session_of_a_connected_imap_client_when_dovecot_logs_nothing(site):
    container = site.container
    connected = "127.0.0.41"
    imap_port = free_port()
    configuration = container.read_file("/etc/dovecot/dovecot.conf")
    with_imap = container_files({USER: PASSWORD}, site.pop3_port, imap_port=imap_port)
    container.write_file("/etc/dovecot/dovecot.conf", with_imap["etc/dovecot/dovecot.conf"])
    # `systemctl edit dovecot.service`: stopped with SIGKILL instead of `doveadm stop`, so that no
    # Dovecot process logs its end.
    killed = container.write_file("/etc/systemd/system/dovecot.service.d/kill.conf",
                                  "[Service]\nExecStop=\nKillSignal=SIGKILL\n")
    client = None
    try:
        container.systemctl("daemon-reload")
        container.systemctl("restart", "dovecot.service")
        container.systemctl("start", READER, SOCKET)  # as the story left them (or when run alone)
        wait_for_port("127.0.0.1", imap_port)
        client = imap_connection("127.0.0.1", imap_port, USER, PASSWORD, source=connected)
        held = wait_until(lambda: (grant := site.grants().get(connected)) and grant["sessions"] == 1 and grant,
                          f"the session of {connected} to hold its grant", timeout=15)
        assert held["live"] and timestamp(held["expires"]) > time.time() + 3600  # far past the window
        [login] = site.logged_lines(f"imap-login: Login: user=<{USER}>, method=PLAIN, rip={connected},",
                                    "_SYSTEMD_UNIT=dovecot.service")

        container.systemctl("stop", "dovecot.service")
        stopped_at = time.time()
        # Nothing of Dovecot's after the login: no logout, no stop line; only PID 1's job entries.
        assert [entry["MESSAGE"] for entry in container.journal(
            "_SYSTEMD_UNIT=dovecot.service", after_cursor=login["__CURSOR"])] == []
        jobs = container.journal("_PID=1", "UNIT=dovecot.service", after_cursor=login["__CURSOR"])
        assert {entry.get("MESSAGE_ID") for entry in jobs} & UNIT_JOB_MESSAGE_IDS, jobs

        released = wait_until(lambda: (grant := site.grants().get(connected)) and grant["sessions"] == 0 and grant,
                              f"the reader to end the session of {connected}", timeout=15)
        assert timestamp(released["expires"]) <= stopped_at + WINDOW + 1
        # After the stop's first job entry: the restart above ends sessions an earlier test left open,
        # and the reader may say so after the login, reading both in one batch.
        [ended] = wait_until(lambda: [entry for entry in container.journal(
            f"_SYSTEMD_UNIT={READER}", after_cursor=jobs[0]["__CURSOR"])
            if entry.get("MESSAGE_ID") == events.SESSIONS_ENDED.message_id],
            "the reader to say why the session ended", timeout=10)
        assert ended["MESSAGE"] == "dovecot restarted: 1 open sessions ended, 1 grants released"
        assert site.may_relay(connected)  # for the window after the stop, then no more
        wait_until(lambda: not site.may_relay(connected), f"the window of {connected} to pass",
                   timeout=WINDOW + 10, pause=0.5)
        assert site.relay(connected) == (550, MAILFRONT_REFUSAL)
    finally:
        if client is not None:
            client.shutdown()
        killed.unlink()
        container.write_file("/etc/dovecot/dovecot.conf", configuration)
        container.systemctl("daemon-reload")
        container.systemctl("restart", "dovecot.service")
        wait_for_port("127.0.0.1", site.pop3_port)


def timestamp(text: str) -> float:
    """Seconds since the epoch of a time `poplock show --json` prints."""
    import datetime

    return datetime.datetime.fromisoformat(text).timestamp()
