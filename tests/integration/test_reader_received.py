"""poplock-reader on journals received by a real systemd-journal-remote ([Reader] Directory=).

Each "POP host" is a loopback source address; journal-remote names its file after it,
which is what [Source:NAME] Hosts= trusts. Entries carry whatever fields their sender
wrote, so a forged _HOSTNAME, an unlisted sender and an administrative change inside a
received journal must all count for nothing.
"""

import json
import select
import subprocess
import time

import pytest
from support.journald import send_until_readable, unique_tag
from support.journalremote import JournalReceiver
from support.netns import network_namespace
from support.poplock import ReaderProcess

from poplock.received import decode_positions, encode_positions, sender_of

POP_A, POP_B, UNLISTED = "127.0.0.5", "127.0.0.6", "127.0.0.7"


def login(address: str, at: float, *, user: str = "alice", **fields) -> dict:
    """Dovecot's login line as a POP host's journald records it under systemd."""
    entry = {"__REALTIME_TIMESTAMP": int(at * 1e6), "SYSLOG_IDENTIFIER": "dovecot", "_SYSTEMD_UNIT": "dovecot.service",
             "_UID": 0, "_PID": 801, "_TRANSPORT": "syslog", "PRIORITY": 6,
             "MESSAGE": f"pop3-login: Login: user=<{user}>, method=PLAIN, rip={address}, lip=192.0.2.1, mpid=4242"}
    entry.update(fields)
    return entry


def grants(setup) -> dict:
    shown = setup.run("show", "--json", check=True).stdout.splitlines()
    return {record["address"]: record for record in map(json.loads, shown) if record["kind"] == "grant"}


@pytest.fixture
def receiver(tmp_path):
    with JournalReceiver(tmp_path / "remote") as receiving:
        yield receiving


@pytest.fixture
def aggregator(setup, receiver):
    setup.write(extra=f"Sources=dovecot\nDirectory={receiver.directory}\n\n"
                      f"[Source:dovecot]\nHosts={POP_A} {POP_B}\n")
    return setup


def test_received_file_names_give_the_sender_and_nothing_else_does():
    assert sender_of("remote-10.123.0.11.journal") == "10.123.0.11"
    assert sender_of("remote-10.123.0.11@0f1e2d-00000000000000a1-0005f1e2d3c4b5a6.journal") == "10.123.0.11"
    assert sender_of("remote-::1.journal") == "::1"
    assert sender_of("remote-2001:db8::5@ab-01-02.journal~") == "2001:db8::5"
    for name in ("remote-popB.journal", "system.journal", "remote-10.0.0.1.journal.tmp", "remote-.journal",
                 "user-1000.journal", "remote-10.0.0.256.journal"):
        assert sender_of(name) is None, name


def test_positions_survive_their_encoding_and_a_plain_cursor_is_this_hosts():
    positions = {"local": "s=1;i=2;b=3", "10.0.0.1": "s=a;i=b", "2001:db8::1": "s=c;i=d"}
    assert decode_positions(encode_positions(positions)) == positions
    assert decode_positions("s=1;i=2;b=3;m=4;t=5;x=6") == {"local": "s=1;i=2;b=3;m=4;t=5;x=6"}
    assert decode_positions(None) == {}


def test_logins_count_only_from_listed_hosts_whatever_the_entries_say(aggregator, receiver):
    now = time.time()
    receiver.upload(POP_A, [login("192.0.2.10", now - 30, _HOSTNAME="popA")])
    receiver.upload(POP_B, [login("192.0.2.11", now - 20, _HOSTNAME="popB")])
    # An unlisted host claiming to be popA, and a listed one whose entry names another host: the
    # file the receiver wrote is what counts.
    receiver.upload(UNLISTED, [login("192.0.2.66", now - 10, _HOSTNAME="popA")])
    receiver.upload(POP_B, [login("192.0.2.12", now - 5, _HOSTNAME="popA")])
    # Untrusted by the source's own rule, as popA's journald recorded it: a user's `logger -t dovecot`.
    receiver.upload(POP_A, [login("192.0.2.67", now - 4, _SYSTEMD_UNIT="user@1000.service", _UID=1000)])
    # No unit at all, as root: this host's Users= would trust it, but a uid is no proof on another host.
    receiver.upload(POP_A, [{key: value for key, value in login("192.0.2.68", now - 3).items()
                             if key != "_SYSTEMD_UNIT"}])
    for sender in (POP_A, POP_B, UNLISTED):
        receiver.wait_for_file(sender)
    result = aggregator.run_reader()
    assert sorted(grants(aggregator)) == ["192.0.2.10", "192.0.2.11", "192.0.2.12"]
    assert f"journal files from {UNLISTED}, which no [Source:NAME] Hosts= lists" in result.stderr
    assert "granted 192.0.2.12 until" in result.stderr and "(dovecot login at 127.0.0.6)" in result.stderr


def test_a_sender_without_hosts_is_this_hosts_journal_only(setup, receiver):
    now = time.time()
    receiver.upload(POP_A, [login("192.0.2.10", now - 30)])
    receiver.wait_for_file(POP_A)
    setup.write(extra=f"Sources=dovecot\nDirectory={receiver.directory}\n")  # no Hosts=
    setup.run_reader()
    assert grants(setup) == {}


def test_hosts_without_a_directory_and_names_for_hosts_stop_start_up(setup):
    setup.write(extra="Sources=dovecot\n\n[Source:dovecot]\nHosts=popA 10.0.0.1\n")
    result = setup.run_reader(check=False)
    assert result.returncode == 78
    assert "[Source:dovecot] Hosts: 'popA' is not an IP address" in result.stderr
    assert "[Source:dovecot] Hosts: needs [Reader] Directory=" in result.stderr


def test_a_missing_received_directory_is_named(setup, tmp_path):
    setup.write(extra=f"Sources=dovecot\nDirectory={tmp_path / 'nowhere'}\n\n[Source:dovecot]\nHosts={POP_A}\n")
    result = setup.run_reader(check=False)
    assert result.returncode == 66
    assert f"[Reader] Directory={tmp_path / 'nowhere'}: no such directory" in result.stderr


def test_an_entry_arriving_late_behind_another_senders_later_one_is_still_read(aggregator, receiver):
    """One sd-journal over the directory skips it for good; one position per sender does not."""
    now = time.time()
    receiver.upload(POP_B, [login("192.0.2.20", now - 5)])
    receiver.wait_for_file(POP_B)
    with ReaderProcess(aggregator) as reader:
        aggregator.wait_until_allowed("192.0.2.20")
        # POP host A's uploader was behind: its entries are stamped before the one already read.
        receiver.upload(POP_A, [login("192.0.2.21", now - 60), login("192.0.2.22", now - 50)])
        aggregator.wait_until_allowed("192.0.2.21")
        aggregator.wait_until_allowed("192.0.2.22")
        receiver.upload(POP_B, [login("192.0.2.23", now - 40)])  # behind what B itself sent: B's own order
        aggregator.wait_until_allowed("192.0.2.23")
        assert reader.stop() == 0
    positions = decode_positions(aggregator.cursor.read_text().strip())
    assert {POP_A, POP_B} <= set(positions), positions


def test_a_restart_or_kill_neither_loses_nor_replays_a_senders_logins(aggregator, receiver):
    now = time.time()
    receiver.upload(POP_A, [login(f"192.0.2.{n}", now - 100 + n, user=f"a{n}") for n in range(1, 11)])
    receiver.upload(POP_B, [login(f"198.51.100.{n}", now - 100 + n, user=f"b{n}") for n in range(1, 11)])
    receiver.wait_for_file(POP_A)
    receiver.wait_for_file(POP_B)
    with ReaderProcess(aggregator) as reader:
        aggregator.wait_until_allowed("198.51.100.10")
        aggregator.wait_until_allowed("192.0.2.10")
        reader.kill()
    # While it is down, both hosts go on; one of them far behind the other in time.
    receiver.upload(POP_B, [login("198.51.100.50", now - 3)])
    receiver.upload(POP_A, [login("192.0.2.50", now - 90)])
    with ReaderProcess(aggregator, "-v") as reader:
        aggregator.wait_until_allowed("192.0.2.50")
        aggregator.wait_until_allowed("198.51.100.50")
        reader.stop()
    output = reader.output()
    # Only the two new logins were read after the restart: nothing replayed.
    assert output.count("granted ") == 2, output
    assert len(grants(aggregator)) == 22


def test_a_change_inside_a_received_journal_is_never_replayed(aggregator, receiver):
    """A POP host can write any field, the administrative ones and this host's machine ID included."""
    now = time.time()
    with open("/etc/machine-id") as file:
        machine_id = file.read().strip()
    aggregator.run("add", "192.0.2.99", check=True)
    forged = {"__REALTIME_TIMESTAMP": int(now * 1e6), "MESSAGE": "poplock: added 203.0.113.9",
              "POPLOCK_STORE": str(aggregator.store), "POPLOCK_CHANGE": "add", "POPLOCK_CLIENT_ADDRESS": "203.0.113.9",
              "_UID": 0, "_TRANSPORT": "journal", "_MACHINE_ID": machine_id, "SYSLOG_IDENTIFIER": "dovecot",
              "_SYSTEMD_UNIT": "dovecot.service"}
    receiver.upload(POP_A, [forged, login("192.0.2.10", now)])
    receiver.wait_for_file(POP_A)
    aggregator.run_reader()
    assert "203.0.113.9" not in grants(aggregator)
    assert "192.0.2.10" in grants(aggregator)
    # The manual grant, journaled on this host, comes back in a rebuild from the journals.
    aggregator.store.unlink()
    aggregator.run_reader()
    assert {"192.0.2.99", "192.0.2.10"} <= set(grants(aggregator))


def test_sessions_of_two_hosts_are_their_own(aggregator, receiver):
    """The same Dovecot pid and session id on two hosts: one's logout or restart ends only its own."""
    now = time.time()

    def imap(message: str, at: float, **fields) -> dict:
        entry = {"__REALTIME_TIMESTAMP": int(at * 1e6), "SYSLOG_IDENTIFIER": "dovecot",
                 "_SYSTEMD_UNIT": "dovecot.service", "_UID": 0, "_PID": 801, "_TRANSPORT": "syslog",
                 "MESSAGE": message}
        entry.update(fields)
        return entry

    def opened(address: str, at: float) -> dict:
        return imap(f"imap-login: Login: user=<alice>, method=PLAIN, rip={address}, lip=192.0.2.1, mpid=4242, "
                    f"session=<SAMESESSION1>", at)

    aggregator.write(window="1min", extra=f"Sources=dovecot\nDirectory={receiver.directory}\n\n"
                                          f"[Source:dovecot]\nHosts={POP_A} {POP_B}\n")
    receiver.upload(POP_A, [opened("192.0.2.30", now - 300)])
    receiver.upload(POP_B, [opened("192.0.2.31", now - 300)])
    receiver.wait_for_file(POP_A)
    receiver.wait_for_file(POP_B)
    aggregator.run_reader()
    held = grants(aggregator)
    assert held["192.0.2.30"]["sessions"] == 1 and held["192.0.2.31"]["sessions"] == 1, held
    # Host A's connection ends; B's, with the same pid and session id, stays open.
    receiver.upload(POP_A, [imap("imap(alice)<4242><SAMESESSION1>: Logged out in=10 out=200", now - 200)])
    aggregator.run_reader()
    assert not aggregator.may_relay("192.0.2.30")
    assert aggregator.may_relay("192.0.2.31") and grants(aggregator)["192.0.2.31"]["sessions"] == 1


@pytest.fixture
def small_receiver(tmp_path):
    """A receiver writing to a 24 MiB tmpfs, where journal-remote rotates a sender's file every 512 KiB."""
    directory = tmp_path / "remote"
    directory.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m,mode=0755", "poplock-test-remote", str(directory)],
                   check=True)
    try:
        with JournalReceiver(directory) as receiving:
            yield receiving
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=True)


def test_a_senders_rotated_and_vacuumed_files_are_followed_without_losing_a_login(setup, small_receiver):
    receiver = small_receiver
    setup.write(extra=f"Sources=dovecot\nDirectory={receiver.directory}\n\n[Source:dovecot]\nHosts={POP_A} {POP_B}\n")
    now = time.time()
    padding = "x" * 400  # fills the files faster: journal-remote rotates by size
    logins = [login(f"10.{n // 250}.{n % 250}.1", now - 600 + n * 0.1, user=f"u{n}") for n in range(4000)]
    receiver.upload(POP_B, [login("192.0.2.200", now - 700, user="b")])
    receiver.wait_for_file(POP_B)
    with ReaderProcess(setup) as reader:
        for start in range(0, len(logins), 500):
            chunk = logins[start:start + 500]
            receiver.upload(POP_A, [dict(entry, PADDING=f"{padding}{n}") for n, entry in enumerate(chunk)])
            if start == 2000:  # vacuum, once read: the oldest rotated file goes, as journalctl --vacuum-files does
                last = chunk[-1]["MESSAGE"].partition("rip=")[2].partition(",")[0]
                setup.wait_until_allowed(last, timeout=30)
                rotated = sorted(receiver.directory.glob(f"remote-{POP_A}@*.journal"))
                assert rotated, sorted(receiver.directory.iterdir())
                rotated[0].unlink()
        setup.wait_until_allowed("10.15.249.1", timeout=30)
        assert reader.stop() == 0
    files = sorted(path.name for path in receiver.directory.glob(f"remote-{POP_A}*.journal"))
    assert len(files) >= 3, files  # the live file and at least two rotated ones
    found = grants(setup)
    assert len(found) == 4001, len(found)


def test_two_readers_of_the_same_received_journals_reach_the_same_grants(tmp_path, receiver):
    """The store is a function of the journals: either deciding host may be asked."""
    from support.poplock import Setup

    now = time.time()
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    first, second = Setup(tmp_path / "one"), Setup(tmp_path / "two")
    for reader_setup in (first, second):
        reader_setup.write(extra=f"Sources=dovecot\nDirectory={receiver.directory}\n\n"
                                 f"[Source:dovecot]\nHosts={POP_A} {POP_B}\n")
    receiver.upload(POP_A, [login(f"192.0.2.{n}", now - 300 + n, user=f"a{n}") for n in range(1, 40)])
    receiver.wait_for_file(POP_A)
    first.run_reader()  # the first reads A alone, then both; the second reads everything at once
    receiver.upload(POP_B, [login(f"192.0.2.{n}", now - 320 + n, user=f"b{n}") for n in range(20, 60)])
    receiver.upload(POP_A, [login(f"198.51.100.{n}", now - 200 + n, user=f"a{n}") for n in range(1, 30)])
    receiver.wait_for_file(POP_B)
    first.run_reader()
    second.run_reader()

    def comparable(found):
        return {address: (record["expires"], record.get("user"), record.get("source")) for address, record in
                found.items()}

    assert comparable(grants(first)) == comparable(grants(second))
    assert len(grants(first)) == 39 + 40 + 29 - 20


def test_ipv6_senders_and_ipv4_ones_at_a_dual_stack_receiver_are_named_and_listed_by_their_address(setup, tmp_path):
    """journal-remote names an IPv6 sender's file by its compressed address, and an IPv4 sender
    reaching an IPv6 socket by its IPv4 address (not ::ffff:...): what Hosts= must match."""
    now = time.time()
    with network_namespace("2001:db8::11", "2001:db8::12", "192.0.2.211"), \
            JournalReceiver(tmp_path / "remote", host=None) as receiver:
        receiver.upload("2001:db8::11", [login("192.0.2.10", now - 3)])
        receiver.upload("2001:db8::12", [login("192.0.2.11", now - 2)])
        receiver.upload("192.0.2.211", [login("192.0.2.12", now - 1)])
        for sender in ("2001:db8::11", "2001:db8::12", "192.0.2.211"):
            receiver.wait_for_file(sender)
    setup.write(extra=f"Sources=dovecot\nDirectory={receiver.directory}\n\n"
                      f"[Source:dovecot]\nHosts=2001:DB8:0:0:0:0:0:11 ::ffff:192.0.2.211\n")
    setup.run_reader()
    assert sorted(grants(setup)) == ["192.0.2.10", "192.0.2.12"]


def test_looking_afresh_keeps_every_handle_unless_a_stream_stepped_past_an_entry(journald, receiver):
    """A decision waiting on a login the last read did not find makes the reader look afresh; that
    reopened every handle, and closing this host's journal's and the directory's inotify descriptors
    took up to 24 ms each while the decision waited."""
    from poplock.follow import JournalFollower
    from poplock.received import ReceivedJournals

    def readable(path, count: int) -> bool:
        probe = JournalFollower(None, files=[str(path)])
        probe.seek(None, 0)
        found = sum(1 for _ in probe.read(None))
        probe.close()
        return found >= count

    def wait_readable(count: int) -> None:
        deadline = time.monotonic() + 10
        while not readable(receiver.file_of(POP_A), count):
            assert time.monotonic() < deadline, "the upload never became readable"
            time.sleep(0.02)

    now = time.time()
    receiver.upload(POP_A, [login("192.0.2.30", now - 5)])
    receiver.wait_for_file(POP_A)
    wait_readable(1)
    tag = unique_tag("poplock-afresh")
    local = JournalFollower([f"SYSLOG_IDENTIFIER={tag}"])
    journals = ReceivedJournals(str(receiver.directory), local,
                                lambda sender: ["SYSLOG_IDENTIFIER=dovecot"] if sender == POP_A else None)
    journals.seek(None, now - 600)
    assert [entry["MESSAGE"].split("rip=")[1][:10] for entry in journals.read(None)] == ["192.0.2.30"]
    handles = {name: stream._reader for name, stream in journals._streams.items()}
    notifier = journals._notifier._reader

    journals.look_afresh(journals.cursor(), now - 600)
    assert {name: stream._reader for name, stream in journals._streams.items()} == handles
    assert journals._notifier._reader is notifier and list(journals.read(None)) == []

    receiver.upload(POP_A, [login("192.0.2.31", now - 4), login("192.0.2.32", now - 3)])
    wait_readable(3)
    cursor = journals.cursor()
    assert journals._streams[POP_A]._reader._next()  # stepped past one, as sd-journal may (follow.py)
    journals.look_afresh(cursor, now - 600)
    assert journals._streams[POP_A]._reader is not handles[POP_A]
    assert journals._streams["local"]._reader is handles["local"] and journals._notifier._reader is notifier
    assert [entry["MESSAGE"].split("rip=")[1][:10] for entry in journals.read(None)] == ["192.0.2.31", "192.0.2.32"]

    # This host's journal: its handle replaced, the poll waits on the new one.
    send_until_readable(f"{tag} stepped past", tag)
    send_until_readable(f"{tag} after it", tag)
    cursor = journals.cursor()
    assert journals._streams["local"]._reader._next()
    journals.look_afresh(cursor, now - 600)
    assert journals._streams["local"]._reader is not handles["local"]
    assert [entry["MESSAGE"] for entry in journals.read(None)] == [f"{tag} stepped past", f"{tag} after it"]
    send_until_readable(f"{tag} later", tag)
    assert select.select([journals.fileno()], [], [], 5)[0], "no wake-up from this host's journal"
    journals.process()
    assert [entry["MESSAGE"] for entry in journals.read(None)] == [f"{tag} later"]
    journals.close()


def test_a_restarted_reader_opens_a_senders_files_from_its_position_on_and_a_rebuild_all_of_them(setup,
                                                                                                 small_receiver):
    """With matches, each read looks into every file open, and a sender's archived files pile up, one a
    rotation: a stream opens only the files that can hold entries after its position, and all of them
    again when the reader goes back (the store lost, rebuilt from the window)."""
    from poplock.follow import JournalFollower
    from poplock.received import ReceivedJournals

    receiver = small_receiver
    setup.write(extra=f"Sources=dovecot\nDirectory={receiver.directory}\n\n[Source:dovecot]\nHosts={POP_A}\n")
    now = time.time()
    padding = "x" * 400  # journal-remote rotates by size
    logins = [login(f"10.{n // 250}.{n % 250}.1", now - 600 + n * 0.1, user=f"u{n}") for n in range(3000)]
    with ReaderProcess(setup) as reader:
        for start in range(0, len(logins), 500):
            receiver.upload(POP_A, [dict(entry, PADDING=f"{padding}{n}")
                                    for n, entry in enumerate(logins[start:start + 500])])
        setup.wait_until_allowed("10.11.249.1", timeout=30)
        assert reader.stop() == 0
    every = sorted(str(path) for path in receiver.directory.glob(f"remote-{POP_A}*.journal"))
    assert len(every) >= 3, every

    journals = ReceivedJournals(str(receiver.directory), JournalFollower(["SYSLOG_IDENTIFIER=poplock-none"]),
                                lambda sender: ["SYSLOG_IDENTIFIER=dovecot"] if sender == POP_A else None)
    journals.seek(setup.cursor.read_text().strip(), now - 3600)  # where the reader stopped
    opened = journals._opened[POP_A]
    assert str(receiver.file_of(POP_A)) in opened and len(opened) < len(every), (opened, every)
    assert list(journals.read(None)) == []
    journals.seek(None, now - 3600)  # as a rebuild does
    assert journals._opened[POP_A] == every
    assert sum(1 for _ in journals.read(None)) == 3000
    journals.close()

    with ReaderProcess(setup) as reader:
        receiver.upload(POP_A, [login("192.0.2.40", time.time() - 1, user="late")])
        setup.wait_until_allowed("192.0.2.40")
        setup.store.unlink()  # lost while it runs: rebuilt from the window, every file read again
        receiver.upload(POP_A, [login("192.0.2.41", time.time() - 1, user="later")])
        setup.wait_until_allowed("192.0.2.41")
        assert reader.stop() == 0
    restarted, rebuilt = reader.output().split("is gone; rebuilding it from the journal")
    assert "granted 10.0.0.1 " not in restarted and "granted 10.0.0.1 " in rebuilt  # read again only then
    assert len(grants(setup)) == 3002
