"""poplock-policy under attack, on real sockets against the real process: the hardening regressions.

Each test replays a fault found by attacking the service: random bytes, a request dripped one
byte at a time, a flood of empty lines, more connections than the limit, one peer hogging the
limit, a line of 10 MB. None of them may get OK for an address without a grant, keep a
connection past the bounds poplock-policy(8) gives, flood the log, or keep a good client out.
"""

from __future__ import annotations

import os
import random
import re
import resource
import select
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.poplock import PolicyProcess
from support.processes import reachable_by_everyone

GRANTED = "192.0.2.7"
UNGRANTED = "198.51.100.23"
REQUEST = "request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address={client}\nclient_name=unknown\n" \
          "helo_name=client.poplock.test\nsender=sender@poplock.test\nrecipient=someone@elsewhere.example\n\n"


def start_policy(setup, settings: str = "", *listen: str) -> PolicyProcess:
    """poplock-policy with a grant for GRANTED and these [Policy] settings."""
    setup.run("add", GRANTED, check=True)
    setup.write(extra="\n[Policy]\n" + settings)
    return PolicyProcess(setup, *listen)


def connect(policy: PolicyProcess, source: str = "127.0.0.1") -> socket.socket:
    """A TCP connection to the service from the loopback address `source` (any of 127.0.0.0/8)."""
    return socket.create_connection(("127.0.0.1", policy.port), timeout=10, source_address=(source, 0))


def ask(connection: socket.socket, client: str) -> str:
    connection.sendall(REQUEST.format(client=client).encode())
    return reply(connection)


def reply(connection: socket.socket) -> str:
    data = b""
    while not data.endswith(b"\n\n"):
        chunk = connection.recv(4096)
        if not chunk:
            raise ConnectionError(f"closed by the service after {data!r}")
        data += chunk
    return data.decode()[:-2]


def read_until_closed(connection: socket.socket, timeout: float = 10) -> bytes:
    """Everything the service sends until it closes the connection (a reset counts as closing)."""
    connection.settimeout(timeout)
    data = b""
    try:
        while chunk := connection.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def readable(connection: socket.socket, timeout: float) -> bool:
    """Something (data, or the end) can be read within `timeout` seconds; poll(2), as fds pass 1024."""
    poller = select.poll()
    poller.register(connection, select.POLLIN)
    return bool(poller.poll(timeout * 1000))


def closed_now(connection: socket.socket) -> bool:
    """The service has closed this connection (without waiting for it to)."""
    if not readable(connection, 0):
        return False
    try:
        return connection.recv(65536, socket.MSG_PEEK) == b""
    except ConnectionResetError:
        return True


def wait_until(condition, timeout: float = 15.0, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not come true within {timeout}s")
        time.sleep(0.01)


def send_ignoring_close(connection: socket.socket, data: bytes) -> None:
    """Send what the service lets through; it may close the connection before the end."""
    try:
        connection.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        pass


def open_files_at_least(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.skip(f"needs {needed} open files; the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def log_lines(policy: PolicyProcess) -> list[str]:
    return policy.output().splitlines()


def random_blobs(count: int, seed: int = 20261126) -> list[bytes]:
    """Seeded garbage: random bytes rich in NUL, newlines and invalid UTF-8, and mangled requests
    for UNGRANTED (flipped bytes, cut short, lines doubled, NULs and \\xff spliced in)."""
    generator = random.Random(seed)
    alphabet = b"\0\n\n\n=\xff\xfe\xc3\x28\x80" + bytes(range(32, 127))
    valid = REQUEST.format(client=UNGRANTED).encode()
    blobs = []
    for index in range(count):
        kind = index % 4
        if kind == 0:
            blob = bytes(generator.choice(alphabet) for _ in range(generator.randrange(0, 3000)))
        elif kind == 1:
            blob = generator.randbytes(generator.randrange(1, 3000))
        elif kind == 2:
            blob = bytearray(valid)
            for _ in range(generator.randrange(1, 12)):
                position = generator.randrange(len(blob))
                blob[position:position + 1] = generator.choice([b"\0", b"\xff", b"\n", b"=", b"\n\n", b"",
                                                                bytes([generator.randrange(256)])])
            blob = bytes(blob)
        else:
            lines = valid.split(b"\n")[:-2]
            generator.shuffle(lines)
            blob = b"\n".join(lines[:generator.randrange(len(lines) + 1)] * generator.randrange(1, 4)) + b"\n\n"
            blob = blob.replace(b"=", generator.choice([b"=", b"\0=", b"= ", b"=\xc3\x28"]), 1)
        blobs.append(blob)
    return blobs


# Requests that name the granted address but are not a well-formed request for it.
NEAR_MISSES = [
    f"request=smtpd_access_policy\nclient_address={GRANTED}\0\n\n",
    f"request=smtpd_access_policy\nclient_address={GRANTED}.1\n\n",
    f"request=smtpd_access_policy\nclient_address={GRANTED}/24\n\n",
    f"request=smtpd_access_policy\nclient_address\n{GRANTED}\n\n",
    f"request=smtpd_access_policy\0\nclient_address={GRANTED}\n\n",
    f"request=junk\nclient_address={GRANTED}\n\n",
    f"client_address={GRANTED}\n\n",
    f"request=smtpd_access_policy\nclient_address={GRANTED}\nbroken line\n\n",
    f"request=smtpd_access_policy\nclient\xff_address={GRANTED}\n\n",
    f"request=smtpd_access_policy\r\nclient_address={GRANTED}\r\n\r\n\n\n",
]


def test_random_bytes_never_get_ok_and_the_service_answers_a_good_client_afterwards(setup):
    with start_policy(setup) as policy:
        started = len(log_lines(policy))
        blobs = random_blobs(400) + [text.encode("utf-8", "surrogateescape") for text in NEAR_MISSES]
        for blob in blobs:
            connection = connect(policy)
            send_ignoring_close(connection, blob)
            try:
                connection.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            received = read_until_closed(connection)
            connection.close()
            replies = received.split(b"\n\n")
            assert replies[-1] == b"", f"a reply cut short for {blob[:80]!r}: {received[-80:]!r}"
            assert set(replies[:-1]) <= {b"action=DUNNO"}, f"{blob[:200]!r} got {received!r}"
        good = connect(policy)
        assert ask(good, GRANTED) == "action=OK"
        assert ask(good, UNGRANTED) == "action=DUNNO"
        assert policy.process.poll() is None
        assert len(log_lines(policy)) - started <= 12, "\n".join(log_lines(policy)[started:])


def test_a_request_dripped_slower_than_the_deadline_allows_is_closed_without_an_answer(setup):
    request = f"request=smtpd_access_policy\nclient_address={GRANTED}\n\n".encode()
    with start_policy(setup, "RequestTimeout=1s\n") as policy:
        connection = connect(policy)
        sent = 0
        closed = False
        for byte in request:  # one byte every 0.1s: each read is quick, the request takes 5s
            send_ignoring_close(connection, bytes([byte]))
            sent += 1
            if readable(connection, 0.1):
                assert read_until_closed(connection) == b"", "the dripped request was answered"
                closed = True
                break
        assert closed, "the connection outlived a request that took five times RequestTimeout"
        assert sent < len(request)
        assert "did not end within [Policy] RequestTimeout=1s" in policy.output()


def test_a_flood_of_empty_lines_gets_a_few_dunnos_and_a_handful_of_log_lines(setup):
    with start_policy(setup) as policy:
        started = len(log_lines(policy))
        for _ in range(20):
            connection = connect(policy)
            send_ignoring_close(connection, b"\n" * 65536)
            received = read_until_closed(connection)
            connection.close()
            assert b"OK" not in received
            assert set(received.split(b"\n\n")[:-1]) <= {b"action=DUNNO"}
            assert received.count(b"action=DUNNO") <= 10
        assert ask(connect(policy), GRANTED) == "action=OK"
        flood = log_lines(policy)[started:]
        assert len(flood) <= 4, "\n".join(flood)
    # What was left out is counted, and the count is logged at the latest when the service stops.
    assert "199 more 'unreadable request' lines were not logged" in policy.output()
    assert "19 more 'unreadable connection' lines were not logged" in policy.output()


def test_a_ten_megabyte_line_closes_that_connection_and_the_others_are_still_answered(setup):
    with start_policy(setup) as policy:
        bystander = connect(policy)
        assert ask(bystander, GRANTED) == "action=OK"
        attacker = connect(policy)
        send_ignoring_close(attacker, b"request=smtpd_access_policy\nhelo_name=" + b"x" * 10_000_000)
        assert read_until_closed(attacker) == b""
        assert ask(bystander, GRANTED) == "action=OK"
        assert ask(connect(policy), UNGRANTED) == "action=DUNNO"
        assert "request larger than 16384 bytes" in policy.output()


def test_with_a_low_open_file_limit_the_service_raises_its_own_and_serves_1100_connections(setup):
    open_files_at_least(1300)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200 + 64:
        pytest.skip(f"the hard limit {hard} is too low to show this")
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))  # what poplock-policy inherits
    try:
        policy = start_policy(setup, "MaxConnections=1200\nMaxConnectionsPerPeer=1200\n")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    with policy:
        limits = Path(f"/proc/{policy.process.pid}/limits").read_text()
        service_soft = int(re.search(r"^Max open files\s+(\d+)", limits, re.M).group(1))
        assert service_soft >= 1200 + 64
        connections = [connect(policy) for _ in range(1100)]
        for connection in connections:
            connection.sendall(REQUEST.format(client=GRANTED).encode())
        assert [reply(connection) for connection in connections] == ["action=OK"] * 1100
        assert ask(connect(policy), UNGRANTED) == "action=DUNNO"
        assert "open file" not in policy.output()
        for connection in connections:
            connection.close()


def test_more_idle_connections_than_the_limits_cannot_lock_out_a_legitimate_client(setup):
    open_files_at_least(1300)
    with start_policy(setup) as policy:  # the defaults: MaxConnections=500, MaxConnectionsPerPeer=300
        started = len(log_lines(policy))
        flood = [connect(policy) for _ in range(1200)]
        legitimate = connect(policy)
        assert ask(legitimate, GRANTED) == "action=OK"
        assert ask(legitimate, UNGRANTED) == "action=DUNNO"
        # The service made room by closing the connections idle longest: the first of the flood.
        wait_until(lambda: sum(closed_now(connection) for connection in flood) >= 1200 - 299,
                   what="closing the oldest idle connections")
        assert not any(closed_now(connection) for connection in flood[-200:])
        assert "MaxConnectionsPerPeer=300 connections: closing the connection from 127.0.0.1 idle longest" \
               in policy.output()
        lines = [line for line in log_lines(policy)[started:] if "poplock-reader" not in line]  # none runs here
        assert len(lines) <= 3, "\n".join(lines)
        for connection in flood:
            connection.close()


def test_a_new_connection_beyond_max_connections_closes_the_one_idle_longest(setup):
    with start_policy(setup, "MaxConnections=10\n") as policy:
        connections = [connect(policy, f"127.0.0.{10 + index}") for index in range(10)]
        for connection in connections:  # one answer each, in order: the service has seen them in that order
            assert ask(connection, GRANTED) == "action=OK"
        assert ask(connections[0], GRANTED) == "action=OK"  # now idle the shortest
        newcomers = [connect(policy, "127.0.0.99") for _ in range(2)]
        for newcomer in newcomers:
            assert ask(newcomer, GRANTED) == "action=OK"
        wait_until(lambda: closed_now(connections[1]) and closed_now(connections[2]),
                   what="closing the two connections idle longest")
        for connection in [connections[0], *connections[3:], *newcomers]:
            assert ask(connection, UNGRANTED) == "action=DUNNO"


def test_when_every_connection_is_in_a_request_a_new_one_waits_for_the_request_deadline(setup):
    half = f"request=smtpd_access_policy\nclient_address={GRANTED}\n".encode()
    with start_policy(setup, "MaxConnections=3\nRequestTimeout=3s\n") as policy:
        busy = [connect(policy) for _ in range(3)]
        busy[0].sendall(half)
        busy[1].sendall(half)
        busy[2].sendall(REQUEST.format(client=GRANTED).encode() + half)
        assert reply(busy[2]) == "action=OK"  # by now the service has read all three halves
        refused = connect(policy)
        send_ignoring_close(refused, REQUEST.format(client=GRANTED).encode())
        assert read_until_closed(refused) == b""
        assert "MaxConnections=3 reached, each in the middle of a request" in policy.output()
        for connection in busy:  # each request's deadline ends it, unanswered
            assert read_until_closed(connection) == b""
        assert ask(connect(policy), GRANTED) == "action=OK"


def test_one_peer_over_its_limit_loses_only_its_own_idle_connections(setup):
    with start_policy(setup, "MaxConnections=100\nMaxConnectionsPerPeer=20\n") as policy:
        neighbours = [connect(policy, "127.0.0.6") for _ in range(3)]  # idle longer than any of the hog's
        for neighbour in neighbours:
            assert ask(neighbour, GRANTED) == "action=OK"
        hog = [connect(policy, "127.0.0.5") for _ in range(50)]
        wait_until(lambda: all(closed_now(connection) for connection in hog[:30]),
                   what="closing the hog's 30 connections idle longest")
        for connection in hog[30:]:
            assert ask(connection, UNGRANTED) == "action=DUNNO"
        for neighbour in neighbours:
            assert ask(neighbour, GRANTED) == "action=OK"
        assert "127.0.0.5 has [Policy] MaxConnectionsPerPeer=20 connections" in policy.output()
        assert "127.0.0.6 has" not in policy.output()


CLIENT_AS_ANOTHER_USER = """
import socket, sys
connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
connection.connect(sys.argv[1])
print("connected", flush=True)
sys.stdin.readline()
connection.sendall(sys.argv[2].encode())
print(connection.recv(4096).decode().strip(), flush=True)
"""


@pytest.mark.skipif(not hasattr(socket, "SO_PEERCRED"), reason="needs SO_PEERCRED")
def test_over_the_unix_socket_each_user_is_a_peer_of_its_own(setup, tmp_path):
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("needs root to connect as nobody")
    path = reachable_by_everyone(tmp_path) / "policy.sock"
    with start_policy(setup, "MaxConnectionsPerPeer=3\n", str(path)) as policy:
        other_user = subprocess.Popen([sys.executable, "-I", "-S", "-c", CLIENT_AS_ANOTHER_USER, str(path),
                                       REQUEST.format(client=GRANTED)], user="nobody", group="nogroup",
                                      extra_groups=[], cwd="/",
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert other_user.stdout.readline() == "connected\n"
            own = []
            for _ in range(5):  # root's connections: the first two make room for the last two
                connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                connection.settimeout(10)
                connection.connect(str(path))
                own.append(connection)
            wait_until(lambda: closed_now(own[0]) and closed_now(own[1]), what="closing root's oldest two")
            assert ask(own[4], GRANTED) == "action=OK"
            other_user.stdin.write("\n")
            other_user.stdin.flush()
            assert other_user.stdout.readline() == "action=OK\n"  # nobody's older connection was left alone
        finally:
            other_user.kill()
            other_user.wait(10)
        assert "uid 0 has [Policy] MaxConnectionsPerPeer=3 connections" in policy.output()
