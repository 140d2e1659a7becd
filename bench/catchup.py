"""poplock-reader's catch-up rate on a journal of 200,000 entries, 10% of them from Dovecot.

The journal is written by systemd-journal-remote into a directory D (it rotates into
several files, as a real journal does). Baseline, measured in the same run: journalctl
reading the same entries with the same match
(`journalctl -D D SYSLOG_IDENTIFIER=dovecot + _SYSTEMD_UNIT=dovecot.service -o cat`).
Printed: watched entries per second and the ratio to journalctl, for parsing alone
(`poplock scan -D D`) and with the grants written (`poplock-reader --once -D D`, no
saved cursor, so every entry is read and every login committed). Goal: 0.5x or better.
"""

from __future__ import annotations

import random
import subprocess
import tempfile
import time
from pathlib import Path

from common import Setup, best_of, command, timed

ENTRIES = 200_000
WATCHED_SHARE = 0.10
JOURNAL_REMOTE = "/lib/systemd/systemd-journal-remote"


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


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="poplock-bench-") as scratch:
        directory = Path(scratch)
        journal = directory / "journal"
        journal.mkdir()
        logins = build_journal(journal / "bench.journal")
        watched = int(subprocess.run(
            ["journalctl", "-D", str(journal), "SYSLOG_IDENTIFIER=dovecot", "+", "_SYSTEMD_UNIT=dovecot.service",
             "-o", "cat"], capture_output=True, check=True).stdout.count(b"\n"))
        setup = Setup(directory)

        journalctl = best_of(3, lambda: timed(
            ["journalctl", "-D", str(journal), "SYSLOG_IDENTIFIER=dovecot", "+",
             "_SYSTEMD_UNIT=dovecot.service", "-o", "cat"]))
        parsing = best_of(3, lambda: timed([command("poplock"), "-c", str(setup.config), "scan",
                                            "-D", str(journal)]))

        def reader_with_grants() -> float:
            for path in (setup.store, setup.cursor):
                path.unlink(missing_ok=True)
            return timed([command("poplock-reader"), "-c", str(setup.config), "--once", "-D", str(journal)],
                         stderr=subprocess.DEVNULL)

        granting = best_of(3, reader_with_grants)
        granted = setup.run("show").stdout.count("\n") - 1

        # Start-up alone (the same commands on an empty journal), to tell the per-entry
        # rate from the fixed cost of starting a process.
        empty = directory / "empty"
        empty.mkdir()
        startup = {
            "journalctl": best_of(5, lambda: timed(["journalctl", "-D", str(empty), "SYSLOG_IDENTIFIER=dovecot",
                                                    "+", "_SYSTEMD_UNIT=dovecot.service", "-o", "cat"],
                                                   stderr=subprocess.DEVNULL)),
            "scan": best_of(5, lambda: timed([command("poplock"), "-c", str(setup.config), "scan", "-D", str(empty)])),
            "reader": best_of(5, lambda: timed([command("poplock-reader"), "-c", str(setup.config), "--once",
                                                "-D", str(empty)], stderr=subprocess.DEVNULL)),
        }

    print(f"catch-up on {ENTRIES} entries, {watched} from the watched source ({logins} logins, {granted} addresses)")
    print(f"  {'':40} {'whole run':>10} {'ratio':>6}   {'start-up':>8} {'entries/s after start-up':>25} {'ratio':>6}")
    base_rate = watched / (journalctl - startup["journalctl"])
    for name, seconds, fixed in (("journalctl, same match (baseline)", journalctl, startup["journalctl"]),
                                 ("poplock scan (parsing alone)", parsing, startup["scan"]),
                                 ("poplock-reader --once (grants written)", granting, startup["reader"])):
        rate = watched / (seconds - fixed)
        print(f"  {name:40} {seconds:9.3f}s {journalctl / seconds:5.2f}x   {fixed:7.3f}s {rate:25.0f} "
              f"{rate / base_rate:5.2f}x")
    print("  goal: 0.50x journalctl or better")


if __name__ == "__main__":
    main()
