"""Fault suite: an unlucky administrator's configurations and machines, against the real programs.

Each fault once did harm (a destroyed store, a crash loop, an open relay, a traceback) and now
gets a clear error naming the file or path, an exit status from the documented set, and loses
nothing.
"""

import subprocess
import textwrap

import pytest
from support.journald import write_journal_file
from support.poplock import Setup, command, faketime

EX_CONFIG = 78
EX_IOERR = 74
EX_TEMPFAIL = 75


def relaylock(setup, address: str) -> subprocess.CompletedProcess:
    return subprocess.run([command("relaylock"), "-c", str(setup.config), "--", "sh", "-c",
                           'echo "ran ${RELAYCLIENT-unset}"'], env={"TCPREMOTEIP": address, "PATH": "/usr/bin:/bin"},
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("cursor", ["{store}", "{store}.lock", "{store}.new"])
def test_a_cursor_file_that_is_a_store_file_stops_every_writer_and_the_store_is_untouched(tmp_path, cursor):
    setup = Setup(tmp_path)
    setup.run("add", "192.0.2.7", check=True)
    before = setup.store.read_bytes()
    place = cursor.format(store=setup.store)
    setup.write(extra=f"CursorPath={place}\n")
    for result in (setup.run_reader(check=False), setup.run("config"), setup.run("add", "192.0.2.8")):
        assert result.returncode == EX_CONFIG, result
        assert f"{setup.config}:11: [Reader] CursorPath={place}: " in result.stderr
        assert "poplock's files must all be different" in result.stderr
    assert setup.store.read_bytes() == before
    assert relaylock(setup, "192.0.2.7").stdout == "ran \n"  # the grant is still there


@pytest.mark.parametrize("window", ["60y", "2100y", "10000y", "0"])
def test_a_window_out_of_bounds_stops_start_up_instead_of_granting_nothing_or_crashing(tmp_path, window):
    setup = Setup(tmp_path, window=window)
    for result in (setup.run_reader(check=False), setup.run("config"), setup.run("add", "192.0.2.7"),
                   setup.run("show")):
        assert result.returncode == EX_CONFIG, result
        assert f"{setup.config}:2: [Grants] Window={window}: must be from 1s to 24h" in result.stderr
        assert "Traceback" not in result.stderr
    assert not setup.store.exists()


@pytest.mark.parametrize("entry", ["0.0.0.0/0", "::/0", "::ffff:0.0.0.0/96", "0.0.0.0/1", "2000::/3"])
def test_an_allow_list_that_would_open_the_relay_to_the_internet_is_refused_with_its_line(setup, entry):
    setup.static.write_text(f"# our networks\n192.168.0.0/24\n{entry}\n")
    where = f"{setup.static}:3: {entry} covers too much of the internet to let it relay"
    result = relaylock(setup, "8.8.8.8" if ":" not in entry or "ffff" in entry else "2001:4860::8888")
    assert result.stdout == "ran unset\n"  # the server still runs; nobody relays by this list
    assert where in result.stderr
    for command_line in (["config"], ["check", "8.8.8.8"], ["show"]):
        refused = setup.run(*command_line)
        assert (refused.returncode, where in refused.stderr) == (EX_CONFIG, True), refused
    policy = subprocess.run([command("poplock-policy"), "-c", str(setup.config), "--listen", str(setup.directory
                             / "policy.socket")], capture_output=True, text=True, timeout=30)
    assert policy.returncode == EX_CONFIG and where in policy.stderr


def test_poplock_config_checks_the_static_allow_list_the_other_programs_read(setup):
    setup.static.write_text("192.168.0.0/24\nnot-a-network\n")
    result = setup.run("config")
    assert result.returncode == EX_CONFIG
    assert f"{setup.static}:2: not an IP address: 'not-a-network'" in result.stderr
    setup.static.unlink()
    setup.static.mkdir()
    result = setup.run("config")
    assert result.returncode == EX_CONFIG
    assert f"{setup.static}: cannot read: Is a directory" in result.stderr


# A read-only store directory, as root: a private mount namespace makes one without touching
# the machine. The script runs poplock there and prints what the test checks.
READ_ONLY = """
set -e
mount -t tmpfs -o size=4m tmpfs {directory}/ro
cp {directory}/poplock.conf {directory}/ro/ 2>/dev/null || true
{poplock} -c {config} add 192.0.2.7 >/dev/null
mount -o remount,ro {directory}/ro
set +e
{poplock} -c {config} add 192.0.2.8; echo "add=$?"
{reader} -c {config} --once --file {journal}; echo "reader=$?"
{python} -c '{leak}'
{poplock} -c {config} check 192.0.2.7; echo "check=$?"
"""

LEAK = """
import os
from poplock.errors import StoreError
from poplock.storewriter import StoreWriter
writer = StoreWriter("{store}")
before = len(os.listdir("/proc/self/fd"))
for _ in range(50):
    try:
        with writer.transaction() as transaction:
            transaction.metadata["x"] = str(_)
    except StoreError as error:
        message = str(error)
print("fds", before, len(os.listdir("/proc/self/fd")))
print("error", message)
"""


def test_a_read_only_store_directory_is_an_error_naming_the_path_and_leaks_nothing(tmp_path):
    (tmp_path / "ro").mkdir()
    store = tmp_path / "ro" / "grants.db"
    setup = Setup(tmp_path)
    setup.config.write_text(setup.config.read_text().replace(str(setup.store), str(store)))
    journal = write_journal_file(tmp_path / "remote.journal", [{
        "__REALTIME_TIMESTAMP": int(__import__("time").time() * 1e6) - 10_000_000, "SYSLOG_IDENTIFIER": "dovecot",
        "_UID": 0, "MESSAGE": "pop3-login: Login: user=<alice>, method=PLAIN, rip=192.0.2.9, lip=192.0.2.1, "
                              "mpid=4242, session=<b7aS8S1hfbZ/AAAF>"}])
    script = READ_ONLY.format(directory=tmp_path, poplock=command("poplock"), config=setup.config,
                              reader=command("poplock-reader"), journal=journal, python=command("python"),
                              leak=textwrap.dedent(LEAK.format(store=store)).replace("'", "'\"'\"'"))
    result = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                            capture_output=True, text=True, timeout=120)
    out, err = result.stdout, result.stderr
    assert "add=74" in out, (out, err)
    assert "poplock: error: cannot " in err and str(tmp_path / "ro") in err and "Read-only file system" in err
    assert "reader=75" in out, (out, err)
    assert f"cannot write the grant store {store}" in err or f"{store}.lock" in err, err
    assert "Traceback" not in err
    fds = next(line for line in out.splitlines() if line.startswith("fds")).split()
    assert fds[1] == fds[2], out  # 50 failed attempts, not one descriptor more
    assert str(tmp_path / "ro") in next(line for line in out.splitlines() if line.startswith("error"))
    assert "check=0" in out  # the grant made before is still honoured


# Clock steps, with the real programs under libfaketime: expiry is an absolute time.

def test_a_clock_stepped_back_a_day_does_not_keep_a_grant_for_a_day_and_the_window(setup):
    setup.run("add", "192.0.2.7", check=True)
    behind = faketime("-1d", command("poplock"), "-c", str(setup.config), "check", "192.0.2.7")
    assert behind.returncode == 1, behind
    assert "is in the future (was the clock stepped back?)" in behind.stdout
    relay = subprocess.run(["faketime", "-f", "-1d", command("relaylock"), "-c", str(setup.config), "--", "sh", "-c",
                            'echo "ran ${RELAYCLIENT-unset}"'],
                           env={"TCPREMOTEIP": "192.0.2.7", "PATH": "/usr/bin:/bin"},
                           capture_output=True, text=True, timeout=30)
    assert relay.stdout == "ran unset\n", relay.stderr
    assert setup.may_relay("192.0.2.7")  # with the clock right again, the grant is as it was


def test_a_grant_written_while_the_clock_ran_a_year_ahead_is_not_honoured_once_it_is_corrected(setup):
    ahead = faketime("+365d", command("poplock"), "-c", str(setup.config), "add", "192.0.2.8")
    assert ahead.returncode == 0, ahead
    checked = setup.run("check", "192.0.2.8")
    assert checked.returncode == 1 and "in the future" in checked.stdout
    assert "(not valid: its login time is in the future" in setup.run("show", "--all").stdout
    assert setup.run("expire", check=True).stdout == "purged 1 expired grant; 0 remain\n"
    setup.run("add", "192.0.2.8", check=True)  # a login (or a grant by hand) now makes it right
    assert setup.may_relay("192.0.2.8")
