"""A slow disk holds up no decision: poplock-reader installs its commits in a thread of its own
(storewriter.Publisher), and goes on reading and answering while one waits on the disk.

holdfsync.c holds the fsync of the store's PATH.new in the real reader until the test lets it go
(or makes it fail), so that "while a commit waits on the disk" is a state the test is in, not a race:
a real journald, the real reader, poplock-policy and `poplock show` (which reads the files alone).
"""

import json
import os
import socket
import time
from pathlib import Path

import pytest
from support.faults import build_shim
from support.journald import send_until_readable, unique_tag
from support.poplock import PolicyProcess, ReaderProcess, Setup

from poplock.storewriter import MERGE_AFTER

SHIM_SOURCE = Path(__file__).parents[1] / "support" / "holdfsync.c"


def login_line(address: str) -> str:
    return (f"pop3-login: Login: user=<user-{address}>, method=PLAIN, rip={address}, lip=127.0.0.1, mpid=4242, "
            f"session=<b7aS8S1hfbZ/AAAF>")


@pytest.fixture(scope="module")
def shim(tmp_path_factory):
    return build_shim(SHIM_SOURCE, tmp_path_factory.mktemp("shim"))


@pytest.fixture
def held(journald, shim, tmp_path):
    """A setup, and the environment of a reader whose store installs wait while `gate` exists."""
    tag = unique_tag()
    (tmp_path / "store").mkdir()
    setup = Setup(tmp_path / "store", extra=f"\n[Source:dovecot]\nIdentifiers={tag}\n")
    setup.config.write_text(setup.config.read_text().replace("[Store]\n", "[Store]\nReaderWait=1s\n"))
    setup.tag = tag
    setup.gate = tmp_path / "gate"
    setup.reader_environment = {"LD_PRELOAD": str(shim), "HOLD_FSYNC_GATE": str(setup.gate),
                                "HOLD_FSYNC_PATH": "*/grants.db.new"}
    yield setup
    setup.gate.unlink(missing_ok=True)  # a reader left holding an fsync lets it go


def stored(setup) -> set[str]:
    """The addresses the store's files grant, read by `poplock show` (which asks no reader)."""
    result = setup.run("show", "--json", check=True)
    return {record["address"] for record in map(json.loads, result.stdout.splitlines()) if record["kind"] == "grant"}


def wait_for(condition, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.02)


def asked_for_grants(connection, answers, setup, address: str) -> dict:
    """Log a login of `address`, ask the reader `sync grants` once it is readable: the grants told."""
    send_until_readable(login_line(address), setup.tag)
    connection.sendall(b"sync grants\n")
    answer = answers.readline()
    assert answer.startswith(b"ok {"), answer
    return json.loads(answer[3:])


def held_behind(setup, connection, first: str, second: str) -> None:
    """Logins of `first` and `second`, each asked about: the first's commit held at its fsync, the
    second's queued behind it."""
    setup.gate.touch()
    answers = connection.makefile("rb")
    asked_for_grants(connection, answers, setup, first)
    wait_for(lambda: setup.gate.with_suffix(".held").exists(), "the commit never reached its fsync")
    asked_for_grants(connection, answers, setup, second)


def reader_connection(setup) -> socket.socket:
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    connection.settimeout(10)
    connection.connect(str(setup.directory / "reader.sock"))
    return connection


def test_a_login_is_read_and_granted_while_an_earlier_commit_waits_on_the_disk(held):
    with ReaderProcess(held, environment=held.reader_environment), PolicyProcess(held) as policy:
        held.gate.touch()
        with reader_connection(held) as connection:
            answers = connection.makefile("rb")
            assert set(asked_for_grants(connection, answers, held, "10.91.0.1")) == {"10.91.0.1"}
            wait_for(lambda: held.gate.with_suffix(".held").exists(), "the commit never reached its fsync")

            # The first commit waits on the disk: the next login is read, and told with the first's grant.
            assert set(asked_for_grants(connection, answers, held, "10.91.0.2")) == {"10.91.0.1", "10.91.0.2"}
            send_until_readable(login_line("10.91.0.3"), held.tag)
            with socket.create_connection(("127.0.0.1", policy.port), timeout=10) as asking:
                asking.sendall(b"request=smtpd_access_policy\nclient_address=10.91.0.3\n\n")
                assert asking.makefile("rb").readline() == b"action=OK\n"
            assert stored(held) == set()  # none of them is installed yet

            # A plain `sync` (a peer that may not be told grants) is answered once they are installed.
            connection.sendall(b"sync\n")
            connection.settimeout(0.5)
            with pytest.raises(TimeoutError):
                connection.recv(64)
            connection.settimeout(10)
            held.gate.unlink()
            assert answers.readline() == b"ok\n"
            assert stored(held) >= {"10.91.0.1", "10.91.0.2", "10.91.0.3"}


def test_a_commit_the_disk_refuses_is_read_again_with_those_made_after_it(held):
    with ReaderProcess(held, environment=held.reader_environment) as reader:
        with reader_connection(held) as connection:
            held_behind(held, connection, "10.92.0.1", "10.92.0.2")
            held.gate.with_suffix(".fail").touch()
            held.gate.unlink()  # the first fsync fails with EIO; the second commit was made on top of it
            wait_for(lambda: stored(held) >= {"10.92.0.1", "10.92.0.2"}, "the logins were not read again")
        assert reader.process.poll() is None
        assert "Input/output error" in reader.output() and "grants.db.new" in reader.output()


def test_a_reader_killed_while_its_commits_wait_on_the_disk_loses_none_of_them(held):
    with ReaderProcess(held, environment=held.reader_environment) as reader:
        with reader_connection(held) as connection:
            held_behind(held, connection, "10.93.0.1", "10.93.0.2")
        reader.kill()
    held.gate.unlink()
    assert stored(held) == set()
    with ReaderProcess(held):
        wait_for(lambda: stored(held) >= {"10.93.0.1", "10.93.0.2"}, "the restarted reader did not grant them")


def merge_children(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def test_a_merge_held_at_its_fsync_holds_up_no_commit_no_other_writer_and_no_decision(held):
    """The merge into a new base runs in a child while logins go on, and the child keeps none of
    the reader's descriptors: a copy of the store lock's, taken while a commit was being installed,
    held the lock until the child exited, and the next commit and every `poplock add` waited for
    the whole merge (1.4 s at a million grants)."""
    top = held.directory / "top.txt"
    top.write_text("".join(f"10.94.{index >> 8}.{index & 255}\n" for index in range(MERGE_AFTER - 1)))
    held.run("import", "--no-journal", str(top), check=True)  # one login more, and the top is due
    environment = dict(held.reader_environment, HOLD_FSYNC_PATH="*/grants.db.base-*.new")
    held.gate.touch()
    with ReaderProcess(held, environment=environment) as reader:
        with reader_connection(held) as connection:
            answers = connection.makefile("rb")
            asked_for_grants(connection, answers, held, "10.95.0.1")
            wait_for(lambda: held.gate.with_suffix(".held").exists(), "the merge never reached its fsync")
            [child] = merge_children(reader.process.pid)
            kept = [os.readlink(link) for link in Path(f"/proc/{child}/fd").iterdir() if int(link.name) > 2]
            assert [target for target in kept if target.endswith(".lock") or target.startswith("socket:")] == []

            send_until_readable(login_line("10.95.0.2"), held.tag)
            connection.sendall(b"sync\n")  # answered once the commit that read it is installed
            assert answers.readline() == b"ok\n"
            assert {"10.95.0.1", "10.95.0.2"} <= stored(held)
            assert held.run("add", "192.0.2.55").returncode == 0
            assert merge_children(reader.process.pid) == [child]  # still held: all of that ran meanwhile

            held.gate.unlink()
            wait_for(lambda: not merge_children(reader.process.pid), "the merge did not end")
            wait_for(lambda: len(list(held.directory.glob("grants.db.base-*"))) == 1, "no new base was made")
            assert len(stored(held)) == MERGE_AFTER - 1 + 3
        assert reader.stop() == 0
