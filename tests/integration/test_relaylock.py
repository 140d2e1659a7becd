"""relaylock in front of real qmail-style SMTP servers, under tcpserver and socket activation,
and when its own lookup fails: the server always runs, and relays only for a granted client."""

import _gdbm
import os
import subprocess
import time
from pathlib import Path

import pytest
from support.poplock import command, command_for_everyone
from support.processes import reachable_by_everyone
from support.smtpservers import SocketActivate, TcpServer, mailfront, qpsmtpd, try_relay

GRANTED = "127.0.0.5"
STRANGER = "127.0.0.6"
RELAYED = 250


def relaylock(setup, *options: str) -> list[str]:
    return [command("relaylock"), "-c", str(setup.config), *options, "--"]


def run_relaylock(setup, program: list[str], environment: dict, *options: str) -> subprocess.CompletedProcess:
    return subprocess.run(relaylock(setup, *options) + program, env=environment, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=30)


@pytest.fixture
def granted(setup):
    setup.run("add", GRANTED, check=True)
    return setup


def test_mailfront_under_tcpserver_relays_for_a_granted_client_only(granted, tmp_path):
    with TcpServer(mailfront(tmp_path / "mailfront"), wrapper=relaylock(granted)) as server:
        assert try_relay(server.host, server.port, source=GRANTED)[0] == RELAYED
        code, text = try_relay(server.host, server.port, source=STRANGER)
        assert (code, text) == (550, "5.1.0 Mail system is not configured to accept that recipient")
    log = server.log.read_text()
    assert f"relaylock: relay allowed for {GRANTED}: manual grant" in log
    assert f"relaylock: no relay for {STRANGER}: no grant" in log


def test_an_inherited_relayclient_does_not_leak_to_a_client_without_a_grant(granted, tmp_path):
    # tcpserver passes its environment through: a RELAYCLIENT set where it was started
    # would open the relay to everyone if relaylock kept it.
    with TcpServer(mailfront(tmp_path / "mailfront"), wrapper=relaylock(granted),
                   environment={"RELAYCLIENT": ""}) as server:
        assert try_relay(server.host, server.port, source=STRANGER)[0] == 550
        assert try_relay(server.host, server.port, source=GRANTED)[0] == RELAYED


def test_mailfront_under_socket_activation_relays_for_a_granted_client_only(granted, tmp_path):
    # systemd-socket-activate --inetd wipes the environment: relaylock finds the client
    # with getpeername() on standard input.
    with SocketActivate(mailfront(tmp_path / "mailfront"), wrapper=relaylock(granted)) as server:
        assert try_relay(server.host, server.port, source=GRANTED)[0] == RELAYED
        assert try_relay(server.host, server.port, source=STRANGER)[0] == 550


def test_a_static_network_relays_without_any_grant(setup, tmp_path):
    setup.static.write_text("127.0.0.0/255.255.255.248\n")
    with TcpServer(mailfront(tmp_path / "mailfront"), wrapper=relaylock(setup)) as server:
        assert try_relay(server.host, server.port, source="127.0.0.5")[0] == RELAYED
        assert try_relay(server.host, server.port, source="127.0.0.9")[0] == 550
    assert "relay allowed for 127.0.0.5: static network 127.0.0.0/29" in server.log.read_text()


def test_qpsmtpd_needs_and_gets_a_true_relayclient_when_configured(granted, tmp_path):
    granted.write(extra="\n[Relaylock]\nRelayClient=1\n")
    with TcpServer(qpsmtpd(tmp_path / "qpsmtpd"), wrapper=relaylock(granted)) as server:
        assert try_relay(server.host, server.port, source=GRANTED)[0] == RELAYED
        assert try_relay(server.host, server.port, source=STRANGER) == (550, "Relaying denied (#5.7.1)")


def test_an_expired_grant_opens_nothing(setup):
    from poplock.grants import Grant
    from poplock.storewriter import StoreWriter

    now = int(time.time())
    with StoreWriter(str(setup.store)).transaction() as transaction:
        transaction.grants[GRANTED] = Grant(GRANTED, now - 1, now - 1801, "dovecot")
    result = run_relaylock(setup, ["/usr/bin/env"], {"REMOTE_ADDR": GRANTED, "PATH": os.environ["PATH"]})
    assert "RELAYCLIENT" not in result.stdout
    assert f"relaylock: no relay for {GRANTED}: its grant expired" in result.stderr


@pytest.mark.parametrize("damage", ["missing", "corrupt", "unreadable", "bad config", "bad static list"])
def test_when_the_lookup_fails_the_server_still_runs_and_nothing_relays(granted, damage):
    if damage == "missing":
        granted.store.unlink()
    elif damage == "corrupt":
        granted.store.write_bytes(b"\x13\x57\x9a\xce" + os.urandom(4000))
    elif damage == "unreadable":
        granted.store.chmod(0o000)
    elif damage == "bad config":
        granted.write(extra="\n[Store]\nBusyTimeout=forever\n")
    elif damage == "bad static list":
        granted.static.write_text("not-a-network\n")
    environment = {"REMOTE_ADDR": GRANTED, "RELAYCLIENT": "inherited", "PATH": os.environ["PATH"]}
    # nobody cannot read a 0000 file even when the tests run as root
    prefix = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"] if damage == "unreadable" else []
    program = relaylock(granted)
    if damage == "unreadable":
        program[0] = command_for_everyone("relaylock")
        reachable_by_everyone(granted.directory)
    result = subprocess.run(prefix + program + ["/usr/bin/env"], env=environment,
                            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    assert "RELAYCLIENT" not in result.stdout  # the server ran, without the relay open
    if damage == "missing":
        assert result.stderr == f"relaylock: no relay for {GRANTED}: no grant\n"
    else:
        assert result.stderr.startswith("relaylock: cannot decide, not relaying: ")
        assert len(result.stderr.splitlines()) == 1


def test_a_store_held_by_an_in_place_writer_costs_at_most_the_busy_timeout(granted):
    holder = _gdbm.open(str(granted.store), "w")  # some other program writing in place, for as long as it likes
    try:
        started = time.monotonic()
        result = run_relaylock(granted, ["/usr/bin/env"], {"REMOTE_ADDR": GRANTED, "PATH": os.environ["PATH"]})
        elapsed = time.monotonic() - started
    finally:
        holder.close()
    assert "RELAYCLIENT" not in result.stdout
    assert "stayed locked by another program for more than 20ms" in result.stderr
    assert elapsed < 5  # the writer would have held it forever


def test_relaylock_never_writes_to_standard_output(granted):
    for environment in ({"REMOTE_ADDR": GRANTED}, {"REMOTE_ADDR": STRANGER}, {}, {"REMOTE_ADDR": "junk"}):
        result = run_relaylock(granted, ["/bin/true"], environment)
        assert result.stdout == "" and result.returncode == 0


def test_the_client_address_comes_from_the_socket_then_remote_addr_then_tcpremoteip(granted):
    base = {"PATH": os.environ["PATH"]}
    assert "RELAYCLIENT=" in run_relaylock(granted, ["env"], {**base, "REMOTE_ADDR": GRANTED}).stdout
    assert "RELAYCLIENT=" in run_relaylock(granted, ["env"], {**base, "TCPREMOTEIP": GRANTED}).stdout
    both = run_relaylock(granted, ["env"], {**base, "REMOTE_ADDR": STRANGER, "TCPREMOTEIP": GRANTED})
    assert "RELAYCLIENT" not in both.stdout
    assert "RELAYCLIENT=" in run_relaylock(granted, ["env"], {**base, "TCPREMOTEIP": "::ffff:" + GRANTED}).stdout


def test_the_relayclient_value_can_be_given_on_the_command_line(granted):
    result = run_relaylock(granted, ["/usr/bin/env"], {"REMOTE_ADDR": GRANTED}, "--relayclient", "1")
    assert "RELAYCLIENT=1" in result.stdout.splitlines()


def test_a_missing_program_or_option_is_a_usage_error(granted):
    result = subprocess.run([command("relaylock")], capture_output=True, text=True)
    assert result.returncode == 64 and "no SMTP server to run" in result.stderr
    result = subprocess.run([command("relaylock"), "--frobnicate", "true"], capture_output=True, text=True)
    assert result.returncode == 64 and "unknown option --frobnicate" in result.stderr


def test_a_program_that_cannot_be_run_is_reported(granted):
    result = run_relaylock(granted, ["/nonexistent/qmail-smtpd"], {"REMOTE_ADDR": GRANTED})
    assert result.returncode == 71
    assert "relaylock: cannot run /nonexistent/qmail-smtpd: No such file or directory" in result.stderr


def test_relaylock_imports_nothing_heavy(granted):
    # Its import graph is a budget: no re, os, socket, ipaddress, dataclasses, typing, journal.
    repository = str(Path(__file__).resolve().parents[2])
    heavy = ["re", "os", "socket", "ipaddress", "dataclasses", "typing", "systemd", "systemd.journal",
             "argparse", "logging", "json", "dbm"]
    probe = (
        f"import sys; sys.path.insert(0, {repository!r})\n"
        "from poplock import relaylock\n"
        f"relaylock.decide({str(granted.config)!r}, None, relaylock.find_address({{b'REMOTE_ADDR': b'127.0.0.5'}}))\n"
        f"print(sorted(set({heavy!r}) & set(sys.modules)))\n"
    )
    result = subprocess.run(["/usr/bin/python3", "-IS", "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def run_with_journal_stream(setup, environment: dict) -> None:
    """Run relaylock with stderr on a journal stream and JOURNAL_STREAM set, as systemd starts services."""
    from systemd import journal

    stream = journal.stream("relaylock-test")
    status = os.fstat(stream.fileno())
    environment = {**environment, "PATH": os.environ["PATH"], "JOURNAL_STREAM": f"{status.st_dev}:{status.st_ino}"}
    subprocess.run(relaylock(setup) + ["/bin/true"], env=environment, stdin=subprocess.DEVNULL, stderr=stream,
                   check=True, timeout=30)
    stream.close()


def test_under_systemd_each_decision_is_a_journal_event_with_its_message_id_and_client(setup, journald):
    import random

    from support.journald import wait_for_entries

    from poplock import events

    client = f"198.18.{random.randrange(256)}.{random.randrange(1, 255)}"  # unique in the shared journal
    setup.run("add", client, check=True)
    run_with_journal_stream(setup, {"REMOTE_ADDR": client})
    [entry] = wait_for_entries({"MESSAGE_ID": events.RELAY_ALLOWED.message_id, "POPLOCK_CLIENT_ADDRESS": client}, 1)
    assert entry["SYSLOG_IDENTIFIER"] == "relaylock" and entry["MESSAGE"].startswith(f"relay allowed for {client}")
    setup.run("remove", client, check=True)
    run_with_journal_stream(setup, {"REMOTE_ADDR": client})
    wait_for_entries({"MESSAGE_ID": events.RELAY_REFUSED.message_id, "POPLOCK_CLIENT_ADDRESS": client}, 1)


def test_a_busy_store_is_a_store_busy_event(setup, journald):
    from support.journald import wait_for_entries

    from poplock import events

    setup.run("add", GRANTED, check=True)
    before = len(wait_for_entries({"MESSAGE_ID": events.STORE_BUSY.message_id}, 0))
    holder = _gdbm.open(str(setup.store), "w")
    try:
        run_with_journal_stream(setup, {"REMOTE_ADDR": GRANTED})
    finally:
        holder.close()
    entries = wait_for_entries({"MESSAGE_ID": events.STORE_BUSY.message_id}, before + 1)
    assert "stayed locked by another program" in entries[-1]["MESSAGE"]


def test_under_inetd_only_the_smtp_server_speaks_to_the_client(setup, journald, tmp_path):
    # inetd gives the connection as standard input, output and error: relaylock's own line
    # must go to the journal, not to the client before the server's greeting.
    import random

    from support.journald import wait_for_entries
    from support.ports import free_port, wait_for_port

    from poplock import events

    client = f"127.0.{random.randrange(1, 255)}.{random.randrange(1, 255)}"
    port = free_port()
    configuration = tmp_path / "inetd.conf"
    configuration.write_text(f"127.0.0.1:{port} stream tcp nowait root {command('relaylock')} relaylock "
                             f"-c {setup.config} -- /usr/sbin/smtpfront-echo\n")
    inetd = subprocess.Popen(["/usr/sbin/inetd", "-d", str(configuration)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        wait_for_port("127.0.0.1", port)
        import socket

        with socket.create_connection(("127.0.0.1", port), source_address=(client, 0), timeout=10) as connection:
            greeting = connection.recv(512)
    finally:
        inetd.terminate()
        inetd.wait(10)
    assert greeting.startswith(b"220 ")
    [entry] = wait_for_entries({"MESSAGE_ID": events.RELAY_REFUSED.message_id, "POPLOCK_CLIENT_ADDRESS": client}, 1)
    assert entry["SYSLOG_IDENTIFIER"] == "relaylock"
