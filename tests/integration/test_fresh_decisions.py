"""A decision never says no to a login the journal already holds: a decision that finds no grant
asks poplock-reader to read the journal up to now ([Store] ReaderSocket=) before it answers,
with the fallback timer off (RecheckInterval=0, the default) so that nothing else would save it.
On a real journald, with the real reader, `poplock check`, relaylock and poplock-policy."""

import signal
import socket
import subprocess
import sys
import time

import pytest
from support.journald import send_until_readable, unique_tag
from support.poplock import PolicyProcess, ReaderProcess, Setup, command
from support.processes import reachable_by_everyone

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
    send_until_readable(login_line(address), setup.tag)


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


def test_a_stuck_reader_leaves_refusals_to_the_store_within_the_wait_and_a_new_connection_asks_once_it_is_back(
        fresh):
    """The reader stopped (SIGSTOP) answers nothing: each refusal is answered from the store once the
    wait of the question it waits on is over (the first on the kept connection, the second on a new
    one that the stopped reader's socket still accepts), the silence is warned of, and once the
    reader goes on, the next refusal asks over a new connection again."""
    with ReaderProcess(fresh) as reader, PolicyProcess(fresh) as policy:
        first, second = (socket.create_connection(("127.0.0.1", policy.port), timeout=30) for _ in range(2))

        def send(connection: socket.socket, address: str) -> None:
            connection.sendall(f"request=smtpd_access_policy\nclient_address={address}\n\n".encode())

        def reply(connection: socket.socket) -> bytes:
            answer = b""
            while not answer.endswith(b"\n\n"):
                answer += connection.recv(256)
            return answer

        send(first, "10.87.0.1")
        assert reply(first) == b"action=DUNNO\n\n"  # asked the reader: the connection to it is made
        reader.process.send_signal(signal.SIGSTOP)
        try:
            logged_and_readable(fresh, "10.87.0.2")  # in the journal, and the reader cannot read it
            send(first, "10.87.0.2")
            send(second, "10.87.0.3")
            assert reply(first) == b"action=DUNNO\n\n"
            assert reply(second) == b"action=DUNNO\n\n"
            assert "did not read the journal for a refusal within [Store] ReaderWait=1s (no answer)" in policy.output()
        finally:
            reader.process.send_signal(signal.SIGCONT)
        logged_and_readable(fresh, "10.87.0.4")
        send(second, "10.87.0.4")
        assert reply(second) == b"action=OK\n\n"
        send(first, "10.87.0.2")
        assert reply(first) == b"action=OK\n\n"  # read by now: the read for 10.87.0.4 came after it
        assert policy.output().count("did not read the journal") == 1  # the second silence counted, not logged
        first.close()
        second.close()
        assert reader.process.poll() is None


def test_a_peer_of_the_readers_own_user_asking_for_grants_is_told_them_and_any_other_is_not(fresh, tmp_path):
    """`sync grants` is answered with the grants the read made, before they are synced and published,
    only to root or the reader's user (SO_PEERCRED): the store is theirs to read anyway."""
    import json

    reachable_by_everyone(fresh.directory)
    with ReaderProcess(fresh):
        path = str(fresh.directory / "reader.sock")
        told_early = []
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
            connection.settimeout(10)
            connection.connect(path)
            answers = connection.makefile("rb")
            for index in range(40):  # the reader may have read a login by itself before the question
                address = f"10.87.0.{index}"
                logged_and_readable(fresh, address)
                connection.sendall(b"sync grants\n")
                answer = answers.readline()
                if answer == b"ok\n":
                    assert fresh.may_relay(address)  # read and committed before the question came
                    continue
                assert answer.startswith(b"ok {"), answer
                told = json.loads(answer[3:])
                assert list(told) == [address] and told[address].startswith(("2 ", "3 ")), told
                told_early.append(address)
                break
        assert told_early  # the question came before the reader had read: told with its answer
        logged_and_readable(fresh, "10.87.1.2")
        asked_as_nobody = subprocess.run(
            ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable, "-c",
             "import socket, sys\n"
             "c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); c.settimeout(10); c.connect(sys.argv[1])\n"
             "c.sendall(b'sync grants\\n'); sys.stdout.buffer.write(c.makefile('rb').readline())\n", path],
            capture_output=True, timeout=30)
        assert asked_as_nobody.stdout == b"ok\n", asked_as_nobody
        assert fresh.may_relay("10.87.1.2")  # answered once committed


def test_grants_told_by_a_socket_that_another_user_made_count_for_nothing(fresh, tmp_path):
    """Whoever could bind ReaderSocket= first must not be able to open the relay with a made-up answer."""
    path = fresh.directory / "reader.sock"
    reachable_by_everyone(fresh.directory)
    fresh.directory.chmod(0o777)  # for nobody to make its socket there
    liar = subprocess.Popen(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable, "-c",
         "import os, socket, sys\n"
         "s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); s.bind(sys.argv[1]); os.chmod(sys.argv[1], 0o666)\n"
         "s.listen(8); print('listening', flush=True)\n"
         "while True:\n"
         "    c, _ = s.accept()\n"
         "    while c.recv(64):\n"
         "        c.sendall(b'ok {\"10.87.2.1\": \"2 9999999999 0 dovecot mallory\"}\\n')\n", str(path)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert liar.stdout.readline() == "listening\n"
        with PolicyProcess(fresh) as policy:
            connection = socket.create_connection(("127.0.0.1", policy.port), timeout=10)
            replies = connection.makefile("rb")
            connection.sendall(b"request=smtpd_access_policy\nclient_address=10.87.2.1\n\n")
            assert replies.readline() == b"action=DUNNO\n"
            connection.close()
    finally:
        liar.kill()
        liar.wait(10)


def test_connections_of_other_users_are_closed_to_make_room_before_the_readers_own(fresh):
    """A local user who fills the reader's connections must not cut off the decision services'."""
    from poplock.reader import SyncListener

    reachable_by_everyone(fresh.directory)
    with ReaderProcess(fresh):
        path = str(fresh.directory / "reader.sock")
        own = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        own.settimeout(10)
        own.connect(path)
        assert ask(own) == b"ok\n"
        crowd = subprocess.Popen(
            ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", sys.executable, "-c",
             "import socket, sys, time\n"
             "kept = []\n"
             "for _ in range(int(sys.argv[2])):\n"
             "    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); c.connect(sys.argv[1]); kept.append(c)\n"
             "print('connected', flush=True); time.sleep(60)\n", path, str(SyncListener.MAX_CONNECTIONS + 50)],
            stdout=subprocess.PIPE, text=True)
        try:
            assert crowd.stdout.readline() == "connected\n"
            assert ask(own) == b"ok\n"  # still open: nobody's were closed instead
        finally:
            crowd.kill()
            crowd.wait(10)
            own.close()


def test_a_one_shot_question_as_the_readers_user_is_told_the_grant_before_it_is_published(fresh):
    """poplock check and relaylock (connection.ask_reader_for_grants) as root: told, as the services are."""
    from poplock.connection import ask_reader_for_grants

    with ReaderProcess(fresh):
        path = str(fresh.directory / "reader.sock")
        for index in range(40):  # the reader may have read a login by itself before the question
            address = f"10.88.0.{index}"
            logged_and_readable(fresh, address)
            told = ask_reader_for_grants(path, 1.0)
            assert told is not None
            if told:
                assert list(told) == [address] and told[address].startswith((b"2 ", b"3 "))
                break
            assert fresh.may_relay(address)
        else:
            raise AssertionError("the reader never had a login left to read when asked")


def test_refusals_from_many_connections_at_once_are_each_answered_after_their_login_is_read(fresh):
    """The policy service has up to two questions to the reader in flight on its one connection
    (decisions.ReaderSync): whichever question a refusal waits on, its answer covers its login."""
    from concurrent.futures import ThreadPoolExecutor

    tags = [f"{fresh.tag}-{number}" for number in range(8)]  # each client's logins readable on their own
    fresh.config.write_text(fresh.config.read_text().replace(f"Identifiers={fresh.tag}\n",
                                                             f"Identifiers={' '.join(tags)}\n"))
    with ReaderProcess(fresh), PolicyProcess(fresh) as policy:
        send_until_readable(login_line("10.88.9.9"), tags[0])
        fresh.wait_until_allowed("10.88.9.9")  # the reader has caught up with the journal at its start

        def client(number: int) -> list[str]:
            refused = []
            with socket.create_connection(("127.0.0.1", policy.port), timeout=10) as connection:
                replies = connection.makefile("rb")
                for index in range(10):
                    address = f"10.88.{number}.{index}"
                    send_until_readable(login_line(address), tags[number])
                    connection.sendall(f"request=smtpd_access_policy\nclient_address={address}\n\n".encode())
                    if replies.readline() != b"action=OK\n":
                        refused.append(address)
                    assert replies.readline() == b"\n"
                    # A refusal of an address that never logged in, asked meanwhile by the others too.
                    connection.sendall(f"request=smtpd_access_policy\nclient_address=10.89.{number}.{index}\n\n"
                                       .encode())
                    assert replies.readline() == b"action=DUNNO\n"
                    assert replies.readline() == b"\n"
            return refused

        with ThreadPoolExecutor(8) as pool:
            refused = [address for found in pool.map(client, range(8)) for address in found]
    assert refused == []
