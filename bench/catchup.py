"""poplock-reader's catch-up rate on a journal of 200,000 entries, 10% of them from Dovecot.

The journal is written by systemd-journal-remote into a directory D (it rotates into
several files, as a real journal does). Baselines, measured in the same run: journalctl
reading the same entries with the same match
(`journalctl -D D SYSLOG_IDENTIFIER=dovecot + _SYSTEMD_UNIT=dovecot.service`) as an
admin runs it (its default output), and two references on either side of it: printing
only each MESSAGE (`-o cat`, the least journalctl can do) and printing every field with
the cursor and the time (`-o export`, what a follower needs to know about an entry).
Printed: watched entries per second, whole runs and after start-up (each command's
start-up measured on an empty journal), and the ratios to each baseline, for parsing
alone (`poplock scan -D D`) and with the grants written (`poplock-reader --once -D D`,
no saved cursor, so every entry is read and every login committed).
Goal: 0.5x journalctl or better.
"""

from __future__ import annotations

import random
import subprocess
import tempfile
import time
from pathlib import Path

from common import Setup, bench_setup, best_of, command, timed

ENTRIES = 200_000
WATCHED_SHARE = 0.10
JOURNAL_REMOTE = "/lib/systemd/systemd-journal-remote"
# journalctl's output modes measured, the first being the goal's baseline.
OUTPUTS = {"short": "default output", "cat": "MESSAGE only", "export": "every field"}


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
            fields = "SYSLOG_IDENTIFIER=dovecot\n_UID=0\n_COMM=log\n_PID=801\n"
        else:
            message = f"CRON[{index}]: (root) CMD (run-parts /etc/cron.hourly) pass {index}"
            fields = f"SYSLOG_IDENTIFIER=CRON\n_UID=0\n_COMM=cron\n_PID={index}\n"
        chunks.append(f"__REALTIME_TIMESTAMP={at}\n__MONOTONIC_TIMESTAMP={at}\n"
                      f"_BOOT_ID=0000000000000000000000000000beef\n{fields}MESSAGE={message}\n\n")
    subprocess.run([JOURNAL_REMOTE, "-o", str(path), "-"], input="".join(chunks).encode(), check=True,
                   capture_output=True)
    return logins


def build_unwatched_journal(path: Path) -> None:
    """A journal file holding one entry that no match selects."""
    at = int(time.time() * 1e6)
    entry = (f"__REALTIME_TIMESTAMP={at}\n__MONOTONIC_TIMESTAMP={at}\n_BOOT_ID=0000000000000000000000000000beef\n"
             "SYSLOG_IDENTIFIER=CRON\n_UID=0\n_COMM=cron\n_PID=1\nMESSAGE=CRON[1]: (root) CMD (true)\n\n")
    subprocess.run([JOURNAL_REMOTE, "-o", str(path), "-"], input=entry.encode(), check=True, capture_output=True)


def fresh_reader_run(setup: Setup, journal: Path) -> float:
    """poplock-reader --once on the journal in `journal`, with no store or cursor yet: every
    entry is read and every login committed (on a journal of no login: its start-up alone)."""
    for path in (setup.store, setup.cursor):
        path.unlink(missing_ok=True)
    return timed([command("poplock-reader"), "-c", str(setup.config), "--once", "-D", str(journal)],
                 stderr=subprocess.DEVNULL)


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

        journalctl = {
            output: best_of(3, lambda output=output: timed(["journalctl", "-D", str(journal), *match, "-o", output]))
            for output in OUTPUTS
        }
        parsing = best_of(3, lambda: timed([command("poplock"), "-c", str(setup.config), "scan",
                                            "-D", str(journal)]))
        granting = best_of(3, lambda: fresh_reader_run(setup, journal))
        granted = setup.run("show").stdout.count("\n") - 1

        # Start-up alone (the same commands on a journal of one unwatched entry), to tell the
        # per-entry rate from the fixed cost of starting a process. Not an empty directory:
        # poplock-reader refuses to build a store from a journal it cannot open at all.
        empty = directory / "empty"
        empty.mkdir()
        build_unwatched_journal(empty / "empty.journal")
        startup = {
            output: best_of(5, lambda output=output: timed(["journalctl", "-D", str(empty), *match, "-o", output],
                                                           stderr=subprocess.DEVNULL))
            for output in OUTPUTS
        }
        startup["scan"] = best_of(5, lambda: timed([command("poplock"), "-c", str(setup.config), "scan",
                                                    "-D", str(empty)]))
        startup["reader"] = best_of(5, lambda: fresh_reader_run(setup, empty))

    print(f"catch-up on {ENTRIES} entries, {watched} from the watched source ({logins} logins, {granted} addresses)")
    rows = [(f"journalctl -o {output} ({what})", journalctl[output], startup[output])
            for output, what in OUTPUTS.items()]
    rows += [("poplock scan (parsing alone)", parsing, startup["scan"]),
             ("poplock-reader --once (grants written)", granting, startup["reader"])]
    rates = {name: watched / (seconds - fixed) for name, seconds, fixed in rows}
    baselines = [(rows[index][1], rates[rows[index][0]]) for index in range(len(OUTPUTS))]
    versus = "".join(f"{'vs ' + output:>10}" for output in OUTPUTS)
    print(f"  {'':48} {'whole run':>10}{versus}   {'after start-up':>16}{versus}")
    for name, seconds, _ in rows:
        whole = "".join(f"{base_seconds / seconds:9.2f}x" for base_seconds, _ in baselines)
        steady = "".join(f"{rates[name] / base_rate:9.2f}x" for _, base_rate in baselines)
        print(f"  {name:48} {seconds:9.3f}s{whole}   {rates[name]:10.0f} e/s{steady}")
    print("  goal: 0.50x journalctl (its default output, vs short) or better")

if __name__ == "__main__":
    main()
