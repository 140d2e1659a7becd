"""`poplock stats` counting what the real programs logged: poplock-reader over a journal file of
Dovecot logins, poplock-policy answering Postfix requests and relaylock deciding connections, all
logging natively into a private journald, which `poplock stats -D` then reads. The Prometheus file
is checked with promtool, unpacked from Debian's prometheus package."""

import datetime
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
from support.journald import PrivateJournald, write_journal_file
from support.notify import NotifySocket
from support.poplock import command, command_for_everyone, journal_stream
from support.processes import reachable_by_everyone

from poplock import events
from poplock.logs import iso_time
from poplock.stats import MESSAGE_IDS
from poplock.storewriter import StoreWriter

WINDOW = 1800

REQUEST = ("request=smtpd_access_policy\nprotocol_state=RCPT\nprotocol_name=ESMTP\nclient_address={client}\n"
           "client_name=unknown\nhelo_name=client.poplock.test\nsender=sender@poplock.test\n"
           "recipient=someone@elsewhere.example\nrecipient_count=0\n\n")


@pytest.fixture
def journald(tmp_path):
    """A journald of the test's own: only the programs started in its namespace log there."""
    private = PrivateJournald(tmp_path / "journald").start()
    yield private
    private.stop()


@pytest.fixture(scope="session")
def promtool() -> str:
    """promtool from Debian's prometheus package, unpacked (never installed: it would bring a
    Prometheus server and its web assets) beside the test servers, as tests/support/popservers.py does."""
    from support.popservers import unpacked_tool

    return str(unpacked_tool("prometheus") / "usr" / "bin" / "promtool")


def in_journal(journald: PrivateJournald, argv: list[str]) -> list[str]:
    """`argv` run in a mount namespace where /run/systemd/journal is the private journald's."""
    return ["unshare", "--mount", "--propagation", "private", "/bin/sh", "-c",
            'mount --bind "$0" /run/systemd/journal && exec "$@"', str(journald.sockets), *argv]


def run_logging(journald: PrivateJournald, argv: list[str], log: Path, environment: dict | None = None,
                **options) -> subprocess.CompletedProcess:
    """`argv` to completion, its standard error a journal stream, as under systemd: it logs natively."""
    with open(log, "ab") as output:
        env = {key: value for key, value in os.environ.items() if key != "NOTIFY_SOCKET"}
        env.update(environment or {}, JOURNAL_STREAM=journal_stream(output))
        return subprocess.run(in_journal(journald, argv), stdout=subprocess.PIPE, stderr=output, env=env,
                              timeout=60, **options)


def dovecot(address: str, user: str, at: float) -> dict:
    message = f"pop3-login: Login: user=<{user}>, method=PLAIN, rip={address}, lip=192.0.2.1, mpid=4242, TLS"
    return {"__REALTIME_TIMESTAMP": int(at * 1e6), "MESSAGE": message, "SYSLOG_IDENTIFIER": "dovecot",
            "_UID": 0, "_GID": 0, "_COMM": "log", "_PID": 801, "_TRANSPORT": "syslog", "PRIORITY": 6}


def write_config(setup, policy_log_refused: bool) -> None:
    (setup.directory / "denied").write_text("198.51.100.0/24\n")
    setup.config.write_text(
        f"[Grants]\nWindow=30min\nStaticAllowFile={setup.static}\nDenyFile={setup.directory / 'denied'}\n"
        f"MaxAddressesPerUser=1\n\n"
        f"[Store]\nPath={setup.store}\nReaderWait=0\n\n"
        f"[Reader]\nCursorPath={setup.cursor}\n\n"
        f"[Policy]\nLogRefused={'yes' if policy_log_refused else 'no'}\n")


def read_logins(setup, journald, tmp_path, now: float) -> None:
    """poplock-reader over a journal file of seven Dovecot logins: three new grants, one extension,
    one denied, one over the account's limit, one read after its window."""
    logins = tmp_path / "logins" / "dovecot.journal"
    logins.parent.mkdir()
    write_journal_file(logins, [
        {**dovecot("192.0.2.1", "root", now - 3 * WINDOW), "MESSAGE": "master: Dovecot v2.3.19.1 starting up"},
        dovecot("192.0.2.30", "erin", now - WINDOW - 60),  # read only now: too old
        dovecot("192.0.2.10", "alice", now - 600),
        dovecot("192.0.2.10", "alice", now - 300),  # extends
        dovecot("192.0.2.11", "bob", now - 200),
        dovecot("192.0.2.40", "carol", now - 150),
        dovecot("192.0.2.41", "carol", now - 140),  # carol's second address: over MaxAddressesPerUser=1
        dovecot("198.51.100.7", "dave", now - 100),  # in the deny list
    ])
    from systemd import journal as systemd_journal

    reader = systemd_journal.Reader(files=[str(logins)])
    first = reader.get_next()["__CURSOR"]
    reader.close()
    with StoreWriter(str(setup.store)).transaction() as transaction:  # the reader was down since then
        transaction.metadata[f"cursor:{setup.cursor}"] = first
    result = run_logging(journald, [command("poplock-reader"), "-c", str(setup.config), "--once", "--file",
                                    str(logins)], tmp_path / "reader.log")
    assert result.returncode == 0, (tmp_path / "reader.log").read_text()


def forge_login(journald, tmp_path) -> None:
    """A local user's native entry that looks like poplock-reader's (logger --journald): it counts for nothing."""
    fields = (f"MESSAGE=granted 203.0.113.66\nMESSAGE_ID={events.LOGIN_GRANTED.message_id}\n"
              "POPLOCK_EVENT=login-granted\nSYSLOG_IDENTIFIER=poplock-reader\nPOPLOCK_CLIENT_ADDRESS=203.0.113.66\n"
              "POPLOCK_EXPIRES=2030-01-01T00:00:00+00:00\n")
    result = run_logging(journald, ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                                    "logger", "--journald"], tmp_path / "forged.log", input=fields.encode())
    assert result.returncode == 0, (tmp_path / "forged.log").read_text()


def ask_policy(setup, journald, tmp_path, clients: list[str]) -> list[str]:
    """poplock-policy, in the private journal's namespace, asked once for each client."""
    from support.ports import free_port

    port = free_port()
    log = tmp_path / "policy.log"
    with NotifySocket(setup.directory) as notify, open(log, "wb") as output:
        env = {key: value for key, value in os.environ.items() if key != "NOTIFY_SOCKET"}
        env.update(notify.environment, JOURNAL_STREAM=journal_stream(output))
        process = subprocess.Popen(in_journal(journald, [command("poplock-policy"), "-c", str(setup.config),
                                                         "--listen", f"127.0.0.1:{port}"]),
                                   stdout=output, stderr=output, env=env)
        try:
            notify.wait_for("READY=1")
            replies = []
            with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
                for client in clients:
                    connection.sendall(REQUEST.format(client=client).encode())
                    reply = b""
                    while not reply.endswith(b"\n\n"):
                        data = connection.recv(4096)
                        assert data, log.read_text()
                        reply += data
                    replies.append(reply.decode().strip())
        finally:
            process.terminate()
            process.wait(15)
    return replies


def run_relaylock(setup, journald, tmp_path, client: str) -> str:
    result = run_logging(journald, [command("relaylock"), "-c", str(setup.config), "--", "/usr/bin/env"],
                         tmp_path / "relaylock.log", {"TCPREMOTEIP": client}, text=True)
    assert result.returncode == 0
    return "RELAYCLIENT=" if "RELAYCLIENT=" in result.stdout else ""


def wait_for_events(journald, count: int) -> None:
    """Until journald has written `count` entries that stats counts (it takes datagrams asynchronously)."""
    deadline = time.monotonic() + 15
    while len([entry for entry in journald.entries() if entry.get("MESSAGE_ID") in MESSAGE_IDS]) < count:
        assert time.monotonic() < deadline, [entry.get("MESSAGE") for entry in journald.entries()]
        time.sleep(0.05)


@pytest.fixture
def logged(setup, journald, tmp_path):
    """The journal after logins, decisions and a forgery; the time between the logins and the decisions."""
    now = time.time()
    write_config(setup, policy_log_refused=True)
    read_logins(setup, journald, tmp_path, now)
    forge_login(journald, tmp_path)
    wait_for_events(journald, 7 + 1)
    between = time.time()
    replies = ask_policy(setup, journald, tmp_path, ["192.0.2.10", "192.0.2.11", "203.0.113.9", "192.0.2.40",
                                                     "203.0.113.9", "192.0.2.41"])
    assert replies == ["action=OK", "action=OK", "action=DUNNO", "action=OK", "action=DUNNO", "action=DUNNO"]
    assert run_relaylock(setup, journald, tmp_path, "192.0.2.11") == "RELAYCLIENT="
    assert run_relaylock(setup, journald, tmp_path, "203.0.113.10") == ""
    assert run_relaylock(setup, journald, tmp_path, "198.51.100.7") == ""
    wait_for_events(journald, 8 + 6 + 3)
    return between


def precise(seconds: float) -> str:
    """A time for --since and --until to the microsecond (iso_time stops at the second)."""
    return datetime.datetime.fromtimestamp(seconds).astimezone().isoformat()


def stats(setup, journald, *arguments: str) -> subprocess.CompletedProcess:
    return setup.run("stats", "-D", str(journald.storage), *arguments)


def test_stats_counts_exactly_what_the_reader_the_policy_service_and_relaylock_logged(setup, journald, logged):
    result = stats(setup, journald, "--json")
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["grants"] == {"live": 3, "expired": 0}  # 192.0.2.10, .11 and .40
    assert record["logins"] == {"granted": 3, "extended": 1, "denied": 1, "over_limit": 1, "too_old": 1}
    assert record["relays"] == {
        "allowed": {"relaylock": 1, "poplock-policy": 3, "poplock-socketmap": 0},
        "refused": {"relaylock": 2, "poplock-policy": 3, "poplock-socketmap": None},  # [Socketmap] LogRefused=no
    }


def test_the_period_bounds_what_is_counted(setup, journald, logged):
    later = json.loads(stats(setup, journald, "--json", "--since", precise(logged)).stdout)
    assert later["logins"] == {"granted": 0, "extended": 0, "denied": 0, "over_limit": 0, "too_old": 0}
    assert later["relays"]["allowed"] == {"relaylock": 1, "poplock-policy": 3, "poplock-socketmap": 0}
    earlier = json.loads(stats(setup, journald, "--json", "--since", "-1h", "--until", precise(logged)).stdout)
    assert earlier["logins"]["granted"] == 3 and earlier["logins"]["too_old"] == 1
    assert earlier["relays"]["allowed"] == {"relaylock": 0, "poplock-policy": 0, "poplock-socketmap": 0}
    assert earlier["since"] < earlier["until"] == iso_time(logged)
    assert stats(setup, journald, "--since", "-1h", "--until", "-2h").returncode == os.EX_USAGE


def test_the_human_output_is_aligned_lines_that_say_what_is_not_logged(setup, journald, logged):
    result = stats(setup, journald)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("period          ")
    assert lines[1:] == [
        "live grants     3",
        "expired grants  0  not yet purged",
        "logins granted  4  3 new, 1 extended",
        "logins refused  3  1 by the deny list, 1 over an account's limit, 1 read after their window",
        "relays allowed  4  relaylock 1, poplock-policy 3, poplock-socketmap 0",
        "relays refused  5  relaylock 2, poplock-policy 3, poplock-socketmap not logged ([Socketmap] LogRefused=no)",
    ]


def test_the_prometheus_file_is_written_whole_and_passes_promtool(setup, journald, logged, promtool, tmp_path):
    textfiles = tmp_path / "textfile_collector"
    textfiles.mkdir()
    target = textfiles / "poplock.prom"
    target.write_text("old\n")
    result = stats(setup, journald, "--prometheus", str(target))
    assert result.returncode == 0 and result.stdout == "", result.stderr
    assert os.listdir(textfiles) == ["poplock.prom"]  # the temporary file was renamed, none left behind
    assert target.stat().st_mode & 0o777 == 0o644  # node_exporter runs as a user of its own
    text = target.read_text()
    lint = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert lint.returncode == 0 and lint.stdout + lint.stderr == "", lint.stdout + lint.stderr
    samples = [line for line in text.splitlines() if not line.startswith("#")]
    assert 'poplock_grants{state="live"} 3' in samples
    assert 'poplock_period_seconds 86400' in samples
    assert 'poplock_period_logins{result="granted"} 3' in samples
    assert 'poplock_period_logins{result="over_limit"} 1' in samples
    assert 'poplock_period_relays{program="poplock-policy",decision="refused"} 3' in samples
    assert 'poplock_period_relays{program="relaylock",decision="refused"} 2' in samples
    assert not [line for line in samples if 'program="poplock-socketmap",decision="refused"' in line]


def test_promtool_rejects_what_the_textfile_collector_would_not_take(promtool):
    # The check that passes above can fail: a counter without _total, and a sample without its metric's TYPE.
    bad = "# HELP poplock_relays Relays.\n# TYPE poplock_relays counter\npoplock_relays 3\n"
    assert subprocess.run([promtool, "check", "metrics"], input=bad, capture_output=True, text=True).returncode != 0


def test_a_journal_that_cannot_be_read_is_an_error_not_zeros(setup, journald, logged, tmp_path):
    missing = setup.run("stats", "-D", str(tmp_path / "none"))  # a directory that does not exist
    assert missing.returncode == os.EX_NOINPUT and "cannot open the journal" in missing.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    assert setup.run("stats", "-D", str(empty)).returncode == os.EX_NOINPUT
    # As a user who may not read the journal files: an error, whether -D or the system journal.
    everyone = tmp_path / "everyone.conf"
    shutil.copy(setup.config, everyone)
    everyone.chmod(0o644)
    reachable_by_everyone(everyone)
    as_nobody = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", command_for_everyone("poplock"),
                 "-c", str(everyone), "stats"]
    for where in (["-D", str(journald.storage)], []):
        result = subprocess.run(as_nobody + where, capture_output=True, text=True, timeout=60)
        assert result.returncode == os.EX_NOINPUT, result.stdout + result.stderr
        assert "cannot read" in result.stderr or "cannot open" in result.stderr
        assert result.stdout == ""


def test_a_prometheus_file_that_cannot_be_written_is_an_error(setup, journald, logged, tmp_path):
    result = stats(setup, journald, "--prometheus", str(tmp_path / "missing" / "poplock.prom"))
    assert result.returncode == os.EX_CANTCREAT and "cannot write" in result.stderr


def man_page_units() -> dict[str, str]:
    """The example units of poplock(8)'s STATISTICS section, by file name, as an admin would write them."""
    page = (Path(__file__).resolve().parents[2] / "man" / "poplock.8").read_text()
    section = page.split(".Sh STATISTICS\n", 1)[1].split("\n.Sh ", 1)[0]
    units = {}
    for name in ("poplock-stats.service", "poplock-stats.timer"):
        after = section.split(f".Pa /etc/systemd/system/{name} :\n.Bd -literal -offset indent\n", 1)[1]
        units[name] = after.split("\n.Ed\n", 1)[0].replace("\\e", "\\") + "\n"
    return units


def test_the_man_pages_timer_passes_systemd_analyze_and_its_command_writes_the_file(setup, promtool, tmp_path):
    units = man_page_units()
    service = units["poplock-stats.service"]
    assert "/usr/bin/poplock stats" in service and "OnUnitActiveSec=5min" in units["poplock-stats.timer"]
    folder = tmp_path / "units"
    folder.mkdir()
    # The program where the tests have it; systemd-analyze checks that ExecStart= names one.
    (folder / "poplock-stats.service").write_text(service.replace("/usr/bin/poplock", command("poplock")))
    (folder / "poplock-stats.timer").write_text(units["poplock-stats.timer"])
    verify = subprocess.run(["systemd-analyze", "verify", "--man=no", str(folder / "poplock-stats.service"),
                             str(folder / "poplock-stats.timer")], capture_output=True, text=True)
    assert (verify.returncode, verify.stdout + verify.stderr) == (0, "")
    # Its command, on the system journal, with the test's store and a textfile directory of its own.
    line = service.split("ExecStart=", 1)[1].split("\nProtectSystem", 1)[0].replace("\\\n", " ")
    argv = line.split()
    target = tmp_path / "node-exporter" / "poplock.prom"
    target.parent.mkdir()
    argv = [command("poplock"), "-c", str(setup.config)] + [
        str(target) if word.endswith("/poplock.prom") else word for word in argv[1:]]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lint = subprocess.run([promtool, "check", "metrics"], input=target.read_text(), capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    assert "poplock_period_seconds 3600\n" in target.read_text()


def test_logins_a_rebuild_of_the_store_reads_again_are_granted_once(setup, journald, logged, tmp_path):
    before = json.loads(stats(setup, journald, "--json").stdout)["logins"]
    for path in setup.directory.glob("grants.db*"):
        path.unlink()
    setup.cursor.unlink(missing_ok=True)
    logins = tmp_path / "logins" / "dovecot.journal"
    result = run_logging(journald, [command("poplock-reader"), "-c", str(setup.config), "--once", "--file",
                                    str(logins)], tmp_path / "reader.log")
    assert result.returncode == 0, (tmp_path / "reader.log").read_text()
    # Read again: the five logins of the window (the late one is before it), the last three refused again.
    wait_for_events(journald, 8 + 6 + 3 + 6)
    after = json.loads(stats(setup, journald, "--json").stdout)
    assert before == {"granted": 3, "extended": 1, "denied": 1, "over_limit": 1, "too_old": 1}
    assert after["logins"] == {"granted": 3, "extended": 1, "denied": 2, "over_limit": 2, "too_old": 1}
    assert after["grants"] == {"live": 3, "expired": 0}
