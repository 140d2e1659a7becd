"""A decision never says no to a login the journal already holds: a decision that finds no grant
asks poplock-reader to read the journal up to now ([Store] ReaderSocket=) before it answers,
with the fallback timer off (RecheckInterval=0, the default) so that nothing else would save it.
On a real journald, with the real reader, `poplock check`, relaylock and poplock-policy."""

import socket
import subprocess
import time

import pytest
from support.journald import unique_tag
from support.poplock import PolicyProcess, ReaderProcess, Setup, command
from systemd import journal

TRIALS = 40


def login_line(address: str) -> str:
    return (f"pop3-login: Login: user=<user-{address}>, method=PLAIN, rip={address}, lip=127.0.0.1, mpid=4242, "
            f"session=<b7aS8S1hfbZ/AAAF>")


@pytest.fixture
def fresh(journald, tmp_path):
    tag = unique_tag()
    setup = Setup(tmp_path, extra=f"\n[Source:dovecot]\nIdentifiers={tag}\n")
    # The longest wait there is: a commit's syncs on this shared disk can take hundreds of
    # milliseconds while the rest of the suite runs; what the default 50ms gives is bench/fresh.py's.
    setup.config.write_text(setup.config.read_text().replace("[Store]\n", "[Store]\nReaderWait=1s\n"))
    setup.tag = tag
    return setup


def logged_and_readable(setup, address: str) -> None:
    """Log a trusted login, and return once any journal reader can read it."""
    watcher = journal.Reader()
    watcher.add_match(SYSLOG_IDENTIFIER=setup.tag)
    watcher.seek_tail()
    watcher.get_previous()
    journal.send(login_line(address), SYSLOG_IDENTIFIER=setup.tag)
    deadline = time.monotonic() + 10
    while True:
        entry = watcher.get_next()
        if entry and address in entry["MESSAGE"]:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"the login from {address} never became readable")
        watcher.process()
        time.sleep(0.0005)
    watcher.close()


def test_poplock_check_right_after_a_login_says_yes_every_time(fresh):
    with ReaderProcess(fresh):
        refused = []
        for index in range(TRIALS):
            address = f"10.81.{index >> 8}.{index & 255}"
            logged_and_readable(fresh, address)
            if not fresh.may_relay(address):
                refused.append(address)
    assert refused == []


def test_relaylock_right_after_a_login_sets_relayclient_every_time(fresh):
    with ReaderProcess(fresh):
        refused = []
        for index in range(TRIALS):
            address = f"10.82.{index >> 8}.{index & 255}"
            logged_and_readable(fresh, address)
            result = subprocess.run([command("relaylock"), "-c", str(fresh.config), "--", "sh", "-c",
                                     'echo "${RELAYCLIENT-unset}"'],
                                    env={"TCPREMOTEIP": address, "PATH": "/usr/bin:/bin"},
                                    capture_output=True, text=True, timeout=30)
            if result.stdout != "\n":
                refused.append(address)
    assert refused == []


def test_the_policy_service_right_after_a_login_answers_ok_every_time(fresh):
    with ReaderProcess(fresh), PolicyProcess(fresh) as policy:
        connection = socket.create_connection(("127.0.0.1", policy.port), timeout=10)
        replies = connection.makefile("rb")
        refused = []
        for index in range(TRIALS):
            address = f"10.83.{index >> 8}.{index & 255}"
            logged_and_readable(fresh, address)
            connection.sendall(f"request=smtpd_access_policy\nclient_address={address}\n\n".encode())
            if replies.readline() != b"action=OK\n":
                refused.append(address)
            assert replies.readline() == b"\n"
        connection.close()
    assert refused == []


def test_with_the_reader_down_a_refusal_comes_within_the_wait_and_mail_flows(fresh):
    (fresh.directory / "reader.sock").touch()  # not a socket anyone answers on
    started = time.monotonic()
    result = subprocess.run([command("relaylock"), "-c", str(fresh.config), "--", "sh", "-c",
                             'echo "ran ${RELAYCLIENT-unset}"'],
                            env={"TCPREMOTEIP": "10.84.0.1", "PATH": "/usr/bin:/bin"},
                            capture_output=True, text=True, timeout=30)
    assert result.stdout == "ran unset\n"
    assert time.monotonic() - started < 10  # bounded; the exact bound is a benchmark's business


def ask(connection: socket.socket) -> bytes:
    """The reader's answer to one question; b"" when it has closed the connection."""
    try:
        connection.sendall(b"sync\n")
    except (BrokenPipeError, ConnectionResetError):
        return b""
    answer = b""
    while not answer.endswith(b"\n"):
        data = connection.recv(64)
        if not data:
            return answer
        answer += data
    return answer


def test_a_connection_to_the_reader_stays_open_for_further_questions(fresh):
    with ReaderProcess(fresh):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
            connection.settimeout(10)
            connection.connect(str(fresh.directory / "reader.sock"))
            for address in ("10.85.0.1", "10.85.0.2", "10.85.0.3"):
                logged_and_readable(fresh, address)
                assert ask(connection) == b"ok\n"
                assert fresh.may_relay(address)  # read and committed before the answer
            connection.sendall(b"sync\nsync\n")  # two at once: two answers
            answer = b""
            while answer.count(b"\n") < 2:
                answer += connection.recv(64)
            assert answer == b"ok\nok\n"


def test_the_reader_keeps_a_bounded_number_of_connections_the_quietest_closed_first(fresh):
    from poplock.reader import SyncListener

    with ReaderProcess(fresh) as reader:
        path = str(fresh.directory / "reader.sock")
        idle = []
        for _ in range(SyncListener.MAX_CONNECTIONS + 20):  # anyone may connect: none may hold it hostage
            connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            connection.settimeout(10)
            connection.connect(path)
            idle.append(connection)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as asking:
            asking.settimeout(10)
            asking.connect(path)
            assert ask(asking) == b"ok\n"
        assert ask(idle[0]) == b""  # the first of them was closed to make room
        assert ask(idle[-1]) == b"ok\n"
        for connection in idle:
            connection.close()
        assert reader.process.poll() is None


def test_the_policy_service_asks_over_one_connection_and_makes_another_when_the_reader_restarts(fresh):
    """A restarted reader closed the kept connection: the next refusal connects again, and at most
    the question in flight then is lost (answered from the store as it is)."""
    with PolicyProcess(fresh) as policy:
        connection = socket.create_connection(("127.0.0.1", policy.port), timeout=10)
        replies = connection.makefile("rb")

        def action(address: str) -> bytes:
            connection.sendall(f"request=smtpd_access_policy\nclient_address={address}\n\n".encode())
            answer = replies.readline()
            assert replies.readline() == b"\n"
            return answer

        for round_number in range(2):
            with ReaderProcess(fresh):
                if round_number == 1:
                    action("10.86.9.9")  # finds the connection closed by the restart: may be lost
                for index in range(5):
                    address = f"10.86.{round_number}.{index}"
                    logged_and_readable(fresh, address)
                    assert action(address) == b"action=OK\n", (round_number, index)
        connection.close()
