"""What the number of stored grants costs: 5,000, 100,000 and 1,000,000 side by side.

Each store is filled once with `poplock import --no-journal` (the bulk path: one
transaction, merged into a base), every tenth grant expiring a few seconds after the import
so that `poplock expire` has a tenth of the store to purge. A second copy of each also holds
MERGE_AFTER - 2 x LOGINS grants in its top (a top near the end of its cycle), so that the
reader's logins push it over MERGE_AFTER and a merge into a new base runs in a child
process while logins go on. Store files are never changed once published, so every run
starts from hard links to them, in a directory of its own, and leaves the originals as
they were.

The machine is shared and noisy, so one run is not a result: each of ROUNDS rounds runs
each measurement on every store in turn (5k 100k 1M, the next round 1M 100k 5k), so that
the runs compared are close in time, and each figure is compared with the first store's
in the same round. Printed: each figure's median over the rounds (min-max), the median
ratio to the first store (min-max), and each goal checked on every round. Measured:
  * one login's commit by a new writer process running the reader's own code
    (commitprobe.py): the first commit of the process (a restarted reader) and the warm
    ones after it; the bytes each makes the process write (/proc/PID/io write_bytes, the
    cursor file's page included) and the top's size; the data and directory syncs of a
    commit, counted with strace (fsync, fdatasync, msync, sync_file_range, syncfs);
  * login -> grant on a real journald (latency.py's method): a poplock-reader follows the
    journal; logins are sent one at a time and `poplock check`'s function is polled until
    it says yes (a refusal asks the reader on its ReaderSocket= to read up to now); the
    logins sent while no merge runs, and those while one does; journald's own delay (an
    entry readable at all) as the baseline;
  * the reader's peak RSS (VmHWM in /proc/PID/status) after those logins and the merge,
    then after BURST more logins sent at once (a merge cycle's worth of base lookups), and
    the peak of the merge's child process (sampled every few milliseconds);
  * `poplock show` (first grant line, whole listing), `poplock expire` (a tenth purged),
    `poplock add`, `remove` and `check` (whole processes, start-up included).

Environment: STORED_GRANTS (default 5000,100000,1000000; the first is the baseline),
ROUNDS (5), SCALE_LOGINS (300: logins before the merge, per reader run).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import (
    REPOSITORY,
    Setup,
    bench_setup,
    command,
    grant_address,
    import_grants,
    layout,
    median,
    percentile,
    report_section,
    spread,
    verdict,
    write_grant_file,
)
from latency import journal_delivery, login_delay, login_line
from support.journald import ensure_journald, unique_tag
from support.poplock import ReaderProcess
from systemd import journal

from poplock.access import check_relay_in_files
from poplock.config import load_config
from poplock.store import open_snapshot
from poplock.storewriter import MERGE_AFTER

SIZES = [int(size) for size in os.environ.get("STORED_GRANTS", "5000,100000,1000000").split(",")]
ROUNDS = int(os.environ.get("ROUNDS", "5"))
LOGINS = int(os.environ.get("SCALE_LOGINS", "300"))  # per reader run, before its merge starts
LOGINS_AFTER_MERGE = 20
BURST = MERGE_AFTER // 2  # logins at once after the merge: a merge cycle's worth (a grant and a user entry each)
MERGE_TIMEOUT = 90.0  # seconds of logins, at most, waiting for the merge to be published
PROBE_COMMITS = 30
CLI_RUNS = 3  # of each of add, remove and check, per store and round
EXPIRING_EVERY = 10  # one grant in ten expires soon after the import
EXPIRING_AFTER = 15.0  # seconds from writing the import file; `poplock import` leaves out what expired already

STORED = "10"  # the stored grants' addresses: 10.0.0.0 on
TOP = "172.16"  # the grants that fill the top
LOGGED_IN = "10.240"  # the reader's logins
BURST_NETWORK = "10.241"  # the reader's logins at once
ADDED = "10.250"  # `poplock add`
SYNC_CALLS = ("fsync", "fdatasync", "msync", "sync_file_range", "syncfs", "sync")

KIB, MIB = 1024, 1024 * 1024


# --- stores ------------------------------------------------------------------------------------


def store_files(setup: Setup) -> list[Path]:
    """The files that make up the published store (the top and its bases), not the lock."""
    return [path for path in setup.directory.iterdir() if path.name == setup.store.name
            or path.name.startswith(setup.store.name + ".base-") and not path.name.endswith(".new")]


def copy_store(source: Setup, directory: Path, tag: str) -> Setup:
    """A setup of its own (its journal identifier `tag`) over hard links to the source's store files."""
    directory.mkdir()
    setup = bench_setup(directory, extra=f"\n[Source:dovecot]\nIdentifiers={tag}\n")
    for path in store_files(source):
        os.link(path, directory / path.name)
    return setup


def base_name(setup: Setup) -> str | None:
    snapshot = open_snapshot(str(setup.store), busy_timeout=1.0)
    try:
        return snapshot.base_name if snapshot is not None else None
    finally:
        if snapshot is not None:
            snapshot.close()


class Store:
    """One size: the store as imported, and a copy whose top is nearly due for a merge."""

    def __init__(self, scratch: Path, size: int):
        self.size = size
        for name in (f"store-{size}", f"store-{size}-full"):
            (scratch / name).mkdir()
        self.fresh = bench_setup(scratch / f"store-{size}")
        self.full = bench_setup(scratch / f"store-{size}-full")
        self.import_seconds = self.top_seconds = 0.0
        self.expiring_until = 0.0

    def fill(self) -> None:
        path = self.fresh.directory / "grants.txt"
        started = time.time()
        self.expiring_until = started + EXPIRING_AFTER
        write_grant_file(path, STORED, self.size, lambda index: self.expiring_until if index % EXPIRING_EVERY == 0
                         else started + 6 * 3600)
        self.import_seconds = import_grants(self.fresh, path)
        path.unlink()
        for source in store_files(self.fresh):
            os.link(source, self.full.directory / source.name)
        path = self.full.directory / "top.txt"
        write_grant_file(path, TOP, top_fill(), lambda index: started + 6 * 3600)
        self.top_seconds = import_grants(self.full, path)
        path.unlink()
        if base_name(self.full) != base_name(self.fresh):
            raise RuntimeError(f"filling the top of the {self.size}-grant store merged it into a new base")

    def address(self, index: int) -> str:
        """The index-th of the stored grants that stay live (not of the expiring tenth), from the middle on."""
        return grant_address(STORED, (self.size // 2 + index * EXPIRING_EVERY) % self.size // EXPIRING_EVERY
                             * EXPIRING_EVERY + 1)


def top_fill() -> int:
    """Grants in the full top: LOGINS logins (a grant and a user-index entry each) make it due."""
    return max(0, MERGE_AFTER - 2 * LOGINS)


# --- measurements ------------------------------------------------------------------------------


def probe_commits(setup: Setup, count: int) -> dict:
    result = subprocess.run([sys.executable, str(REPOSITORY / "bench" / "commitprobe.py"), str(setup.config),
                             str(count), LOGGED_IN], capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"commitprobe.py failed:\n{result.stderr}")
    return json.loads(result.stdout)


def commit_figures(setup: Setup, prefix: str) -> dict:
    probe = probe_commits(setup, PROBE_COMMITS)
    return {f"{prefix} first": probe["seconds"][0], f"{prefix} warm": median(probe["seconds"][1:]),
            f"{prefix} written first": probe["written"][0], f"{prefix} written": median(probe["written"][1:]),
            f"{prefix} top size": probe["top"]}


def count_syncs(setup: Setup, log: Path) -> dict:
    """Data and directory syncs of the first commit of a writer process and of the warm ones after it,
    from strace's log of commitprobe.py (its access(2) markers split the commits). An msync is
    charged to the file mapped there (the mmap calls name it); syncs of a file in memory (a memfd,
    where gdbm writes a new top) reach no disk and are listed but not counted."""
    subprocess.run(["strace", "-f", "-qq", "-y", "-o", str(log), "-e",
                    "trace=" + ",".join(SYNC_CALLS + ("mmap", "access", "faccessat", "faccessat2")),
                    sys.executable, str(REPOSITORY / "bench" / "commitprobe.py"), str(setup.config), "4", LOGGED_IN],
                   check=True, capture_output=True, timeout=300)
    commits: list[dict] = []
    mapped: dict[str, str] = {}  # address -> the file mapped there
    for line in log.read_text().splitlines():
        if "/poplock-bench-commit-" in line:
            commits.append({"data": 0, "directory": 0, "calls": []})
            continue
        mapping = re.match(r"\d+\s+mmap\(.*?, \d+<([^>]*)>(?:\(deleted\))?, \w+\) = (0x[0-9a-f]+)", line)
        if mapping:
            mapped[mapping.group(2)] = mapping.group(1)
            continue
        call = re.match(r"\d+\s+(\w+)\((.*)", line)
        if not commits or call is None or call.group(1) not in SYNC_CALLS:
            continue
        name, arguments = call.groups()
        target = re.match(r"\d+<([^>]*)>", arguments)
        address = re.match(r"(0x[0-9a-f]+),", arguments)
        path = target.group(1) if target else mapped.get(address.group(1), "") if address else ""
        if path.startswith("/memfd:"):
            commits[-1]["calls"].append(f"{name}(in memory)")
            continue
        is_directory = bool(path) and os.path.isdir(path)
        commits[-1]["directory" if is_directory else "data"] += 1
        what = "directory" if is_directory else os.path.basename(path) if path else "mapping"
        commits[-1]["calls"].append(f"{name}({what})")
    commits = commits[:-1]  # the last marker ends the last commit
    return {"first": commits[0], "warm": commits[1:]}


def show_figures(setup: Setup) -> dict:
    started = time.perf_counter()
    process = subprocess.Popen([command("poplock"), "-c", str(setup.config), "show"], stdout=subprocess.PIPE)
    header = process.stdout.readline()
    first = process.stdout.readline()
    first_at = time.perf_counter() - started
    lines = 2 if first else 1 if header else 0
    while chunk := process.stdout.read(1 << 16):
        lines += chunk.count(b"\n")
    if process.wait() != 0:
        raise RuntimeError("poplock show failed")
    return {"show first": first_at, "show total": time.perf_counter() - started, "show lines": lines - 1}


def run_cli(setup: Setup, *arguments: str, expect: int = 0) -> float:
    started = time.perf_counter()
    result = setup.run(*arguments)
    seconds = time.perf_counter() - started
    if result.returncode != expect:
        raise RuntimeError(f"poplock {' '.join(arguments)}: exit status {result.returncode}\n{result.stderr}")
    return seconds


def cli_figures(setup: Setup, store: Store, round_number: int) -> dict:
    checks, adds, removes = [], [], []
    for run in range(CLI_RUNS):
        index = round_number * CLI_RUNS + run
        checks.append(run_cli(setup, "check", store.address(2 * index)))
        adds.append(run_cli(setup, "add", grant_address(ADDED, index)))
        removes.append(run_cli(setup, "remove", store.address(2 * index + 1)))
    return {"check": median(checks), "add": median(adds), "remove": median(removes)}


def expire_figures(setup: Setup) -> dict:
    started = time.perf_counter()
    result = subprocess.run([command("poplock"), "-c", str(setup.config), "expire"], capture_output=True, text=True,
                            timeout=600)
    seconds = time.perf_counter() - started
    found = re.search(r"purged (\d+) expired grants?", result.stdout)
    if result.returncode != 0 or found is None:
        raise RuntimeError(f"poplock expire failed: {result.stdout}{result.stderr}")
    return {"expire": seconds, "expired": int(found.group(1))}


def memory_status(pid: int) -> dict[str, int]:
    """VmHWM, VmRSS, RssAnon and RssFile of a process, in bytes (empty once it has gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    fields = re.findall(r"^(VmHWM|VmRSS|RssAnon|RssFile):\s+(\d+) kB", text, re.M)
    return {name: int(value) * KIB for name, value in fields}


class ChildWatch(threading.Thread):
    """Samples a process's children every few milliseconds: when each was seen, and its peak RSS."""

    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid = pid
        self.seen: dict[int, list[float]] = {}  # child pid -> [first seen, last seen]
        self.peak = 0
        self.done = threading.Event()

    def run(self) -> None:
        children = Path(f"/proc/{self.pid}/task/{self.pid}/children")
        while not self.done.wait(0.003):
            try:
                pids = [int(pid) for pid in children.read_text().split()]
            except OSError:
                return
            now = time.perf_counter()
            for pid in pids:
                status = memory_status(pid)
                if status:
                    self.seen.setdefault(pid, [now, now])[1] = now
                    self.peak = max(self.peak, status.get("VmHWM", 0))

    def stop(self) -> None:
        self.done.set()
        self.join()


def wait_until_allowed(config, address: str, timeout: float) -> None:
    deadline = time.perf_counter() + timeout
    while not check_relay_in_files(config, address, time.time()).allowed:
        if time.perf_counter() > deadline:
            raise RuntimeError(f"{address} may not relay {timeout:.0f}s after its login was sent")
        time.sleep(0.001)


def reader_figures(store: Store, directory: Path, tag: str) -> dict:
    """Logins through a real journald to a following poplock-reader whose top is due for a merge:
    one at a time until the merge is published and LOGINS_AFTER_MERGE more, then BURST at once."""
    setup = copy_store(store.full, directory, tag)
    config = load_config(str(setup.config))
    readable = journal_delivery(tag + "-readable", notified=False, logins=50)
    base_before = base_name(setup)
    logins: list[tuple[float, float]] = []
    merged_at = None
    with ReaderProcess(setup) as reader:
        watch = ChildWatch(reader.process.pid)
        watch.start()
        deadline = time.perf_counter() + MERGE_TIMEOUT
        try:
            while True:
                logins.append(login_delay(tag, config, grant_address(LOGGED_IN, len(logins))))
                if merged_at is None and base_name(setup) != base_before:
                    merged_at = time.perf_counter()
                if merged_at is not None and sum(sent > merged_at for sent, _ in logins) >= LOGINS_AFTER_MERGE:
                    break
                if merged_at is None and time.perf_counter() > deadline:
                    break
            after_merge = memory_status(reader.process.pid)
            merge_peak = watch.peak
            # A merge cycle's worth of logins at once: each looks its address (and its user) up in the base.
            burst_started = time.perf_counter()
            for index in range(BURST):
                journal.send(login_line(grant_address(BURST_NETWORK, index)), SYSLOG_IDENTIFIER=tag)
            wait_until_allowed(config, grant_address(BURST_NETWORK, BURST - 1), 120)
            burst_seconds = time.perf_counter() - burst_started
            deadline = time.perf_counter() + 30
            while any(now_seen[1] > time.perf_counter() - 0.05 for now_seen in watch.seen.values()) and \
                    time.perf_counter() < deadline:
                time.sleep(0.02)  # a merge the burst started: let it finish, the parent's part included
            after_burst = memory_status(reader.process.pid)
        finally:
            watch.stop()
    merge = min(watch.seen.values(), default=None)
    quiet, during = [], []
    for sent, allowed in logins:
        overlaps = merge is not None and merged_at is not None and sent <= merged_at and allowed >= merge[0]
        (during if overlaps else quiet).append(allowed - sent)
    return {"readable p99": percentile(readable, 0.99),
            "login p50": median(quiet), "login p99": percentile(quiet, 0.99), "quiet logins": len(quiet),
            "merge login p50": median(during) if during else None,
            "merge login p99": percentile(during, 0.99) if during else None, "merge logins": len(during),
            "merged": merged_at is not None, "merge seconds": merge[1] - merge[0] if merge else None,
            "reader peak": after_merge.get("VmHWM"), "merge child peak": merge_peak or None,
            "burst seconds": burst_seconds, "burst peak": after_burst.get("VmHWM"),
            "burst anonymous": after_burst.get("RssAnon"), "burst file": after_burst.get("RssFile")}


class Places:
    """Fresh directories for the runs, under the scratch directory."""

    def __init__(self, scratch: Path):
        self.scratch = scratch
        self.count = 0

    def __call__(self) -> Path:
        self.count += 1
        return self.scratch / f"run-{self.count}"


def reader_phase(store: Store, place: Places, round_number: int) -> dict:
    journal_delivery(unique_tag("dovecot-bench-drain"), notified=False, logins=1)  # journald is done with the last
    directory = place()
    try:
        return reader_figures(store, directory, unique_tag("dovecot-bench"))
    finally:
        shutil.rmtree(directory)


def commit_phase(store: Store, place: Places, round_number: int) -> dict:
    figures = {}
    for variant, prefix in ((store.fresh, "commit"), (store.full, "full commit")):
        setup = copy_store(variant, place(), unique_tag("dovecot-bench"))
        figures.update(commit_figures(setup, prefix))
        shutil.rmtree(setup.directory)
    return figures


def show_phase(store: Store, place: Places, round_number: int) -> dict:
    return show_figures(store.fresh)  # it writes nothing


def cli_phase(store: Store, place: Places, round_number: int) -> dict:
    setup = copy_store(store.fresh, place(), unique_tag("dovecot-bench"))
    try:
        return cli_figures(setup, store, round_number)
    finally:
        shutil.rmtree(setup.directory)


def expire_phase(store: Store, place: Places, round_number: int) -> dict:
    setup = copy_store(store.fresh, place(), unique_tag("dovecot-bench"))
    try:
        return expire_figures(setup)
    finally:
        shutil.rmtree(setup.directory)


# Each round runs each phase on every store in turn, so that the runs compared are minutes apart
# at most. The reader first: `expire` journals every grant it purges, which keeps journald busy.
PHASES = [reader_phase, commit_phase, show_phase, cli_phase, expire_phase]


# --- the table ---------------------------------------------------------------------------------


def milliseconds(value: float) -> str:
    return f"{value * 1000:.1f} ms" if value < 10 else f"{value:.0f} s"


def seconds(value: float) -> str:
    return f"{value:.2f} s"


def size_in_bytes(value: float) -> str:
    return f"{value / KIB:.0f} KiB" if value < MIB else f"{value / MIB:.1f} MiB"


# (figure key, row label, format, whether it is compared with the first store)
ROWS = [
    ("commit warm", "commit, warm writer", milliseconds, True),
    ("commit first", "commit, first of a new process", milliseconds, True),
    ("full commit warm", f"commit, warm, top of {top_fill()}", milliseconds, True),
    ("full commit first", f"commit, first of process, top of {top_fill()}", milliseconds, True),
    ("commit written", "written per warm commit (write_bytes)", size_in_bytes, False),
    ("commit written first", "written by the first commit", size_in_bytes, False),
    ("full commit written", f"written per warm commit, top of {top_fill()}", size_in_bytes, False),
    ("commit top size", "the top's size after the commits", size_in_bytes, False),
    ("full commit top size", f"the top's size, top of {top_fill()}", size_in_bytes, False),
    ("login p50", "login -> grant p50, no merge running", milliseconds, True),
    ("login p99", "login -> grant p99, no merge running", milliseconds, True),
    ("merge login p50", "login -> grant p50, during a merge", milliseconds, True),
    ("merge login p99", "login -> grant p99, during a merge", milliseconds, True),
    ("merge logins", "logins sent during the merge", lambda count: f"{count:.0f}", False),
    ("merge seconds", "the merge's child lived (as sampled)", seconds, False),
    ("readable p99", "journald: entry readable p99 (baseline)", milliseconds, True),
    ("reader peak", "reader peak RSS (VmHWM), after its merge", size_in_bytes, True),
    ("merge child peak", "merge child's peak RSS (VmHWM)", size_in_bytes, False),
    ("burst seconds", f"{BURST} logins at once: until the last may relay", seconds, True),
    ("burst peak", f"reader peak RSS, after {BURST} more logins", size_in_bytes, True),
    ("burst anonymous", "of its RSS then: anonymous (RssAnon)", size_in_bytes, True),
    ("burst file", "of its RSS then: mapped files (RssFile)", size_in_bytes, True),
    ("show first", "show: first grant line", seconds, True),
    ("show total", "show: whole listing", seconds, True),
    ("expire", "expire (a tenth purged)", seconds, True),
    ("add", "poplock add", milliseconds, True),
    ("remove", "poplock remove", milliseconds, True),
    ("check", "poplock check", milliseconds, True),
]

# (goal, figure key, test on one run: (this store's figure, the first store's) -> bool, sizes it applies to)
GOALS = [
    ("one login's commit, warm, within 2x of the first store's", "commit warm",
     lambda value, base: value <= 2 * base, "others"),
    ("one login's commit, first of a new process, within 2x", "commit first",
     lambda value, base: value <= 2 * base, "others"),
    (f"the same two with a top of {top_fill()}: warm within 2x", "full commit warm",
     lambda value, base: value <= 2 * base, "others"),
    (f"... first of a new process within 2x, top of {top_fill()}", "full commit first",
     lambda value, base: value <= 2 * base, "others"),
    ("<= 1 MiB written per one-login commit (warm)", "commit written", lambda value, base: value <= MIB, "all"),
    ("<= 1 MiB written by the first commit of a process", "commit written first",
     lambda value, base: value <= MIB, "all"),
    (f"<= 1 MiB written per commit, top of {top_fill()}", "full commit written",
     lambda value, base: value <= MIB, "all"),
    ("login -> grant p99 <= 20 ms, no merge running", "login p99", lambda value, base: value <= 0.020, "all"),
    ("login -> grant p99 <= 20 ms, during a merge", "merge login p99", lambda value, base: value <= 0.020, "all"),
    ("reader peak RSS <= 100 MiB, after its merge", "reader peak", lambda value, base: value <= 100 * MIB, "all"),
    (f"reader peak RSS <= 100 MiB, after {BURST} more logins", "burst peak", lambda value, base: value <= 100 * MIB,
     "all"),
    ("show: first grant line within 0.5 s", "show first", lambda value, base: value <= 0.5, "all"),
    ("show lists a million in <= 5 s", "show total", lambda value, base: value <= 5.0, "largest"),
    ("expire purges a tenth of a million in <= 5 s", "expire", lambda value, base: value <= 5.0, "largest"),
    ("poplock add within 2x", "add", lambda value, base: value <= 2 * base, "others"),
    ("poplock remove within 2x", "remove", lambda value, base: value <= 2 * base, "others"),
    ("poplock check within 2x", "check", lambda value, base: value <= 2 * base, "others"),
]


def build_tables(results: dict[int, list[dict]], stores: dict[int, Store], syncs: dict[int, dict]):
    """The figures and the goals, each as (text, Markdown)."""
    baseline = SIZES[0]
    figures = [["figure"] + [f"{size:,} grants" for size in SIZES] + [f"{size:,} / {baseline:,}" for size in SIZES[1:]]]
    for key, label, show, compared in ROWS:
        cells = [label]
        for size in SIZES:
            values = [run[key] for run in results[size] if run.get(key) is not None]
            cells.append(spread(values, show) if values else "n/a")
        for size in SIZES[1:]:
            ratios = [mine[key] / base[key] for mine, base in zip(results[size], results[baseline], strict=True)
                      if compared and mine.get(key) is not None and base.get(key)]
            cells.append(spread(ratios, lambda ratio: f"{ratio:.2f}x") if ratios else "")
        figures.append(cells)
    figures.append(["imported in (once)"] + [seconds(stores[size].import_seconds) for size in SIZES]
                   + [""] * (len(SIZES) - 1))
    figures.append([f"{top_fill()} more imported into a copy's top (once)"]
                   + [seconds(stores[size].top_seconds) for size in SIZES] + [""] * (len(SIZES) - 1))
    for when in ("first", "warm"):
        figures.append([f"syncs per commit, {when} (data + directory)"]
                       + [", ".join(sorted({f"{commit['data']} + {commit['directory']}" for commit in
                                            (syncs[size]["warm"] if when == "warm" else [syncs[size]["first"]])}))
                          for size in SIZES] + [""] * (len(SIZES) - 1))
    goals = [["goal"] + [f"{size:,} grants" for size in SIZES]]
    for text, key, test, applies in GOALS:
        cells = [text]
        for size in SIZES:
            if applies == "others" and size == baseline or applies == "largest" and size != SIZES[-1]:
                cells.append("")
                continue
            cells.append(verdict([test(mine[key], base[key]) for mine, base in
                                  zip(results[size], results[baseline], strict=True)
                                  if mine.get(key) is not None and base.get(key) is not None]))
        goals.append(cells)
    goals.append(["<= 1 data sync and 1 directory sync per commit"]
                 + [verdict([commit["data"] <= 1 and commit["directory"] <= 1
                             for commit in [syncs[size]["first"], *syncs[size]["warm"]]]) for size in SIZES])
    return layout(figures), layout(goals)


def main() -> None:
    if len(SIZES) < 2:
        raise SystemExit("STORED_GRANTS names at least two sizes: the baseline first")
    if max(SIZES) >= 240 * 65536:
        raise SystemExit(f"STORED_GRANTS: at most {240 * 65536 - 1} grants")
    started = time.perf_counter()
    ensure_journald()
    with tempfile.TemporaryDirectory(prefix="poplock-bench-") as scratch_name:
        scratch = Path(scratch_name)
        stores = {size: Store(scratch, size) for size in SIZES}
        for store in stores.values():
            store.fill()
            print(f"  filled {store.size:,} grants in {store.import_seconds:.1f}s (+{top_fill()} in a copy's top "
                  f"in {store.top_seconds:.1f}s)", flush=True)
        syncs = {}
        for size, store in stores.items():
            setup = copy_store(store.fresh, scratch / f"syncs-{size}", unique_tag("dovecot-bench"))
            syncs[size] = count_syncs(setup, scratch / f"strace-{size}.log")
            shutil.rmtree(setup.directory)
        # Every tenth grant expired: `expire` has them to purge, and every round sees the same stores.
        time.sleep(max(0.0, max(store.expiring_until for store in stores.values()) + 1 - time.time()))
        results: dict[int, list[dict]] = {size: [] for size in SIZES}
        place = Places(scratch)
        for round_number in range(ROUNDS):
            order = SIZES if round_number % 2 == 0 else SIZES[::-1]
            figures = {size: {} for size in SIZES}
            for phase in PHASES:
                for size in order:
                    figures[size].update(phase(stores[size], place, round_number))
            for size in SIZES:
                results[size].append(figures[size])
            print(f"  round {round_number + 1} of {ROUNDS} done ({time.perf_counter() - started:.0f}s)", flush=True)
    (text, markdown), (goals_text, goals_markdown) = build_tables(results, stores, syncs)
    merges = {size: sum(figures["merged"] for figures in results[size]) for size in SIZES}
    expired = {size: sorted({figures["expired"] for figures in results[size]}) for size in SIZES}
    shown = {size: sorted({figures["show lines"] for figures in results[size]}) for size in SIZES}
    notes = [
        f"{ROUNDS} rounds, each measurement run on every store in turn ({', '.join(f'{size:,}' for size in SIZES)}, "
        "the next round backwards); each figure: median (min-max) over the rounds; ratios: to the first store in "
        "the same round.",
        f"the top-of-{top_fill()} commits and the reader runs are on a copy with {top_fill()} more grants in its top "
        f"(the {SIZES[0]:,} store then holds {SIZES[0] + top_fill():,}).",
        f"commits: commitprobe.py, the reader's code in a new process; warm = median of {PROBE_COMMITS - 1}; "
        "write_bytes counts the cursor file's page too.",
        f"logins: {LOGINS} to bring the top to {MERGE_AFTER} entries, then on through the merge and "
        f"{LOGINS_AFTER_MERGE} after it; a merge was published in "
        + ", ".join(f"{merges[size]} of {ROUNDS} runs at {size:,}" for size in SIZES) + ".",
        "expired grants purged per run: " + ", ".join(f"{size:,}: {expired[size]}" for size in SIZES)
        + "; grants `show` listed: " + ", ".join(f"{size:,}: {shown[size]}" for size in SIZES) + ".",
        "syncs counted with strace on commitprobe.py: "
        + "; ".join(f"{size:,}: first {' '.join(syncs[size]['first']['calls'])}" for size in SIZES[-1:]) + ".",
        f"the store files were in the page cache (a shared machine: no cache dropped); whole run "
        f"{time.perf_counter() - started:.0f}s.",
    ]
    print(f"grants stored: {', '.join(f'{size:,}' for size in SIZES)} (every tenth expired)")
    print(text)
    print("goals (each checked on every run; ratios against the first store in the same round)")
    print(goals_text)
    for note in notes:
        print(f"  {note}")
    report_section("Stored grants: " + ", ".join(f"{size:,}" for size in SIZES),
                   markdown + "\n\n" + goals_markdown + "\n\n" + "\n".join(f"- {note}" for note in notes))


if __name__ == "__main__":
    main()
