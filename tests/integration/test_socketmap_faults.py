"""poplock-socketmap under attack, on real sockets against the real process: the policy service's fault
tests (tests/integration/test_policy_faults.py) replayed in netstrings, since both sit on poplock.service.

Random bytes, a request dripped one byte at a time, a flood of empty netstrings, a 10 MB
length, more connections than the limit, one peer hogging the limit. None of them may get
OK for an address without a grant, keep a connection past the bounds poplock-socketmap(8)
gives, flood the log, or keep a good client out.
"""

from __future__ import annotations

import os
import random
import re
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.processes import reachable_by_everyone
from support.socketmap import (
    AnsweringReader,
    SocketmapProcess,
    closed_now,
    connect_tcp,
    netstring,
    read_until_closed,
    readable,
    send_ignoring_close,
    split_replies,
)

GRANTED = "192.0.2.7"
UNGRANTED = "198.51.100.23"


@pytest.fixture
def setup(setup):
    """The usual configuration, with a ReaderSocket= that answers at once: every NOTFOUND here takes
    the fresh look's path (an answer that comes later, in order), as it does in production."""
    reader = AnsweringReader(setup.directory / "reader.sock")
    setup.reader = reader
    yield setup
    reader.close()


def start_socketmap(setup, settings: str = "", *listen: str) -> SocketmapProcess:
    """poplock-socketmap with a grant for GRANTED and these [Socketmap] settings."""
    setup.run("add", GRANTED, check=True)
    setup.write(extra="\n[Socketmap]\n" + settings)
    setup.config.write_text(setup.config.read_text().replace(
        "[Store]\n", f"[Store]\nReaderSocket={setup.reader.path}\nReaderWait=1s\n", 1))
    return SocketmapProcess(setup, *listen)


def connect(socketmap: SocketmapProcess, source: str = "127.0.0.1") -> socket.socket:
    return connect_tcp(socketmap.port, source)


def ask(connection: socket.socket, key: str, name: str = "poplock") -> str:
    connection.sendall(netstring(f"{name} {key}"))
    return reply(connection)


def reply(connection: socket.socket) -> str:
    data = b""
    while True:
        length, colon, rest = data.partition(b":")
        if colon and len(rest) > int(length):
            return rest[:int(length)].decode()
        chunk = connection.recv(4096)
        if not chunk:
            raise ConnectionError(f"closed by the service after {data!r}")
        data += chunk


def wait_until(condition, timeout: float = 15.0, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not come true within {timeout}s")
        time.sleep(0.01)


def open_files_at_least(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.skip(f"needs {needed} open files; the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def log_lines(socketmap: SocketmapProcess) -> list[str]:
    return socketmap.output().splitlines()


def random_blobs(count: int, seed: int = 20261202) -> list[bytes]:
    """Seeded garbage: random bytes rich in digits, colons, commas, NULs and invalid UTF-8, and
    mangled requests for UNGRANTED and GRANTED (flipped bytes, wrong lengths, cut short, doubled)."""
    generator = random.Random(seed)
    alphabet = b"0123456789::,,, \0\xff\xfe\xc3\x28" + bytes(range(32, 127))
    requests = [netstring(f"poplock {UNGRANTED}"), netstring(f"poplock {GRANTED}")]
    blobs = []
    for index in range(count):
        kind = index % 4
        if kind == 0:
            blob = bytes(generator.choice(alphabet) for _ in range(generator.randrange(0, 3000)))
        elif kind == 1:
            blob = generator.randbytes(generator.randrange(1, 3000))
        elif kind == 2:
            blob = bytearray(generator.choice(requests))
            for _ in range(generator.randrange(1, 6)):
                position = generator.randrange(len(blob))
                blob[position:position + 1] = generator.choice([b"\0", b"\xff", b":", b",", b" ", b"", b"0",
                                                                bytes([generator.randrange(256)])])
            blob = bytes(blob)
        else:
            content = f"poplock {GRANTED}".encode()
            wrong = len(content) + generator.choice([-3, -1, 1, 2, 500])
            blob = b"%d:%s," % (max(wrong, 0), content) * generator.randrange(1, 4)
        blobs.append(blob)
    return blobs


# Requests that name the granted address, framed well, but not as any MTA spells it.
NEAR_MISSES = [
    f"poplock {GRANTED}\0", f"poplock {GRANTED}.1", f"poplock {GRANTED}/24", f"poplock  {GRANTED}",
    f"poplock {GRANTED} ", f"poplock\t{GRANTED}", f"poplock\0 {GRANTED}", f"Poplock {GRANTED}",
    f"poplock 0{GRANTED}", "poplock ::ffff:c000:207", f"poplock [{GRANTED}]", f"poplock connect:{GRANTED}",
    f"poplock {GRANTED}\r\n", f"poplock{GRANTED}", f"{GRANTED}",
]


def test_random_bytes_never_get_ok_for_an_ungranted_address_and_a_good_client_is_answered_afterwards(setup):
    with start_socketmap(setup) as socketmap:
        started = len(log_lines(socketmap))
        blobs = random_blobs(400) + [netstring(text.encode("utf-8", "surrogateescape")) for text in NEAR_MISSES]
        for blob in blobs:
            connection = connect(socketmap)
            send_ignoring_close(connection, blob)
            try:
                connection.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            received = read_until_closed(connection)
            connection.close()
            replies = split_replies(received)  # never a reply cut short
            granted_asked = blob.count(netstring(f"poplock {GRANTED}"))
            assert sum(1 for r in replies if r.startswith(b"OK ")) <= granted_asked, f"{blob[:200]!r} got {received!r}"
            assert set(replies) <= {b"OK OK", b"NOTFOUND ", b"PERM poplock cannot read this request",
                                    b"PERM poplock serves no map of that name"}, f"{blob[:200]!r} got {received!r}"
        good = connect(socketmap)
        assert ask(good, GRANTED) == "OK OK"
        assert ask(good, UNGRANTED) == "NOTFOUND "
        assert setup.reader.questions >= 1  # NOTFOUND came after the fresh look, as in production
        assert socketmap.process.poll() is None
        assert len(log_lines(socketmap)) - started <= 12, "\n".join(log_lines(socketmap)[started:])


def test_each_near_miss_of_the_granted_address_is_answered_but_never_ok(setup):
    with start_socketmap(setup) as socketmap:
        connection = connect(socketmap)
        for text in NEAR_MISSES:
            connection.sendall(netstring(text.encode("utf-8", "surrogateescape")))
            assert reply(connection) in ("NOTFOUND ", "PERM poplock cannot read this request",
                                         "PERM poplock serves no map of that name"), text
        assert ask(connect(socketmap), GRANTED) == "OK OK"


def test_a_request_dripped_slower_than_the_deadline_allows_is_closed_without_an_answer(setup):
    request = netstring(f"poplock {GRANTED}")
    with start_socketmap(setup, "RequestTimeout=1s\n") as socketmap:
        connection = connect(socketmap)
        sent = 0
        closed = False
        for byte in request:  # one byte every 0.1s: each read is quick, the request takes 2s
            send_ignoring_close(connection, bytes([byte]))
            sent += 1
            if readable(connection, 0.1):
                assert read_until_closed(connection) == b"", "the dripped request was answered"
                closed = True
                break
        assert closed, "the connection outlived a request that took twice RequestTimeout"
        assert sent < len(request)
        assert "did not end within [Socketmap] RequestTimeout=1s" in socketmap.output()


def test_a_flood_of_empty_netstrings_gets_a_few_perms_and_a_handful_of_log_lines(setup):
    with start_socketmap(setup) as socketmap:
        started = len(log_lines(socketmap))
        for _ in range(20):
            connection = connect(socketmap)
            send_ignoring_close(connection, b"0:," * 20000)
            received = read_until_closed(connection)
            connection.close()
            assert set(split_replies(received)) <= {b"PERM poplock cannot read this request"}
            assert 1 <= len(split_replies(received)) <= 10
        assert ask(connect(socketmap), GRANTED) == "OK OK"
        flood = log_lines(socketmap)[started:]
        assert len(flood) <= 4, "\n".join(flood)
    assert "199 more 'unreadable request' lines were not logged" in socketmap.output()
    assert "19 more 'unreadable connection' lines were not logged" in socketmap.output()


def test_a_ten_megabyte_netstring_closes_that_connection_and_the_others_are_still_answered(setup):
    with start_socketmap(setup) as socketmap:
        bystander = connect(socketmap)
        assert ask(bystander, GRANTED) == "OK OK"
        attacker = connect(socketmap)
        send_ignoring_close(attacker, b"10000000:poplock " + b"x" * 10_000_000 + b",")
        assert read_until_closed(attacker) == b""
        assert ask(bystander, GRANTED) == "OK OK"
        assert ask(connect(socketmap), UNGRANTED) == "NOTFOUND "
        assert "request larger than 1024 bytes" in socketmap.output()


def test_a_flood_of_malformed_netstrings_is_logged_a_handful_of_times(setup):
    with start_socketmap(setup) as socketmap:
        started = len(log_lines(socketmap))
        for _ in range(50):
            connection = connect(socketmap)
            send_ignoring_close(connection, b"GET / HTTP/1.0\r\n\r\n")
            assert read_until_closed(connection) == b""
            connection.close()
        assert ask(connect(socketmap), GRANTED) == "OK OK"
        flood = log_lines(socketmap)[started:]
        assert len(flood) <= 2, "\n".join(flood)
    assert "49 more 'broken protocol' lines were not logged" in socketmap.output()


def test_with_a_low_open_file_limit_the_service_raises_its_own_and_serves_1100_connections(setup):
    open_files_at_least(1300)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200 + 64:
        pytest.skip(f"the hard limit {hard} is too low to show this")
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))  # what poplock-socketmap inherits
    try:
        socketmap = start_socketmap(setup, "MaxConnections=1200\nMaxConnectionsPerPeer=1200\n")
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    with socketmap:
        limits = Path(f"/proc/{socketmap.process.pid}/limits").read_text()
        service_soft = int(re.search(r"^Max open files\s+(\d+)", limits, re.M).group(1))
        assert service_soft >= 1200 + 64
        connections = [connect(socketmap) for _ in range(1100)]
        for connection in connections:
            connection.sendall(netstring(f"poplock {GRANTED}"))
        assert [reply(connection) for connection in connections] == ["OK OK"] * 1100
        assert ask(connect(socketmap), UNGRANTED) == "NOTFOUND "
        assert "open file" not in socketmap.output()
        for connection in connections:
            connection.close()


def test_more_idle_connections_than_the_limits_cannot_lock_out_a_legitimate_client(setup):
    open_files_at_least(1300)
    with start_socketmap(setup) as socketmap:  # the defaults: MaxConnections=500, MaxConnectionsPerPeer=300
        started = len(log_lines(socketmap))
        flood = [connect(socketmap) for _ in range(1200)]
        legitimate = connect(socketmap)
        assert ask(legitimate, GRANTED) == "OK OK"
        assert ask(legitimate, UNGRANTED) == "NOTFOUND "
        wait_until(lambda: sum(closed_now(connection) for connection in flood) >= 1200 - 299,
                   what="closing the oldest idle connections")
        assert not any(closed_now(connection) for connection in flood[-200:])
        assert "MaxConnectionsPerPeer=300 connections: closing the connection from 127.0.0.1 idle longest" \
               in socketmap.output()
        assert len(log_lines(socketmap)) - started <= 3, "\n".join(log_lines(socketmap)[started:])
        for connection in flood:
            connection.close()


def test_a_new_connection_beyond_max_connections_closes_the_one_idle_longest(setup):
    with start_socketmap(setup, "MaxConnections=10\n") as socketmap:
        connections = [connect(socketmap, f"127.0.0.{10 + index}") for index in range(10)]
        assert ask(connections[0], GRANTED) == "OK OK"  # now idle the shortest
        newcomers = [connect(socketmap, "127.0.0.99") for _ in range(2)]
        for newcomer in newcomers:
            assert ask(newcomer, GRANTED) == "OK OK"
        wait_until(lambda: closed_now(connections[1]) and closed_now(connections[2]),
                   what="closing the two connections idle longest")
        for connection in [connections[0], *connections[3:], *newcomers]:
            assert ask(connection, UNGRANTED) == "NOTFOUND "


def test_when_every_connection_is_in_a_request_a_new_one_waits_for_the_request_deadline(setup):
    half = b"17:poplock 192.0"
    with start_socketmap(setup, "MaxConnections=3\nRequestTimeout=3s\n") as socketmap:
        busy = [connect(socketmap) for _ in range(3)]
        busy[0].sendall(half)
        busy[1].sendall(half)
        busy[2].sendall(netstring(f"poplock {GRANTED}") + half)
        assert reply(busy[2]) == "OK OK"  # by now the service has read all three halves
        refused = connect(socketmap)
        send_ignoring_close(refused, netstring(f"poplock {GRANTED}"))
        assert read_until_closed(refused) == b""
        assert "MaxConnections=3 reached, each in the middle of a request" in socketmap.output()
        for connection in busy:  # each request's deadline ends it, unanswered
            assert read_until_closed(connection) == b""
        assert ask(connect(socketmap), GRANTED) == "OK OK"


def test_one_peer_over_its_limit_loses_only_its_own_idle_connections(setup):
    with start_socketmap(setup, "MaxConnections=100\nMaxConnectionsPerPeer=20\n") as socketmap:
        neighbours = [connect(socketmap, "127.0.0.6") for _ in range(3)]
        for neighbour in neighbours:
            assert ask(neighbour, GRANTED) == "OK OK"
        hog = [connect(socketmap, "127.0.0.5") for _ in range(50)]
        wait_until(lambda: all(closed_now(connection) for connection in hog[:30]),
                   what="closing the hog's 30 connections idle longest")
        for connection in hog[30:]:
            assert ask(connection, UNGRANTED) == "NOTFOUND "
        for neighbour in neighbours:
            assert ask(neighbour, GRANTED) == "OK OK"
        assert "127.0.0.5 has [Socketmap] MaxConnectionsPerPeer=20 connections" in socketmap.output()
        assert "127.0.0.6 has" not in socketmap.output()


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
    path = reachable_by_everyone(tmp_path) / "socketmap.sock"
    with start_socketmap(setup, "MaxConnectionsPerPeer=3\n", str(path)) as socketmap:
        other_user = subprocess.Popen([sys.executable, "-I", "-S", "-c", CLIENT_AS_ANOTHER_USER, str(path),
                                       netstring(f"poplock {GRANTED}").decode()], user="nobody", group="nogroup",
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
            assert ask(own[4], GRANTED) == "OK OK"
            other_user.stdin.write("\n")
            other_user.stdin.flush()
            assert other_user.stdout.readline() == "5:OK OK,\n"  # nobody's older connection was left alone
        finally:
            other_user.kill()
            other_user.wait(10)
        assert "uid 0 has [Socketmap] MaxConnectionsPerPeer=3 connections" in socketmap.output()
