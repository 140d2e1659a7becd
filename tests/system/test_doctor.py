"""`poplock doctor` against real setups, each check once where it passes and once where it fails:
a real poplock-reader on the real journald (following, stopped, stuck), real Dovecot logging to
syslog and to a file, Postfix configuration directories read by the real postconf, socket units
whose places a real poplock-policy listens on, and a real store readable or not by `nobody`.

Each test's source reads only the test's own SYSLOG_IDENTIFIER, so other tests' entries in the
machine-wide journal never count.
"""

from __future__ import annotations

import grp
import os
import signal
import subprocess
from pathlib import Path

import pytest
from support.dovecot import Dovecot
from support.journald import unique_tag, wait_for_entries
from support.mailclients import pop3_login
from support.poplock import PolicyProcess, ReaderProcess, Setup, command_for_everyone
from support.processes import reachable_by_everyone
from systemd import journal

pytestmark = [pytest.mark.system, pytest.mark.postfix]

RESTRICTIONS_IN_ORDER = ("permit_mynetworks, check_policy_service {{ {place}, timeout=2s, try_limit=1, "
                         "default_action=DUNNO }}, reject_unauth_destination")


def login_line(address: str) -> str:
    return (f"pop3-login: Login: user=<user-{address}>, method=PLAIN, rip={address}, lip=127.0.0.1, mpid=4242, "
            f"session=<b7aS8S1hfbZ/AAAF>")


@pytest.fixture
def tagged(journald, tmp_path):
    """A Setup whose dovecot source reads only this test's identifier, and an empty unit directory."""
    tag = unique_tag()
    setup = Setup(tmp_path, extra=f"\n[Source:dovecot]\nIdentifiers={tag}\n")
    setup.tag = tag
    setup.units = tmp_path / "units"
    setup.units.mkdir()
    return setup


def doctor(setup, *arguments: str) -> subprocess.CompletedProcess:
    """`poplock doctor` on the test's configuration and unit directory, the store checked for `nobody`."""
    return setup.run("doctor", "--unit-directory", str(setup.units), "--user", "nobody", *arguments)


def status_of(output: str, containing: str) -> str:
    """The status word of the one check line that contains `containing`."""
    found = [line.split()[0] for line in output.splitlines() if not line.startswith(" ") and containing in line]
    assert len(found) == 1, f"{containing!r} in one line of:\n{output}"
    return found[0]


def log_as_root(setup, message: str, count: int) -> None:
    """Log as Dovecot's log process does, and wait until journald holds `count` entries of the tag."""
    journal.send(message, SYSLOG_IDENTIFIER=setup.tag)
    wait_for_entries({"SYSLOG_IDENTIFIER": setup.tag}, count)


def write_main_cf(directory: Path, restrictions: str, queue_directory: Path | None = None) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    queue = f"queue_directory = {queue_directory}\n" if queue_directory else ""
    (directory / "main.cf").write_text(f"compatibility_level = 3.6\n{queue}smtpd_relay_restrictions = {restrictions}\n")
    return directory


def enable_socket_unit(units: Path, name: str, listen: str) -> None:
    """The unit file and the link `systemctl enable` makes for it."""
    (units / name).write_text(f"[Unit]\nDescription=test\n\n[Socket]\nListenStream={listen}\n\n"
                              "[Install]\nWantedBy=sockets.target\n")
    wants = units / "sockets.target.wants"
    wants.mkdir(exist_ok=True)
    (wants / name).symlink_to(units / name)


# --- the reader -----------------------------------------------------------------------------------

def test_a_following_reader_passes_and_once_stopped_it_is_reported_not_running_and_behind(tagged):
    with ReaderProcess(tagged) as reader:
        log_as_root(tagged, login_line("192.0.2.7"), 1)
        tagged.wait_until_allowed("192.0.2.7")
        found = doctor(tagged).stdout
        assert status_of(found, "poplock-reader is running and following") == "ok"
        assert status_of(found, "poplock-reader is not behind") == "ok"
        reader.stop()
    log_as_root(tagged, login_line("192.0.2.8"), 2)  # nobody reads it now
    result = doctor(tagged, "--max-behind", "0")
    assert status_of(result.stdout, "poplock-reader is not running") == "FAIL"
    assert status_of(result.stdout, "poplock-reader is behind: it has not read 1 journal entry for it") == "FAIL"
    assert result.returncode == 1


def test_a_stuck_reader_is_reported_as_not_answering_and_behind(tagged):
    with ReaderProcess(tagged) as reader:
        log_as_root(tagged, login_line("192.0.2.9"), 1)
        tagged.wait_until_allowed("192.0.2.9")
        os.kill(reader.process.pid, signal.SIGSTOP)
        try:
            log_as_root(tagged, login_line("192.0.2.10"), 2)
            result = doctor(tagged, "--max-behind", "0")
        finally:
            os.kill(reader.process.pid, signal.SIGCONT)
    assert status_of(result.stdout, "poplock-reader does not answer") == "FAIL"
    assert status_of(result.stdout, "poplock-reader is behind") == "FAIL"
    assert "systemctl restart poplock-reader" in result.stdout
    assert result.returncode == 1


def test_a_reader_that_does_not_listen_is_found_by_its_process(tagged):
    tagged.write(extra=f"\n[Source:dovecot]\nIdentifiers={tagged.tag}\n")
    tagged.config.write_text(tagged.config.read_text().replace("[Store]\n", "[Store]\nReaderWait=0\n"))
    with ReaderProcess(tagged) as reader:
        found = doctor(tagged).stdout
    line = next(line for line in found.splitlines() if line.startswith("ok    poplock-reader is running (pid "))
    assert str(reader.process.pid) in line.partition("(pid ")[2].rstrip(")").split(", ")


# --- the watched sources --------------------------------------------------------------------------

def test_a_source_that_logged_passes_and_one_that_logged_nothing_fails(tagged):
    log_as_root(tagged, login_line("192.0.2.11"), 1)
    assert status_of(doctor(tagged).stdout, "source dovecot logged to the journal 1 time since") == "ok"

    (tagged.directory / "silent").mkdir()
    silent = Setup(tagged.directory / "silent", extra=f"\n[Source:dovecot]\nIdentifiers={unique_tag()}\n")
    silent.units = tagged.units
    result = doctor(silent)
    assert status_of(result.stdout, "source dovecot has logged nothing to the journal") == "FAIL"
    assert result.returncode == 1


def test_a_source_whose_entries_are_all_forged_fails(tagged):
    # What any local user can do: claim the identifier with logger(1). None of it is trusted.
    subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                    "logger", "-t", tagged.tag, login_line("203.0.113.66")], check=True)
    wait_for_entries({"SYSLOG_IDENTIFIER": tagged.tag}, 1)
    result = doctor(tagged)
    assert status_of(result.stdout, "1 journal entry since") == "FAIL"
    assert "none comes from a unit or user it trusts" in result.stdout


def test_a_source_with_a_unit_file_passes_and_without_one_it_is_trusted_by_user_alone(tagged):
    assert status_of(doctor(tagged).stdout, "source dovecot:") == "warn"  # no dovecot.service in the directory
    (tagged.units / "dovecot.service").write_text("[Service]\nExecStart=/usr/sbin/dovecot -F\n")
    assert status_of(doctor(tagged).stdout, "source dovecot exists here (dovecot.service)") == "ok"


def test_a_source_trusted_by_its_unit_alone_fails_without_its_unit_file(tagged):
    tagged.write(extra=f"\n[Source:dovecot]\nIdentifiers={tagged.tag}\nUnits=poplock-test-imapd.service\nUsers=\n")
    result = doctor(tagged)
    assert status_of(result.stdout, "source dovecot: none of its units (poplock-test-imapd.service)") == "FAIL"
    (tagged.units / "poplock-test-imapd.service").write_text("[Service]\nExecStart=/bin/true\n")
    assert status_of(doctor(tagged).stdout, "source dovecot exists here (poplock-test-imapd.service)") == "ok"


def test_a_user_who_cannot_read_the_journal_is_told_so_not_that_nothing_was_logged(tagged):
    log_as_root(tagged, login_line("192.0.2.12"), 1)
    reachable_by_everyone(tagged.directory)
    result = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                             command_for_everyone("poplock"), "-c", str(tagged.config), "doctor",
                             "--unit-directory", str(tagged.units)], capture_output=True, text=True, timeout=60)
    assert status_of(result.stdout, "source dovecot: cannot read the journal: no journal file could be opened") \
        == "FAIL"
    assert "systemd-journal group" in result.stdout
    assert "logged nothing" not in result.stdout
    assert result.returncode == 1


# --- Dovecot --------------------------------------------------------------------------------------

class DovecotLoggingToFile(Dovecot):
    """Dovecot with the common `log_path = FILE`: its logins never reach the journal."""

    def _write_config(self) -> Path:
        config = super()._write_config()
        self.log_file = self.directory / "dovecot.log"
        config.write_text(config.read_text().replace("log_path = syslog", f"log_path = {self.log_file}"))
        return config


def test_dovecot_logging_to_syslog_passes_and_to_a_file_fails_though_logins_succeed(tagged, tmp_path):
    with Dovecot(tmp_path / "syslog", {"alice": "secret"}, tls=False, identifier=tagged.tag) as dovecot:
        assert pop3_login("127.0.0.1", dovecot.pop3_port, "alice", "secret", source="127.0.0.5")
        good = doctor(tagged, "--dovecot-config", str(dovecot.directory / "dovecot.conf")).stdout
    assert status_of(good, "Dovecot logs its logins to syslog") == "ok"

    with DovecotLoggingToFile(tmp_path / "file", {"bob": "secret"}, tls=False, identifier=tagged.tag) as dovecot:
        assert pop3_login("127.0.0.1", dovecot.pop3_port, "bob", "secret", source="127.0.0.6")
        bad = doctor(tagged, "--dovecot-config", str(dovecot.directory / "dovecot.conf"))
        assert "rip=127.0.0.6" in dovecot.log_file.read_text()  # the login happened, into the file
    assert status_of(bad.stdout, f"Dovecot writes its logins to the file {dovecot.log_file}") == "FAIL"
    assert "log_path = syslog" in bad.stdout
    assert bad.returncode == 1


def test_a_dovecot_configuration_that_doveconf_cannot_read_fails(tagged, tmp_path):
    result = doctor(tagged, "--dovecot-config", str(tmp_path / "missing.conf"))
    assert status_of(result.stdout, "Dovecot's logging:") == "FAIL"


# --- Postfix --------------------------------------------------------------------------------------

def test_postfix_asking_poplock_in_order_passes(tagged, tmp_path):
    queue = tmp_path / "queue"
    (queue / "private").mkdir(parents=True)
    postfix = write_main_cf(tmp_path / "postfix", RESTRICTIONS_IN_ORDER.format(place="unix:private/poplock"),
                            queue)
    with PolicyProcess(tagged, str(queue / "private" / "poplock")):
        found = doctor(tagged, "--postfix-config", str(postfix)).stdout
    assert status_of(found, "Postfix asks poplock (unix:private/poplock) in smtpd_relay_restrictions") == "ok"
    assert status_of(found, "the poplock service Postfix asks (unix:private/poplock) listens") == "ok"
    after = doctor(tagged, "--postfix-config", str(postfix)).stdout  # poplock-policy stopped
    assert status_of(after, "the poplock service Postfix asks (unix:private/poplock) does not listen") == "FAIL"


@pytest.mark.parametrize(("restrictions", "expected"), [
    ("permit_mynetworks, reject_unauth_destination, check_policy_service unix:private/poplock",
     "only after reject_unauth_destination"),
    ("permit_mynetworks, permit_sasl_authenticated, defer_unauth_destination", "Postfix does not ask poplock"),
    ("permit_mynetworks, check_client_access socketmap:unix:private/poplock-socketmap:poplock",
     "nothing after it refuses"),
    ("permit, check_policy_service unix:private/poplock, reject_unauth_destination", "an open relay"),
])
def test_postfix_asking_poplock_in_a_broken_order_or_not_at_all_fails(tagged, tmp_path, restrictions, expected):
    postfix = write_main_cf(tmp_path / "postfix", restrictions)
    result = doctor(tagged, "--postfix-config", str(postfix))
    assert status_of(result.stdout, expected) == "FAIL"
    assert result.returncode == 1


def test_postfix_asking_poplock_before_permit_mynetworks_is_a_warning(tagged, tmp_path):
    postfix = write_main_cf(tmp_path / "postfix", "check_policy_service unix:private/poplock, permit_mynetworks, "
                                                  "reject_unauth_destination")
    assert status_of(doctor(tagged, "--postfix-config", str(postfix)).stdout, "before permit_mynetworks") == "warn"


def test_a_postfix_directory_without_main_cf_fails(tagged, tmp_path):
    result = doctor(tagged, "--postfix-config", str(tmp_path))
    assert status_of(result.stdout, "Postfix: `postconf") == "FAIL"


# --- socket units ---------------------------------------------------------------------------------

def test_an_enabled_socket_unit_that_listens_passes_and_one_that_does_not_fails(tagged, tmp_path):
    with PolicyProcess(tagged) as policy:
        enable_socket_unit(tagged.units, "poplock-policy.socket", f"127.0.0.1:{policy.port}")
        # A policy service at a TCP port is known for poplock's by its socket unit's place.
        postfix = write_main_cf(tmp_path / "postfix", RESTRICTIONS_IN_ORDER.format(
            place=f"inet:127.0.0.1:{policy.port}"))
        found = doctor(tagged, "--postfix-config", str(postfix)).stdout
    assert status_of(found, f"poplock-policy.socket listens on 127.0.0.1:{policy.port}") == "ok"
    assert status_of(found, f"Postfix asks poplock (inet:127.0.0.1:{policy.port})") == "ok"
    result = doctor(tagged)
    assert status_of(result.stdout, f"poplock-policy.socket does not listen on 127.0.0.1:{policy.port}") == "FAIL"
    assert "systemctl enable --now poplock-policy.socket" in result.stdout
    assert result.returncode == 1


def test_a_socket_unit_that_is_not_enabled_is_not_checked(tagged):
    (tagged.units / "poplock-socketmap.socket").write_text("[Socket]\nListenStream=/nonexistent/socket\n")
    assert "poplock-socketmap.socket" not in doctor(tagged).stdout


# --- the store and the lists ----------------------------------------------------------------------

def test_a_store_nobody_may_read_passes_and_one_only_root_may_read_fails(tagged):
    tagged.run("add", "192.0.2.20", check=True)
    reachable_by_everyone(tagged.directory)
    tagged.store.chmod(0o644)
    assert status_of(doctor(tagged).stdout, "is readable by nobody") == "ok"
    tagged.store.chmod(0o600)
    result = doctor(tagged)
    assert status_of(result.stdout, "is not readable by nobody") == "FAIL"
    assert "Permission denied" in result.stdout
    assert result.returncode == 1


def test_a_missing_store_and_a_missing_user_fail(tagged):
    assert status_of(doctor(tagged).stdout, "there is no store at") == "FAIL"
    tagged.run("add", "192.0.2.21", check=True)
    found = tagged.run("doctor", "--unit-directory", str(tagged.units), "--user", "no-such-user-here").stdout
    assert status_of(found, "there is no user no-such-user-here") == "FAIL"


def test_a_sane_allow_list_passes_and_one_that_opens_the_relay_fails(tagged):
    tagged.static.write_text("192.0.2.0/24\n2001:db8::/48\n")
    assert status_of(doctor(tagged).stdout, "static allow list") == "ok"
    tagged.static.write_text("192.0.2.0/24\n0.0.0.0/0\n")
    result = doctor(tagged)
    assert status_of(result.stdout, "static allow list") == "FAIL"
    assert f"{tagged.static}:2: 0.0.0.0/0 covers too much of the internet" in result.stdout
    assert result.returncode == 1


def test_a_deny_list_with_a_bad_line_fails(tagged):
    deny = tagged.directory / "denied"
    tagged.write(extra=f"\n[Source:dovecot]\nIdentifiers={tagged.tag}\n")
    tagged.config.write_text(tagged.config.read_text().replace("[Grants]\n", f"[Grants]\nDenyFile={deny}\n"))
    deny.write_text("user mallory\n")
    assert status_of(doctor(tagged).stdout, "the deny list") == "ok"
    deny.write_text("not an address\n")
    assert status_of(doctor(tagged).stdout, "the deny list") == "FAIL"


# --- all together ---------------------------------------------------------------------------------

def test_a_healthy_system_passes_every_check_and_exits_0(tagged, tmp_path):
    tagged.static.write_text("192.0.2.0/24\n")
    (tagged.units / "dovecot.service").write_text("[Service]\nExecStart=/usr/sbin/dovecot -F\n")
    queue = tmp_path / "queue"
    (queue / "private").mkdir(parents=True)
    postfix = write_main_cf(tmp_path / "postfix", RESTRICTIONS_IN_ORDER.format(place="unix:private/poplock"),
                            queue)
    policy_socket = queue / "private" / "poplock"
    # As tmpfiles.d/poplock.conf makes /var/lib/poplock: the store's files inherit the directory's
    # group (here nobody's), which may read them (0640).
    os.chown(tagged.directory, -1, grp.getgrnam("nogroup").gr_gid)
    tagged.directory.chmod(0o2750)
    reachable_by_everyone(tagged.directory)
    with Dovecot(tmp_path / "dovecot", {"alice": "secret"}, tls=False, identifier=tagged.tag) as dovecot, \
            ReaderProcess(tagged), PolicyProcess(tagged, str(policy_socket)):
        enable_socket_unit(tagged.units, "poplock-policy.socket", str(policy_socket))
        assert pop3_login("127.0.0.1", dovecot.pop3_port, "alice", "secret", source="127.0.0.7")
        tagged.wait_until_allowed("127.0.0.7")
        result = doctor(tagged, "--dovecot-config", str(dovecot.directory / "dovecot.conf"),
                        "--postfix-config", str(postfix))
    assert [line for line in result.stdout.splitlines() if not line.startswith("ok")] == [], result.stdout
    assert result.returncode == 0, result.stdout + result.stderr
