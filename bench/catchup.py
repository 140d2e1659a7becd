"""poplock-reader's catch-up rate on a journal of 200,000 entries, 10% of them from Dovecot.

The journal is written by systemd-journal-remote into a directory D (it rotates into
several files, as a real journal does). Its entries carry the fields journald gives a
running service's syslog line (ENTRY_SHAPE=minimal: only the few login parsing reads).
Baselines: journalctl reading the same entries with the same match (`journalctl -D D
SYSLOG_IDENTIFIER=dovecot + _SYSTEMD_UNIT=dovecot.service`) as an admin runs it (its
default output, the goal's baseline), and two references on either side of it: printing
only each MESSAGE (`-o cat`, the least journalctl can do) and every field with the cursor
and the time (`-o export`, what a follower needs to know of an entry).
Measured: `poplock scan -D D` (parsing alone) and `poplock-reader --once -D D` (no saved
cursor, so every entry is read and every login committed), and as a floor for any reader in
Python, a loop of only sd_journal_next, one MESSAGE fetch and the Dovecot login pattern.

The machine is shared and noisy, so one run is not a result: ROUNDS rounds (default 9) each
run every command once, in turn (the next round backwards), and then each on a journal of
one unwatched entry, for its start-up alone. Each round's ratio compares the commands of that
round: printed are each command's median seconds (min-max), the median ratio to each baseline
(min-max), whole runs and after start-up (watched entries per second once started), and on
how many rounds the goal was met. Goal: 0.6x journalctl's default output, whole runs.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import Setup, bench_setup, command, spread, timed, verdict

from poplock.servers import DOVECOT

ENTRIES = 200_000
ROUNDS = int(os.environ.get("ROUNDS", "9"))
GOAL = 0.6
WATCHED_SHARE = 0.10
JOURNAL_REMOTE = "/lib/systemd/systemd-journal-remote"
# journalctl's output modes measured, the first being the goal's baseline.
OUTPUTS = {"short": "default output", "cat": "MESSAGE only", "export": "every field"}


# The fields journald (252) gives a syslog line from a running service, as `journalctl -o export`
# shows one of dovecot.service's: sd-journal reads an entry's fields by walking them, so how many
# there are is part of what each reader pays. ENTRY_SHAPE=minimal: only those login parsing reads.
HOST_FIELDS = ("_BOOT_ID=0000000000000000000000000000beef\n_MACHINE_ID=3bce81ca2d494101bcd88f8373d25e64\n"
               "_HOSTNAME=mail1\n_RUNTIME_SCOPE=system\n_TRANSPORT=syslog\n_GID=0\n_CAP_EFFECTIVE=1ffffffffff\n")
SERVICE_FIELDS = ("_EXE={exe}\n_CMDLINE={exe}\n_SYSTEMD_CGROUP=/system.slice/{unit}\n_SYSTEMD_UNIT={unit}\n"
                  "_SYSTEMD_SLICE=system.slice\n_SYSTEMD_INVOCATION_ID={invocation}\n")
ENTRY_SHAPE = os.environ.get("ENTRY_SHAPE", "journald")


def entry_fields(identifier: str, comm: str, pid: int, unit: str, exe: str, at: int) -> str:
    """The entry's fields but for its time and MESSAGE, in ENTRY_SHAPE."""
    own = f"SYSLOG_IDENTIFIER={identifier}\n_UID=0\n_COMM={comm}\n_PID={pid}\n"
    if ENTRY_SHAPE == "minimal":
        return "_BOOT_ID=0000000000000000000000000000beef\n" + own
    service = SERVICE_FIELDS.format(exe=exe, unit=unit, invocation=unit.encode().hex()[:32].ljust(32, "0"))
    return (f"{HOST_FIELDS}PRIORITY=6\nSYSLOG_FACILITY=2\nSYSLOG_TIMESTAMP=Dec  3 12:53:11 \n"
            f"_SOURCE_REALTIME_TIMESTAMP={at}\n{own}{service}")


def build_journal(path: Path) -> int:
    """Entries spread over the last 20 minutes (inside the grant window); returns the login count."""
    rng = random.Random(7)
    now = time.time()
    start = now - 1200
    logins = 0
    chunks = []
    for index in range(ENTRIES):
        at = int((start + index * 1200 / ENTRIES) * 1e6)
        if rng.random() < WATCHED_SHARE:
            address = f"10.{rng.randrange(4)}.{rng.randrange(256)}.{rng.randrange(1, 255)}"
            if index % 2:
                message = (f"pop3-login: Login: user=<user{index % 977}>, method=PLAIN, rip={address}, "
                           f"lip=192.0.2.1, mpid={index}, TLS, session=<b7aS8S1hfbZ/AAAF>")
                logins += 1
            else:
                message = f"pop3(user{index % 977})<{index}><b7aS8S1hfbZ/AAAF>: Disconnected: Logged out top=0/0"
            fields = entry_fields("dovecot", "log", 801, "dovecot.service", "/usr/lib/dovecot/log", at)
        else:
            message = f"CRON[{index}]: (root) CMD (run-parts /etc/cron.hourly) pass {index}"
            fields = entry_fields("CRON", "cron", index, "cron.service", "/usr/sbin/cron", at)
        chunks.append(f"__REALTIME_TIMESTAMP={at}\n__MONOTONIC_TIMESTAMP={at}\n{fields}MESSAGE={message}\n\n")
    subprocess.run([JOURNAL_REMOTE, "-o", str(path), "-"], input="".join(chunks).encode(), check=True,
                   capture_output=True)
    return logins


def build_unwatched_journal(path: Path) -> None:
    """A journal file holding one entry that no match selects."""
    at = int(time.time() * 1e6)
    entry = (f"__REALTIME_TIMESTAMP={at}\n__MONOTONIC_TIMESTAMP={at}\n_BOOT_ID=0000000000000000000000000000beef\n"
             "SYSLOG_IDENTIFIER=CRON\n_UID=0\n_COMM=cron\n_PID=1\nMESSAGE=CRON[1]: (root) CMD (true)\n\n")
    subprocess.run([JOURNAL_REMOTE, "-o", str(path), "-"], input=entry.encode(), check=True, capture_output=True)


# The least a reader in Python does: step through the matching entries (sd_journal_next), fetch
# each one's MESSAGE and try the Dovecot login pattern on it. What poplock adds is what it costs
# beyond this: trust, sessions, the store, its imports.
FLOOR = """
import re, sys
sys.path.append("/usr/lib/python3/dist-packages")
from systemd import _reader
reader = _reader._Reader(flags=0, path=sys.argv[1])
for match in sys.argv[3:]:
    reader.add_match(match)
    reader.add_disjunction()
pattern, found = re.compile(sys.argv[2]), 0
while reader._next():
    if pattern.fullmatch(reader._get("MESSAGE").decode("utf-8", "replace")):
        found += 1
print(found)
"""


def fresh_reader_run(setup: Setup, journal: Path) -> float:
    """poplock-reader --once on the journal in `journal`, with no store or cursor yet: every
    entry is read and every login committed (on a journal of no login: its start-up alone)."""
    for path in (setup.store, setup.cursor):
        path.unlink(missing_ok=True)
    return timed([command("poplock-reader"), "-c", str(setup.config), "--once", "-D", str(journal)],
                 stderr=subprocess.DEVNULL)


def commands(setup: Setup, match: list[str]) -> dict[str, object]:
    """What each row runs, given the journal directory."""
    runs = {f"journalctl -o {output} ({what})":
            (lambda journal, output=output: timed(["journalctl", "-D", str(journal), *match, "-o", output],
                                                  stderr=subprocess.DEVNULL))
            for output, what in OUTPUTS.items()}
    runs["python floor (next, MESSAGE, regex)"] = lambda journal: timed(
        [sys.executable, "-IS", "-c", FLOOR, str(journal), DOVECOT.patterns[0], *match[::2]], stderr=subprocess.DEVNULL)
    runs["poplock scan (parsing alone)"] = lambda journal: timed(
        [command("poplock"), "-c", str(setup.config), "scan", "-D", str(journal)], stderr=subprocess.DEVNULL)
    runs["poplock-reader --once (grants written)"] = lambda journal: fresh_reader_run(setup, journal)
    return runs


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="poplock-bench-") as scratch:
        directory = Path(scratch)
        journal = directory / "journal"
        journal.mkdir()
        logins = build_journal(journal / "bench.journal")
        match = ["SYSLOG_IDENTIFIER=dovecot", "+", "_SYSTEMD_UNIT=dovecot.service"]
        watched = int(subprocess.run(["journalctl", "-D", str(journal), *match, "-o", "cat"],
                                     capture_output=True, check=True).stdout.count(b"\n"))
        setup = bench_setup(directory)
        # Start-up alone: a journal of one unwatched entry. Not an empty directory: poplock-reader
        # refuses to build a store from a journal it cannot open at all.
        empty = directory / "empty"
        empty.mkdir()
        build_unwatched_journal(empty / "empty.journal")
        runs = commands(setup, match)
        names = list(runs)
        whole: dict[str, list[float]] = {name: [] for name in names}
        started: dict[str, list[float]] = {name: [] for name in names}
        for round_number in range(ROUNDS):
            order = names if round_number % 2 == 0 else names[::-1]
            for name in order:
                whole[name].append(runs[name](journal))
            for name in order:
                started[name].append(runs[name](empty))
        fresh_reader_run(setup, journal)
        granted = setup.run("show").stdout.count("\n") - 1

    print(f"catch-up on {ENTRIES} entries ({ENTRY_SHAPE} fields), {watched} from the watched source ({logins} logins, "
          f"{granted} addresses); "
          f"{ROUNDS} rounds, each command once per round, in turn (every other round backwards)")
    rates = {name: [watched / max(seconds - fixed, 1e-6) for seconds, fixed in zip(whole[name], started[name],
                                                                                   strict=True)]
             for name in names}
    baselines = names[:len(OUTPUTS)]
    versus = "".join(f"{'vs ' + output:>22}" for output in OUTPUTS)
    print(f"  {'':42} {'whole run':>24}{versus}   {'after start-up':>22}{versus}")
    for name in names:
        ratios = "".join(f"{ratio_spread(whole[base], whole[name]):>22}" for base in baselines)
        steady = "".join(f"{ratio_spread(rates[name], rates[base]):>22}" for base in baselines)
        print(f"  {name:42} {spread(whole[name], seconds):>24}{ratios}   "
              f"{spread(rates[name], per_second):>22}{steady}")
    reader, baseline = whole[names[-1]], whole[baselines[0]]
    passed = [base / own >= GOAL for base, own in zip(baseline, reader, strict=True)]
    print(f"  goal: poplock-reader --once >= {GOAL}x journalctl's default output, whole runs: {verdict(passed)}")
    steady_passed = [own / base >= GOAL for base, own in zip(rates[baselines[0]], rates[names[-1]], strict=True)]
    print(f"  (after start-up: {verdict(steady_passed)}; start-up alone: "
          + ", ".join(f"{name.split(' (')[0]} {spread(started[name], seconds)}" for name in names) + ")")


def ratio_spread(numerators: list[float], denominators: list[float]) -> str:
    """The median (min-max) over the rounds of each round's ratio."""
    return spread([top / bottom for top, bottom in zip(numerators, denominators, strict=True)],
                  lambda value: f"{value:.2f}x")


def seconds(value: float) -> str:
    return f"{value:.3f}s"


def per_second(value: float) -> str:
    return f"{value:,.0f} e/s"


if __name__ == "__main__":
    main()
