"""Fault suite: damaged stores, cut at many offsets and overwritten with random bytes, against every
program that reads the store. relaylock always runs the server, poplock-policy never answers OK
for an address without a grant, the CLI gives a clear error (never a traceback, never fewer
grants), and the reader rebuilds the store from the journal.
"""

import json
import os
import random
import re
import socket
import subprocess
import time

import pytest
from support.journald import write_journal_file
from support.poplock import PolicyProcess, command

from poplock.grants import Grant
from poplock.store import read_snapshot
from poplock.storewriter import StoreWriter

GRANTED = [f"10.9.{index >> 8}.{index & 255}" for index in range(300)]
NEVER_GRANTED = "203.0.113.66"
REQUEST = "request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address={client}\nrecipient=x@elsewhere.example\n\n"


def login_line(address: str) -> str:
    # A user of its own for each client: one user's logins open at most MaxAddressesPerUser relays.
    return (f"pop3-login: Login: user=<user-{address}>, method=PLAIN, rip={address}, lip=192.0.2.1, mpid=4242, "
            f"TLS, session=<b7aS8S1hfbZ/AAAF>")


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> bytes:
    """The bytes of a store with 300 live grants and a reader's cursor."""
    path = tmp_path_factory.mktemp("whole") / "grants.db"
    now = int(time.time())
    with StoreWriter(str(path)).transaction() as transaction:
        for address in GRANTED:
            transaction.grants[address] = Grant(address, now + 3600, now, "dovecot")
        transaction.metadata["cursor:/var/lib/poplock/cursor"] = "s=1;i=2;b=3;m=4;t=5;x=6"
    return path.read_bytes()


def damaged_variants(whole: bytes) -> list[tuple[str, bytes]]:
    generator = random.Random(20261202)
    variants = [(f"cut at {offset}", whole[:offset]) for offset in range(0, len(whole), 4096)]
    variants += [(f"cut at {offset}", whole[:offset]) for offset in sorted(generator.sample(range(len(whole)), 12))]
    for _ in range(30):
        blob = bytearray(whole)
        start = generator.randrange(len(blob))
        length = generator.choice((1, 8, 64, 512, 4096))
        blob[start:start + length] = generator.randbytes(length)
        variants.append((f"{length} random bytes at {start}", bytes(blob[:len(whole)])))
    return variants


def install(setup, data: bytes) -> None:
    """Publish `data` as the store, as a new file (as a writer would), so services notice it."""
    new = setup.store.with_suffix(".incoming")
    new.write_bytes(data)
    os.replace(new, setup.store)


def test_relaylock_always_runs_the_server_and_never_relays_an_address_without_a_grant(setup, whole):
    for name, data in damaged_variants(whole):
        install(setup, data)
        for address in (NEVER_GRANTED, GRANTED[7]):
            result = subprocess.run(
                [command("relaylock"), "-c", str(setup.config), "--", "sh", "-c", "echo \"ran ${RELAYCLIENT-unset}\""],
                env={"TCPREMOTEIP": address, "PATH": "/usr/bin:/bin"}, stdin=subprocess.DEVNULL,
                capture_output=True, text=True, timeout=30)
            assert result.returncode == 0 and result.stdout.startswith("ran "), (name, result.stderr)
            if address == NEVER_GRANTED:
                assert result.stdout == "ran unset\n", name
            assert "Traceback" not in result.stderr, name


def test_the_policy_service_never_answers_ok_for_an_address_without_a_grant(setup, whole):
    install(setup, whole)
    with PolicyProcess(setup) as policy:
        connection = socket.create_connection(("127.0.0.1", policy.port), timeout=10)
        reader = connection.makefile("rb")

        def ask(address: str) -> bytes:
            connection.sendall(REQUEST.format(client=address).encode())
            reply = reader.readline()
            assert reader.readline() == b"\n"
            return reply

        assert ask(GRANTED[7]) == b"action=OK\n"
        for name, data in damaged_variants(whole):
            install(setup, data)
            assert ask(NEVER_GRANTED) == b"action=DUNNO\n", name
            assert ask(GRANTED[7]) in (b"action=OK\n", b"action=DUNNO\n"), name
        install(setup, whole)
        assert ask(GRANTED[7]) == b"action=OK\n"  # it went on answering throughout
        connection.close()
        assert policy.process.poll() is None
    assert "Traceback" not in policy.output()


def test_the_cli_shows_every_grant_or_says_the_store_is_damaged_never_fewer(setup, whole):
    for name, data in damaged_variants(whole):
        install(setup, data)
        shown = setup.run("show", "--json")
        assert shown.returncode in (0, 74), (name, shown.stderr)
        assert "Traceback" not in shown.stderr, name
        if shown.returncode == 0:
            addresses = [json.loads(line)["address"] for line in shown.stdout.splitlines()]
            if not set(GRANTED) <= set(addresses):  # a damaged key or value is said, never left out silently
                unreadable = re.search(r"holds (\d+) entries this version cannot read", shown.stderr)
                assert unreadable and len(set(GRANTED) - set(addresses)) <= int(unreadable[1]), name
        else:
            assert f"poplock: error: the grant store {setup.store}" in shown.stderr, name
        checked = setup.run("check", NEVER_GRANTED)
        assert checked.returncode in (1, 74) and "Traceback" not in checked.stderr, (name, checked.stderr)


def test_the_reader_rebuilds_a_damaged_store_from_the_journal(setup, whole, tmp_path):
    now = time.time()
    journal = tmp_path / "journal" / "remote.journal"
    journal.parent.mkdir()
    logins = GRANTED[:20]
    write_journal_file(journal, [
        {"__REALTIME_TIMESTAMP": int((now - 100 + index) * 1e6), "MESSAGE": login_line(address),
         "SYSLOG_IDENTIFIER": "dovecot", "_UID": 0, "_TRANSPORT": "syslog"}
        for index, address in enumerate(logins)])
    variants = damaged_variants(whole)
    for name, data in random.Random(7).sample(variants, 8) + [variants[3]]:
        install(setup, data)
        result = setup.run_reader("--file", str(journal), check=False)
        assert result.returncode == 0, (name, result.stderr)
        assert "Traceback" not in result.stderr, name
        rebuilt = read_snapshot(str(setup.store), 0.02)  # whole again
        assert set(logins) <= set(rebuilt.grants), name
        setup.store.unlink()
