"""poplock's programs when their log outputs are gone: journald not there (a socket file
left by a stopped journald refuses every datagram), or standard error closed or broken.
A command or the reader must neither fail nor lose a grant, and keeps what lines it can.

The journald cases run in a private mount namespace whose /run/systemd/journal is a
fresh tmpfs, so the machine's own journald (running or not) plays no part.
"""

import os
import subprocess
import time

import pytest
from support.journald import write_journal_file
from support.poplock import command

# Run "$@" with /run/systemd/journal replaced: empty ("absent") or holding a stale socket.
IN_PRIVATE_JOURNAL_DIRECTORY = """
mount -t tmpfs tmpfs /run/systemd/journal || exit 99
if [ "$1" = stale ]; then
    /usr/bin/python3 -c 'import socket, sys; socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).bind(sys.argv[1])' \
        /run/systemd/journal/socket || exit 99
fi
shift
exec "$@"
"""

# Make stderr look like a journal stream, as systemd sets it up for a service.
AS_SYSTEMD_SERVICE = """
import os, sys
st = os.fstat(2)
os.environ["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
os.execv(sys.argv[1], sys.argv[1:])
"""


def run_without_journald(state: str, *argv: str, as_service: bool = False) -> subprocess.CompletedProcess:
    if as_service:
        argv = ("/usr/bin/python3", "-c", AS_SYSTEMD_SERVICE, *argv)
    environment = {key: value for key, value in os.environ.items() if key not in ("NOTIFY_SOCKET", "JOURNAL_STREAM")}
    completed = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", IN_PRIVATE_JOURNAL_DIRECTORY, "sh",
         state, *argv],
        capture_output=True, text=True, timeout=60, env=environment)
    assert completed.returncode != 99, completed.stderr
    return completed


def login_journal(directory, address: str):
    journal = directory / "journal" / "remote.journal"
    journal.parent.mkdir()
    return write_journal_file(journal, [{
        "__REALTIME_TIMESTAMP": int((time.time() - 10) * 1e6), "SYSLOG_IDENTIFIER": "dovecot", "_UID": 0,
        "_PID": 801, "MESSAGE": f"pop3-login: Login: user=<alice>, method=PLAIN, rip={address}, "
                                "lip=192.0.2.1, mpid=4242, session=<b7aS8S1hfbZ/AAAF>"}])


@pytest.mark.parametrize("state", ["stale", "absent"])
def test_the_cli_works_when_journald_is_gone(setup, state):
    added = run_without_journald(state, command("poplock"), "-c", str(setup.config), "add", "192.0.2.7")
    assert added.returncode == 0, added.stderr
    # The change is made; the administrator learns that a rebuild from the journal cannot know it.
    assert added.stderr == ("poplock: warning: journald is not running, so this change is not in the journal: "
                            "a rebuild of the store will not know of it\n")
    assert "192.0.2.7" in added.stdout
    assert setup.may_relay("192.0.2.7")
    removed = run_without_journald(state, command("poplock"), "-c", str(setup.config), "remove", "192.0.2.7")
    assert removed.returncode == 0, removed.stderr
    assert not setup.may_relay("192.0.2.7")


def test_a_configuration_error_is_reported_when_journald_is_gone(setup):
    setup.config.write_text(setup.config.read_text() + "\n[Grants]\nWindow=soon\n")
    failed = run_without_journald("stale", command("poplock"), "-c", str(setup.config), "show")
    assert failed.returncode == 78
    assert f"{setup.config}:" in failed.stderr and "Window" in failed.stderr
    assert "Traceback" not in failed.stderr


def test_a_service_whose_journal_refuses_writes_its_events_to_stderr(setup, tmp_path):
    """Under systemd the reader logs natively; with journald down its events still reach stderr."""
    journal = login_journal(tmp_path, "192.0.2.10")
    read = run_without_journald("stale", command("poplock-reader"), "-c", str(setup.config), "--once",
                                "--file", str(journal), as_service=True)
    assert read.returncode == 0, read.stderr
    assert "Traceback" not in read.stderr
    granted = [line for line in read.stderr.splitlines() if "192.0.2.10" in line]
    assert granted and granted[0].startswith("poplock-reader: "), read.stderr
    assert setup.may_relay("192.0.2.10")


@pytest.mark.parametrize("stderr", ["closed", "broken pipe"])
def test_the_reader_grants_when_its_stderr_is_gone(setup, tmp_path, stderr):
    journal = login_journal(tmp_path, "192.0.2.11")
    redirect = '"$@" 2>&-' if stderr == "closed" else '"$@" 2>&1 | true'
    read = subprocess.run(["sh", "-c", f"{redirect}; echo status=$?", "sh", command("poplock-reader"),
                           "-c", str(setup.config), "--once", "--file", str(journal)],
                          capture_output=True, text=True, timeout=60)
    assert setup.may_relay("192.0.2.11")
    if stderr == "closed":
        assert read.stdout.strip() == "status=0"
