"""Fresh decisions (issue 10): a refusal first asks poplock-reader to read the journal up to now.

Everything runs against a real journald and a real poplock-reader and poplock-policy, with
5,000 grants stored (`poplock import --no-journal`) and the shipped [Store] ReaderWait=
(50 ms); each setup watches a Dovecot source of its own unique identifier, so nothing
else on this shared machine matches it. The machine is noisy, so one figure is not a
result: every figure is measured in paired runs, A B A B ..., each against a baseline in
the same pair; printed are the median over the runs (min-max), the median ratio to the
baseline (min-max), and for each goal on how many runs it was met.

  1. fresh: TRIALS trials (default 1000, in BLOCKS blocks) of "a trusted login entry
     becomes readable in the journal, then poplock-policy is asked at once", over one
     Postfix-style connection. Readable: a reader of the system journal without matches
     (with matches, systemd 252 can hide the newest entry: issue 10) re-reading in a tight
     loop sees it. Counted: refusals (goal 0) and readable -> OK (goal p99 <= 10 ms).
     Baseline blocks in between: the same, for an entry the reader does not watch and a
     client whose grant is stored (the question answered without a read). Also told: the
     reader's sync and rename calls while it commits (perf trace), and, as a diagnosis,
     the same fresh trials against a reader whose store is on tmpfs (/dev/shm), where
     those calls cost nothing.
  2. idle: IDLE_SECONDS (60) with no journal traffic on the reader's matches, under
     WATCHDOG_USEC=30000000 (WatchdogSec=60s): CPU (utime + stime; schedstat) and wake-ups
     (voluntary context switches; select calls counted by perf), goal <= 0.1 s and at
     most one wake-up a second. Two readers: one on a private journald that nothing
     writes to (the goal's case), one on this machine's journal (its traffic included);
     each beside `journalctl -f` on the same journal (baseline: what any follower of
     that journal is woken by). Measured over windows of IDLE_WINDOW (10) seconds.
     It runs while 3-5 do (they write nothing to any journal); 1 comes after it.
  3. relaylock: bench/relaylock.py's method (whole processes, REMOTE_ADDR as under
     Accept=yes, the commands taking turns run by run) for a granted client (goal <= 1.3x `python3 -IS -c
     pass`) and for a client without a grant, which asks the reader (goal <= 1.6x).
  4. flood: MISS_RATE (1000) misses a second from 50 connections in lock step for
     FLOOD_SECONDS (3): the reader's share of a core (goal <= 20%; schedstat), the policy's
     questions and the reader's reads (perf: accepted connections and select calls; each
     turn of the reader's loop is one read). Baseline: the same load of granted clients.
  5. throughput: bench/policy.py's load (2 processes, 20 connections in lock step) for
     THROUGHPUT_SECONDS (2): granted clients (goal >= 20,000 decisions/s and >= 0.4x the
     DUNNO-to-everything asyncio server) and inbound mail, MISS_PERCENT (90) % misses.

Environment: TRIALS, BLOCKS, PAIRS (4: runs of 4 and 5), IDLE_SECONDS, IDLE_WINDOW, MISS_RATE,
FLOOD_SECONDS, THROUGHPUT_SECONDS, MISS_PERCENT, RELAYLOCK_RUNS (40 per command and round), RELAYLOCK_ROUNDS (8),
BENCH_REPORT (write the table there as Markdown too).
"""

from __future__ import annotations

import contextlib
import heapq
import multiprocessing
import os
import selectors
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

from common import Setup, command, fill_store, grant_address, layout, median, percentile, spread, verdict
from policy import BASELINE_SERVER, REQUEST
from support.journald import PrivateJournald, ensure_journald, unique_tag
from support.poplock import PolicyProcess, ReaderProcess
from support.ports import free_port, wait_for_port
from systemd import journal
from usage import SyscallCounter, SyscallTimes, Usage, usage

from poplock.config import load_config

TRIALS = int(os.environ.get("TRIALS", "1000"))
BLOCKS = int(os.environ.get("BLOCKS", "5"))
PAIRS = int(os.environ.get("PAIRS", "4"))
IDLE_SECONDS = float(os.environ.get("IDLE_SECONDS", "60"))
IDLE_WINDOW = float(os.environ.get("IDLE_WINDOW", "10"))
MISS_RATE = int(os.environ.get("MISS_RATE", "1000"))
FLOOD_CONNECTIONS = 50
FLOOD_SECONDS = float(os.environ.get("FLOOD_SECONDS", "3"))
THROUGHPUT_SECONDS = float(os.environ.get("THROUGHPUT_SECONDS", "2"))
THROUGHPUT_CONNECTIONS = 20
LOAD_PROCESSES = 2
MISS_PERCENT = int(os.environ.get("MISS_PERCENT", "90"))
RELAYLOCK_RUNS = int(os.environ.get("RELAYLOCK_RUNS", "40"))
RELAYLOCK_ROUNDS = int(os.environ.get("RELAYLOCK_ROUNDS", "8"))
STORED_GRANTS = 5000
WATCHDOG_USEC = "30000000"  # what WatchdogSec=60s hands the reader: a ping every 15 s
SYNC_CALLS = ["fsync", "fdatasync", "msync", "rename"]  # what a commit waits on
READABLE_TIMEOUT = 5.0  # an entry not readable by then was dropped (journald's rate limit, say)

STORED = "10.60"  # the 5,000 stored grants
FRESH = "10.83"  # the fresh trials' logins, one each
FRESH_TMPFS = "10.84"  # the same, for the reader whose store is on tmpfs
MISSES = "10.71"  # clients that never logged in
UNGRANTED = "10.72.0.1"  # relaylock's client without a grant


def login_line(address: str) -> str:
    # A user of its own for each client: one user's logins open at most MaxAddressesPerUser relays.
    return (f"pop3-login: Login: user=<user-{address}>, method=PLAIN, rip={address}, lip=127.0.0.1, mpid=4242, "
            f"session=<b7aS8S1hfbZ/AAAF>")


def policy_request(address: str) -> bytes:
    return REQUEST.format(client=address).encode()


def make_setup(directory: Path, tag: str) -> Setup:
    """A setup whose reader watches identifier `tag` and answers on its own ReaderSocket=,
    with the shipped ReaderWait=, and 5,000 live grants stored."""
    directory.mkdir()
    setup = Setup(directory, extra=f"\n[Source:dovecot]\nIdentifiers={tag}\n")
    text = setup.config.read_text()
    if "ReaderSocket=" not in text:  # never the default /run/poplock/reader.sock: another reader may answer there
        setup.config.write_text(text.replace("[Store]\n", f"[Store]\nReaderSocket={directory / 'reader.sock'}\n", 1))
    setup.tag = tag
    fill_store(setup, STORED, STORED_GRANTS)
    return setup


# --- the table -----------------------------------------------------------------------------------


class Table:
    """Figures, each measured on several runs against a baseline from the same runs."""

    def __init__(self):
        self.rows = [["figure", "measured", "baseline", "baseline is", "ratio", "goal", "verdict"]]

    def add(self, figure: str, values: list, show, *, baseline: list | None = None, baseline_name: str = "",
            goal: str = "", test=None, ratio: bool = True) -> None:
        """`ratio`: False where the baseline is next to nothing, and a ratio to it would mean nothing."""
        ratios = [value / base for value, base in zip(values, baseline or [], strict=False)
                  if ratio and value is not None and base]
        passed = [test(value, base) for value, base in
                  zip(values, baseline if baseline is not None else [None] * len(values), strict=True)
                  if value is not None] if test is not None else []
        self.rows.append([figure, spread(values, show), spread(baseline, show) if baseline is not None else "",
                          baseline_name, spread(ratios, lambda ratio: f"{ratio:.2f}x") if ratios else "",
                          goal, verdict(passed) if test is not None else ""])


def milliseconds(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def per_second(value: float) -> str:
    return f"{value:,.0f}/s"


def count(value: float) -> str:
    return f"{value:,.0f}"


def cpu_seconds(value: float) -> str:
    return f"{value:.3f} s"


def percent(value: float) -> str:
    return f"{value * 100:.1f}%"


# --- 2. idle -------------------------------------------------------------------------------------


class IdleWatch(threading.Thread):
    """Samples idle processes at the edges of IDLE_WINDOW-second windows, for IDLE_SECONDS."""

    def __init__(self, processes: dict[str, int], pings: dict[str, object], counters: list[SyscallCounter]):
        super().__init__(daemon=True)
        self.processes = processes
        self.counters = counters  # on for the window exactly
        self.pings = pings  # name -> a function: how many WATCHDOG=1 it has sent so far
        self.samples: list[dict[str, Usage]] = []
        self.sent: list[dict[str, int]] = []  # WATCHDOG=1 counts at the first and last sample
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            started = time.perf_counter()
            windows = max(1, round(IDLE_SECONDS / IDLE_WINDOW))
            for index in range(windows + 1):
                time.sleep(max(0.0, started + index * IDLE_SECONDS / windows - time.perf_counter()))
                if index == windows:
                    for counter in self.counters:
                        counter.disable()
                self.samples.append({name: usage(pid) for name, pid in self.processes.items()})
                if index in (0, windows):
                    self.sent.append({name: sent() for name, sent in self.pings.items()})
                if index == 0:
                    for counter in self.counters:
                        counter.enable()
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            self.error = error

    def windows(self, name: str) -> list[Usage]:
        return [after[name] - before[name] for before, after in
                zip(self.samples, self.samples[1:], strict=False)]

    def whole(self, name: str) -> Usage:
        return self.samples[-1][name] - self.samples[0][name]


class Idle:
    """The idle readers and their `journalctl -f` baselines, started before the window opens."""

    def __init__(self, scratch: Path):
        self.private = PrivateJournald(scratch / "private-journald").start()
        storage = str(self.private.storage)
        watchdog = {"WATCHDOG_USEC": WATCHDOG_USEC}
        self.quiet_setup = make_setup(scratch / "idle-private", unique_tag("dovecot-idle"))
        self.system_setup = make_setup(scratch / "idle-system", unique_tag("dovecot-idle"))
        self.readers = {"private": ReaderProcess(self.quiet_setup, "-D", storage, environment=watchdog),
                        "system": ReaderProcess(self.system_setup, environment=watchdog)}
        follow = ["journalctl", "-f", "-q", "-n", "0", "-o", "cat"]
        self.followers = {
            "private": subprocess.Popen(follow + ["-D", storage, f"SYSLOG_IDENTIFIER={self.quiet_setup.tag}"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL),
            "system": subprocess.Popen(follow + [f"SYSLOG_IDENTIFIER={self.system_setup.tag}"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)}
        self.counters = {name: SyscallCounter(reader.process.pid, {"selects": ("syscalls:sys_enter_pselect6", None),
                                                                   "old selects": ("syscalls:sys_enter_select", None)},
                                              scratch)
                         for name, reader in self.readers.items()}
        processes = {f"reader {name}": reader.process.pid for name, reader in self.readers.items()}
        processes.update({f"journalctl {name}": follower.pid for name, follower in self.followers.items()})
        self.watch = IdleWatch(processes, {name: lambda reader=reader: len(reader.notify.received("WATCHDOG=1"))
                                           for name, reader in self.readers.items()}, list(self.counters.values()))
        self.pings: dict[str, int] = {}
        self.selects: dict[str, int | None] = {}

    def start(self) -> None:
        self.watch.start()

    def finish(self) -> None:
        self.watch.join()
        for name, counter in self.counters.items():
            found = counter.counts()
            self.selects[name] = None if found["selects"] is None else found["selects"] + (found["old selects"] or 0)
        if self.watch.error is not None:
            raise self.watch.error
        for name in self.readers:
            self.pings[name] = self.watch.sent[-1][name] - self.watch.sent[0][name]
        self.close()

    def close(self) -> None:
        for follower in self.followers.values():
            follower.terminate()
            follower.wait()
        for reader in self.readers.values():
            reader.__exit__(None, None, None)
        for counter in self.counters.values():
            counter.close()
        self.private.stop()


def idle_rows(table: Table, idle: Idle, notes: list[str]) -> None:
    watch = idle.watch
    span = watch.whole("reader private").at
    share = IDLE_WINDOW / 60
    for name, label in (("private", "a private journald, no traffic"), ("system", "this machine's journal")):
        reader = watch.windows(f"reader {name}")
        follower = watch.windows(f"journalctl {name}")
        table.add(f"idle reader ({label}): CPU per {IDLE_WINDOW:.0f} s, utime+stime", [w.cpu for w in reader],
                  cpu_seconds, baseline=[w.cpu for w in follower], baseline_name="journalctl -f, same journal",
                  goal=f"<= {0.1 * share:.3f} s (0.1 s a minute)", test=lambda value, base: value <= 0.1 * share,
                  ratio=False)  # in clock ticks: a ratio of 0.01 s to 0 or 0.01 s means nothing
        table.add(f"idle reader ({label}): CPU per {IDLE_WINDOW:.0f} s, schedstat", [w.runtime for w in reader],
                  cpu_seconds, baseline=[w.runtime for w in follower], baseline_name="journalctl -f, same journal",
                  goal=f"<= {0.1 * share:.3f} s", test=lambda value, base: value <= 0.1 * share)
        table.add(f"idle reader ({label}): wake-ups per second", [w.voluntary / w.at for w in reader],
                  lambda value: f"{value:.2f}/s", baseline=[w.voluntary / w.at for w in follower],
                  baseline_name="journalctl -f, same journal", goal="<= 1/s",
                  test=lambda value, base: value <= 1.0)
        whole = watch.whole(f"reader {name}")
        base = watch.whole(f"journalctl {name}")
        notes.append(
            f"idle, {label}: whole {whole.at:.0f} s: reader CPU {whole.cpu:.2f} s (utime+stime), "
            f"{whole.runtime:.3f} s (schedstat), {whole.voluntary} wake-ups ({whole.involuntary} involuntary "
            f"switches), {idle.selects[name] if idle.selects[name] is not None else 'n/a (no perf)'} select calls "
            f"(perf), {idle.pings[name]} WATCHDOG=1 sent; journalctl -f: {base.cpu:.2f} s, "
            f"{base.runtime:.3f} s, {base.voluntary} wake-ups. Goals over the whole {span:.0f} s: CPU <= 0.1 s "
            f"{'met' if whole.cpu <= 0.1 and whole.runtime <= 0.1 else 'NOT met'}, wake-ups <= 1/s "
            f"{'met' if whole.voluntary <= whole.at else 'NOT met'}.")


# --- 3. relaylock --------------------------------------------------------------------------------


def spawn_time(argv: list[str], environment: dict[str, str]) -> float:
    """bench/relaylock.py's measurement: one whole process."""
    started = time.perf_counter()
    subprocess.run(argv, env=environment, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - started


def relaylock_figures(setup: Setup, reader: ReaderProcess, scratch: Path) -> dict:
    relaylock = [command("relaylock"), "-c", str(setup.config), "--"]
    granted = {"PATH": os.environ["PATH"], "REMOTE_ADDR": grant_address(STORED, 1543)}
    ungranted = {"PATH": os.environ["PATH"], "REMOTE_ADDR": UNGRANTED}
    for environment, expected in ((granted, True), (ungranted, False)):  # the measured paths really decide so
        check = subprocess.run(relaylock + ["/usr/bin/env"], env=environment, stdin=subprocess.DEVNULL,
                               capture_output=True, text=True)
        if ("RELAYCLIENT=" in check.stdout) != expected:
            raise RuntimeError(f"relaylock for {environment['REMOTE_ADDR']}: {check.stdout}{check.stderr}")
    commands = {"baseline": (["/usr/bin/python3", "-IS", "-c", "pass"], granted),
                "granted": (relaylock + ["/bin/true"], granted),
                "ungranted": (relaylock + ["/bin/true"], ungranted)}
    # Only the runs without a grant ask the reader: its accepted connections over the rounds are theirs.
    counter = SyscallCounter(reader.process.pid, {"questions": ("syscalls:sys_exit_accept4", "ret >= 0")}, scratch)
    rounds: list[dict[str, float]] = []
    counter.enable()
    for _ in range(RELAYLOCK_ROUNDS):  # the commands take turns run by run, so drift in the load hits all alike
        samples: dict[str, list[float]] = {name: [] for name in commands}
        for _ in range(RELAYLOCK_RUNS):
            for name, (argv, environment) in commands.items():
                samples[name].append(spawn_time(argv, environment))
        rounds.append({name: median(values) for name, values in samples.items()})
    counter.disable()
    return {"rounds": rounds, "questions": counter.counts()["questions"],
            "ungranted runs": RELAYLOCK_RUNS * RELAYLOCK_ROUNDS}


# --- 4. flood ------------------------------------------------------------------------------------


def paced_load(port: int, addresses: list[str], connections: int, rate: float, duration: float) -> dict:
    """`rate` requests a second spread over `connections` connections, each in lock step (a new
    request once the last was answered, as smtpd does), each on its own schedule."""
    requests = [policy_request(address) for address in addresses]
    selector = selectors.DefaultSelector()
    period = connections / rate
    start = time.perf_counter() + 0.05
    end = start + duration
    states = []
    due: list[tuple[float, int]] = []
    for index in range(connections):
        client = socket.create_connection(("127.0.0.1", port))
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        states.append({"socket": client, "sent": None, "buffer": b"", "next": start + index / rate})
        selector.register(client, selectors.EVENT_READ, index)
        heapq.heappush(due, (start + index / rate, index))
    latencies: list[float] = []
    replies: Counter = Counter()
    sent = late = 0
    outstanding = 0
    while True:
        now = time.perf_counter()
        while due and due[0][0] <= now:
            when, index = heapq.heappop(due)
            state = states[index]
            if when >= end:
                continue
            if now - when > period:
                late += 1
            state["socket"].sendall(requests[sent % len(requests)])
            state["sent"] = now
            state["next"] = when + period
            sent += 1
            outstanding += 1
        if not due and not outstanding:
            break
        if not due and now > end + 5:
            break  # replies that never came are counted as missing
        timeout = max(0.0, due[0][0] - now) if due else 0.5
        for key, _ in selector.select(timeout):
            state = states[key.data]
            data = state["socket"].recv(4096)
            if not data:
                raise RuntimeError("poplock-policy closed a connection")
            state["buffer"] += data
            while b"\n\n" in state["buffer"]:
                reply, _, state["buffer"] = state["buffer"].partition(b"\n\n")
                answered = time.perf_counter()
                replies[reply.decode()] += 1
                latencies.append(answered - state["sent"])
                outstanding -= 1
                heapq.heappush(due, (max(state["next"], answered), key.data))
    for state in states:
        state["socket"].close()
    return {"sent": sent, "answered": len(latencies), "late": late, "replies": replies, "latencies": latencies,
            "rate": len(latencies) / duration}


# The reader's questions (connections accepted on ReaderSocket=) and reads (turns of its loop, one
# select each, each reading the journal up to now).
READ_COUNTS = {"questions": ("syscalls:sys_exit_accept4", "ret >= 0"), "reads": ("syscalls:sys_enter_pselect6", None)}


def flood_run(policy: PolicyProcess, reader: ReaderProcess, scratch: Path, addresses: list[str]) -> dict:
    counter = SyscallCounter(reader.process.pid, READ_COUNTS, scratch)
    counter.enable()
    reader_before, policy_before = usage(reader.process.pid), usage(policy.process.pid)
    result = paced_load(policy.port, addresses, FLOOD_CONNECTIONS, MISS_RATE, FLOOD_SECONDS)
    reader_used, policy_used = usage(reader.process.pid) - reader_before, usage(policy.process.pid) - policy_before
    counter.disable()
    found = counter.counts()
    result.update(reader=reader_used, policy=policy_used, questions=found["questions"], reads=found["reads"])
    return result


# --- 5. throughput -------------------------------------------------------------------------------


def lockstep_load(port: int, connections: int, addresses: list[str], duration: float, results) -> None:
    """bench/policy.py's load: `connections` connections in lock step, as fast as answered."""
    requests = [policy_request(address) for address in addresses]
    selector = selectors.DefaultSelector()
    count = 0
    for index in range(connections):
        client = socket.create_connection(("127.0.0.1", port))
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        selector.register(client, selectors.EVENT_READ, [index, b""])
        client.sendall(requests[index % len(requests)])
    deadline = time.perf_counter() + duration
    while time.perf_counter() < deadline:
        for key, _ in selector.select(1):
            client, state = key.fileobj, key.data
            data = client.recv(4096)
            state[1] += data
            while b"\n\n" in state[1]:
                _, _, state[1] = state[1].partition(b"\n\n")
                count += 1
                state[0] += connections
                client.sendall(requests[state[0] % len(requests)])
    for key in list(selector.get_map().values()):
        key.fileobj.close()
    results.put(count)


class BaselineServer:
    """bench/policy.py's DUNNO-to-everything asyncio server; its port."""

    def __enter__(self) -> int:
        port = free_port()
        self.process = subprocess.Popen([sys.executable, "-c", BASELINE_SERVER, str(port)])
        wait_for_port("127.0.0.1", port)
        return port

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        self.process.wait()


def throughput(port: int, addresses: list[str]) -> float:
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    share = THROUGHPUT_CONNECTIONS // LOAD_PROCESSES
    workers = [context.Process(target=lockstep_load,
                               args=(port, share, addresses[n::LOAD_PROCESSES], THROUGHPUT_SECONDS, results))
               for n in range(LOAD_PROCESSES)]
    for worker in workers:
        worker.start()
    total = sum(results.get() for _ in workers)
    for worker in workers:
        worker.join()
    return total / THROUGHPUT_SECONDS


def mixed(misses: int, granted: int, miss_percent: int) -> list[str]:
    """Addresses, `miss_percent` % of them clients without a grant, spread evenly."""
    addresses = []
    for index in range(1000):
        if index * miss_percent // 100 != (index + 1) * miss_percent // 100:
            addresses.append(grant_address(MISSES, index % misses))
        else:
            addresses.append(grant_address(STORED, (index * 7) % granted))
    return addresses


# --- 1. fresh ------------------------------------------------------------------------------------


class JournalWatch:
    """The moment an entry can be read: the system journal (or the journal files in `directory`)
    without matches, re-read in a tight loop."""

    def __init__(self, directory: Path | None = None):
        self.reader = journal._Reader(flags=journal.LOCAL_ONLY | journal.SYSTEM) if directory is None else \
            journal._Reader(flags=0, path=str(directory))
        self.reader.seek_tail()
        self.reader._previous()

    def wait_for(self, identifier: str, text: str) -> float | None:
        """perf_counter() when an entry of `identifier` whose MESSAGE holds `text` was first read."""
        identifier_bytes, text_bytes = identifier.encode(), text.encode()
        reader = self.reader
        deadline = time.perf_counter() + READABLE_TIMEOUT
        while True:  # polled every 0.2 ms: readability is seen up to that late, so the figures err low
            while reader._next():
                try:
                    if reader._get("SYSLOG_IDENTIFIER") == identifier_bytes and text_bytes in reader._get("MESSAGE"):
                        return time.perf_counter()
                except KeyError:
                    continue
            if time.perf_counter() > deadline:
                return None
            time.sleep(0.0002)
            reader.process()  # notices a rotated or new journal file, as any follower must

    def close(self) -> None:
        self.reader.close()


class PolicyConnection:
    def __init__(self, port: int):
        self.socket = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""

    def ask(self, address: str) -> str:
        self.socket.sendall(policy_request(address))
        while b"\n\n" not in self.buffer:
            data = self.socket.recv(4096)
            if not data:
                raise RuntimeError("poplock-policy closed the connection")
            self.buffer += data
        reply, _, self.buffer = self.buffer.partition(b"\n\n")
        return reply.decode()

    def close(self) -> None:
        self.socket.close()


def fresh_block(watch: JournalWatch, connection: PolicyConnection, tag: str, first: int, trials: int,
                *, fresh: bool, network: str = FRESH) -> dict:
    """`trials` trials; fresh: a login of a client of its own (in `network`), else an entry the reader
    does not watch and a client whose grant is stored."""
    identifier = tag if fresh else tag + "-unwatched"
    planned = []
    for index in range(first, first + trials):
        address = grant_address(network, index) if fresh else grant_address(STORED, index % STORED_GRANTS)
        planned.append((address, identifier, f"rip={address}," if fresh else f"baseline entry {index} "))

    def send(address: str, identifier: str, marker: str) -> None:
        journal.send(login_line(address) if fresh else f"benchmark {marker}", SYSLOG_IDENTIFIER=identifier)

    return trial_block(watch, connection, planned, send)


def trial_block(watch: JournalWatch, connection: PolicyConnection, planned: list[tuple[str, str, str]],
                send) -> dict:
    """Trials of (address, identifier, marker): send(...) makes the entry, and the policy is asked
    for the address the moment an entry of `identifier` whose MESSAGE holds `marker` is readable."""
    delays, refused, unreadable = [], [], 0
    for address, identifier, marker in planned:
        send(address, identifier, marker)
        readable = watch.wait_for(identifier, marker)
        if readable is None:
            unreadable += 1
            continue
        reply = connection.ask(address)
        delays.append(time.perf_counter() - readable)
        if reply != "action=OK":
            refused.append((address, reply, delays[-1]))
    # A refused client: is it granted later (its login read late), or never?
    later = [(address, reply, delay, connection.ask(address) == "action=OK") for address, reply, delay in refused]
    return {"delays": delays, "refused": later, "unreadable": unreadable}


def fresh_trials(setup: Setup, reader: ReaderProcess, policy: PolicyProcess, scratch: Path):
    """The fresh blocks, the baseline blocks and, to tell what the time goes to, the same fresh trials
    with a store on tmpfs, where syncing costs nothing (a diagnosis: the goal is for the disk)."""
    tmpfs = Path("/dev/shm")
    per_block = max(1, TRIALS // BLOCKS)
    blocks: dict[str, list[dict]] = {"fresh": [], "baseline": [], "tmpfs": []}
    with contextlib.ExitStack() as stack:
        kinds = ["fresh", "baseline"]
        if tmpfs.is_dir() and os.access(tmpfs, os.W_OK):
            directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="poplock-bench-", dir=tmpfs)))
            quick = make_setup(directory / "tmpfs", unique_tag("dovecot-tmpfs"))
            stack.enter_context(ReaderProcess(quick))
            quick_policy = stack.enter_context(PolicyProcess(quick))
            quick_connection = PolicyConnection(quick_policy.port)
            stack.callback(quick_connection.close)
            kinds.append("tmpfs")
        watch = JournalWatch()
        stack.callback(watch.close)
        connection = PolicyConnection(policy.port)
        stack.callback(connection.close)
        syncs = SyscallTimes(reader.process.pid, SYNC_CALLS, scratch)
        asked = SyscallCounter(reader.process.pid, READ_COUNTS, scratch)
        asked.enable()
        for block in range(BLOCKS):
            for kind in kinds if block % 2 == 0 else kinds[::-1]:
                if kind == "tmpfs":
                    result = fresh_block(watch, quick_connection, quick.tag, block * per_block, per_block, fresh=True,
                                         network=FRESH_TMPFS)
                else:
                    result = fresh_block(watch, connection, setup.tag, block * per_block, per_block,
                                         fresh=kind == "fresh")
                blocks[kind].append(result)
        asked.disable()
        return blocks, asked.counts(), syncs.times()


# --- main ----------------------------------------------------------------------------------------


def main() -> None:
    started = time.perf_counter()
    ensure_journald()
    table = Table()
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="poplock-bench-") as scratch_name:
        scratch = Path(scratch_name)
        idle = Idle(scratch)  # first: the longest to settle
        try:
            setup = make_setup(scratch / "main", unique_tag("dovecot-fresh"))
            config = load_config(str(setup.config))
            with ReaderProcess(setup) as reader, PolicyProcess(setup) as policy, BaselineServer() as baseline_port:
                idle.start()
                print(f"  idle readers watched for {IDLE_SECONDS:.0f}s while relaylock, the flood and the "
                      f"throughput run (started in {time.perf_counter() - started:.1f}s)", flush=True)

                relaylock = relaylock_figures(setup, reader, scratch)
                print(f"  relaylock done ({time.perf_counter() - started:.0f}s)", flush=True)

                miss_addresses = [grant_address(MISSES, index) for index in range(4000)]
                hit_addresses = [grant_address(STORED, (index * 7) % STORED_GRANTS) for index in range(4000)]
                floods: dict[str, list[dict]] = {"misses": [], "granted": []}
                for pair in range(PAIRS):
                    order = ("misses", "granted") if pair % 2 == 0 else ("granted", "misses")
                    for kind in order:
                        floods[kind].append(flood_run(policy, reader, scratch, miss_addresses if kind == "misses"
                                                      else hit_addresses))
                print(f"  flood done ({time.perf_counter() - started:.0f}s)", flush=True)

                rates: dict[str, list[float]] = {"baseline": [], "granted": [], "mix": []}
                mix_reader: list[dict] = []  # the reader during the runs of mostly misses
                mix = mixed(4000, STORED_GRANTS, MISS_PERCENT)
                for pair in range(PAIRS):
                    order = ["baseline", "granted", "mix"]
                    for kind in order if pair % 2 == 0 else order[::-1]:
                        if kind == "mix":
                            counter = SyscallCounter(reader.process.pid, READ_COUNTS, scratch)
                            counter.enable()
                            before = usage(reader.process.pid)
                        port = baseline_port if kind == "baseline" else policy.port
                        addresses = mix if kind == "mix" else hit_addresses
                        rates[kind].append(throughput(port, addresses))
                        if kind == "mix":
                            used = usage(reader.process.pid) - before
                            counter.disable()
                            mix_reader.append({"reader": used, **counter.counts()})
                print(f"  throughput done ({time.perf_counter() - started:.0f}s)", flush=True)

                idle.finish()
                print(f"  idle done ({time.perf_counter() - started:.0f}s)", flush=True)

                blocks, fresh_counts, sync_times = fresh_trials(setup, reader, policy, scratch)
                print(f"  fresh trials done ({time.perf_counter() - started:.0f}s)", flush=True)
        finally:
            idle.close()

    # 1. fresh
    fresh, base = blocks["fresh"], blocks["baseline"]
    per_block = max(1, TRIALS // BLOCKS)
    all_delays = [delay for block in fresh for delay in block["delays"]]
    all_base = [delay for block in base for delay in block["delays"]]
    refusals = [refusal for block in fresh for refusal in block["refused"]]
    table.add(f"fresh login: refusals per {per_block} trials", [len(block["refused"]) for block in fresh], count,
              baseline=[len(block["refused"]) for block in base], baseline_name="stored grant, unwatched entry",
              goal="0", test=lambda value, _: value == 0)
    for label, fraction in (("p50", 0.5), ("p99", 0.99)):
        table.add(f"fresh login: entry readable -> OK {label}", [percentile(block["delays"], fraction)
                                                                 for block in fresh],
                  milliseconds, baseline=[percentile(block["delays"], fraction) for block in base],
                  baseline_name="stored grant, unwatched entry",
                  goal="p99 <= 10 ms" if label == "p99" else "",
                  test=(lambda value, _: value <= 0.010) if label == "p99" else None)
    if blocks["tmpfs"]:
        quick = blocks["tmpfs"]
        table.add("diagnosis: the same, store on tmpfs: refusals", [len(block["refused"]) for block in quick], count,
                  baseline=[len(block["refused"]) for block in base], baseline_name="stored grant, unwatched entry")
        for label, fraction in (("p50", 0.5), ("p99", 0.99)):
            table.add(f"diagnosis: the same, store on tmpfs: readable -> OK {label}",
                      [percentile(block["delays"], fraction) for block in quick], milliseconds,
                      baseline=[percentile(block["delays"], fraction) for block in fresh],
                      baseline_name="fresh login, store on disk")
    notes.append(f"fresh: {len(all_delays)} trials in {BLOCKS} blocks of {per_block}, each beside a baseline block: "
                 f"{len(refusals)} refused; over all, readable -> OK p50 {percentile(all_delays, 0.5) * 1000:.2f} ms, "
                 f"p99 {percentile(all_delays, 0.99) * 1000:.2f} ms, max {max(all_delays) * 1000:.2f} ms (baseline "
                 f"p50 {percentile(all_base, 0.5) * 1000:.2f} ms, p99 {percentile(all_base, 0.99) * 1000:.2f} ms); "
                 f"entries never readable within {READABLE_TIMEOUT:.0f} s: "
                 f"{sum(block['unreadable'] for block in fresh + base)}; ReaderWait={config.reader_wait * 1000:.0f}ms; "
                 f"the reader was asked {fresh_counts['questions'] if fresh_counts['questions'] is not None else 'n/a'}"
                 f" times and read {fresh_counts['reads'] if fresh_counts['reads'] is not None else 'n/a'} times "
                 f"during the {len(all_delays)} fresh and {len(all_base)} baseline trials.")
    notes.append("fresh, per block (refused, p50, p99, max): " + "; ".join(
        f"{len(block['refused'])}, {percentile(block['delays'], 0.5) * 1000:.1f}, "
        f"{percentile(block['delays'], 0.99) * 1000:.1f}, {max(block['delays']) * 1000:.1f} ms" for block in fresh))
    if sync_times:
        notes.append("fresh: what the reader's commits waited on during the trials (perf trace): " + "; ".join(
            f"{call} {times['calls']:.0f} calls, mean {times['mean'] * 1000:.2f} ms, max {times['max'] * 1000:.1f} ms"
            for call, times in sorted(sync_times.items())))
    if refusals:
        waited = sum(delay >= config.reader_wait for _, _, delay, _ in refusals)
        notes.append(f"fresh refusals: {waited} came after ReaderWait= (the reader had not answered in time), "
                     f"{len(refusals) - waited} sooner (the reader answered, but the login was not in the store: "
                     "read late, issue 10's hazard with matches); granted when asked again after the block: "
                     f"{sum(later for *_, later in refusals)} of {len(refusals)}.")
        notes.append("fresh refusals (address, reply, readable -> reply, OK when asked again after its block): "
                     + "; ".join(f"{address} {reply!r} {delay * 1000:.1f} ms {'yes' if later else 'no'}"
                                 for address, reply, delay, later in refusals[:20]))

    # 2. idle
    idle_rows(table, idle, notes)

    # 3. relaylock
    rounds = relaylock["rounds"]
    baseline_times = [figures["baseline"] for figures in rounds]
    table.add("relaylock, granted client", [figures["granted"] for figures in rounds], milliseconds,
              baseline=baseline_times, baseline_name="python3 -IS -c pass", goal="<= 1.3x",
              test=lambda value, base: value <= 1.3 * base)
    table.add("relaylock, no grant (asks the reader)", [figures["ungranted"] for figures in rounds], milliseconds,
              baseline=baseline_times, baseline_name="python3 -IS -c pass", goal="<= 1.6x",
              test=lambda value, base: value <= 1.6 * base)
    questions = relaylock["questions"] if relaylock["questions"] is not None else "n/a"
    notes.append(f"relaylock: {RELAYLOCK_ROUNDS} rounds of {RELAYLOCK_RUNS} runs of each, the commands taking "
                 f"turns run by run, median per round; the reader accepted {questions} questions during the "
                 f"{relaylock['ungranted runs']} runs without a grant.")

    # 4. flood
    misses, granted = floods["misses"], floods["granted"]
    table.add(f"{MISS_RATE} misses/s, {FLOOD_CONNECTIONS} connections: reader's share of a core",
              [run["reader"].share for run in misses], percent, baseline=[run["reader"].share for run in granted],
              baseline_name="same load, granted clients", goal="<= 20%", test=lambda value, _: value <= 0.20,
              ratio=False)
    table.add("... misses answered per second", [run["rate"] for run in misses], per_second,
              baseline=[run["rate"] for run in granted], baseline_name="same load, granted clients")
    table.add("... the policy's questions to the reader, per second",
              [run["questions"] / FLOOD_SECONDS if run["questions"] is not None else None for run in misses],
              per_second, baseline=[run["questions"] / FLOOD_SECONDS if run["questions"] is not None else None
                                    for run in granted], baseline_name="same load, granted clients")
    table.add("... the reader's reads (turns of its loop), per second",
              [run["reads"] / FLOOD_SECONDS if run["reads"] is not None else None for run in misses], per_second,
              baseline=[run["reads"] / FLOOD_SECONDS if run["reads"] is not None else None for run in granted],
              baseline_name="same load, granted clients", ratio=False)
    table.add("... misses per read (coalescing)",
              [run["answered"] / run["reads"] if run["reads"] else None for run in misses],
              lambda value: f"{value:.2f}")
    table.add("... miss answered p99", [percentile(run["latencies"], 0.99) for run in misses], milliseconds,
              baseline=[percentile(run["latencies"], 0.99) for run in granted],
              baseline_name="same load, granted clients")
    table.add("... poplock-policy's share of a core", [run["policy"].share for run in misses], percent,
              baseline=[run["policy"].share for run in granted], baseline_name="same load, granted clients")
    replies = Counter()
    for run in misses:
        replies.update(run["replies"])
    notes.append(f"flood: {PAIRS} pairs of {FLOOD_SECONDS:.0f} s runs; miss replies {dict(replies)}; requests sent "
                 f"late (a connection still waiting a whole period): {sum(run['late'] for run in misses)} of "
                 f"{sum(run['sent'] for run in misses)}; CPU from schedstat, counts from perf on the reader.")

    # 5. throughput
    table.add(f"policy, {THROUGHPUT_CONNECTIONS} connections, granted clients", rates["granted"], per_second,
              baseline=rates["baseline"], baseline_name="DUNNO-to-everything asyncio server",
              goal=">= 20,000/s and >= 0.4x",
              test=lambda value, base: value >= 20000 and value >= 0.4 * base)
    table.add(f"policy, {THROUGHPUT_CONNECTIONS} connections, {MISS_PERCENT}% misses (inbound mail)", rates["mix"],
              per_second, baseline=rates["baseline"], baseline_name="DUNNO-to-everything asyncio server",
              goal=">= 20,000/s and >= 0.4x",
              test=lambda value, base: value >= 20000 and value >= 0.4 * base)
    table.add(f"... {MISS_PERCENT}% misses: reader's share of a core", [run["reader"].share for run in mix_reader],
              percent)
    table.add(f"... {MISS_PERCENT}% misses: misses per read (coalescing)",
              [rate * THROUGHPUT_SECONDS * MISS_PERCENT / 100 / run["reads"] if run["reads"] else None
               for rate, run in zip(rates["mix"], mix_reader, strict=True)], lambda value: f"{value:.2f}")
    table.add(f"... {MISS_PERCENT}% misses: the reader's reads per second",
              [run["reads"] / THROUGHPUT_SECONDS if run["reads"] is not None else None for run in mix_reader],
              per_second)
    notes.append(f"throughput: {PAIRS} pairs (baseline, granted, mix; every other pair backwards) of "
                 f"{THROUGHPUT_SECONDS:.0f} s runs, bench/policy.py's load and baseline server.")
    notes.append(f"{STORED_GRANTS:,} grants stored; the whole run {time.perf_counter() - started:.0f} s; machine "
                 f"load average {os.getloadavg()[0]:.2f} at the end.")

    text, markdown = layout(table.rows)
    print("fresh decisions (issue 10): median over runs (min-max); ratio: to the baseline of the same run")
    print(text)
    for note in notes:
        print(f"  {note}")
    report = markdown + "\n\n" + "\n".join(f"- {note}" for note in notes)
    try:
        from common import report_section
    except ImportError:
        report_section = None
    if report_section is not None:
        report_section("Fresh decisions (issue 10)", report)
    elif os.environ.get("BENCH_REPORT"):
        Path(os.environ["BENCH_REPORT"]).write_text(f"## Fresh decisions (issue 10)\n\n{report}\n")


if __name__ == "__main__":
    main()
