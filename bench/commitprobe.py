"""A new writer process making one-login commits the way poplock-reader does, timed one by one.

Run by scale.py as `python commitprobe.py CONFIG COUNT NETWORK`: poplock's own Reader (login
parsing, deny list, user index, the store transaction with the journal cursor, the cursor
file) over a follower that hands it one Dovecot login entry per call, COUNT times, so that
the first commit is the first of a new process (a restarted reader) and the others are
warm. Before each commit it looks up /poplock-bench-commit-N (an access(2) that fails), a
marker that tells the commits apart in an strace log. Prints one JSON object: each
commit's seconds, the bytes it made the process write (write_bytes of /proc/self/io:
pages dirtied, whatever syscall or mapping dirtied them) and the top's size afterwards.
"""

from __future__ import annotations

import json
import os
import sys
import time

from poplock.config import load_config
from poplock.reader import BASE_LOOKUPS_PER_OPEN, Reader
from poplock.sources import build_sources
from poplock.storewriter import StoreWriter

MARKER = "/poplock-bench-commit-"


class OneLoginFollower:
    """The journal follower's reading half, over entries handed in one at a time."""

    def __init__(self):
        self.pending: list[dict] = []
        self.position = 0

    def read(self, limit: int | None):
        while self.pending:
            self.position += 1
            yield self.pending.pop(0)

    def cursor(self) -> str:
        return f"s=0123456789abcdef0123456789abcdef;i={self.position:x}"


def login_entry(identifier: str, address: str) -> dict:
    return {"MESSAGE": f"pop3-login: Login: user=<user-{address}>, method=PLAIN, rip={address}, lip=127.0.0.1, "
                       "mpid=4242, session=<b7aS8S1hfbZ/AAAF>",
            "SYSLOG_IDENTIFIER": identifier, "_UID": "0", "_COMM": "dovecot", "_PID": "4242",
            "__REALTIME_TIMESTAMP": str(int(time.time() * 1e6))}


def write_bytes() -> int:
    with open("/proc/self/io") as io:
        for line in io:
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    raise RuntimeError("no write_bytes in /proc/self/io")


def main() -> None:
    config_path, count, network = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    config = load_config(config_path)
    sources = build_sources(config)
    source = sources[config.sources[0]]
    follower = OneLoginFollower()
    # As poplock-reader's writer, but installing each commit before it returns: the time is the whole commit's.
    writer = StoreWriter(config.store_path, background_merges=True, base_lookups_per_open=BASE_LOOKUPS_PER_OPEN)
    reader = Reader(config, [sources[name] for name in config.sources], follower, writer,
                    notify=lambda message: None)
    seconds, written = [], []
    for index in range(count):
        follower.pending.append(login_entry(sorted(source.identifiers)[0], f"{network}.{index >> 8}.{index & 255}"))
        os.access(f"{MARKER}{index}", os.F_OK)
        before = write_bytes()
        started = time.perf_counter()
        reader.process_available()
        seconds.append(time.perf_counter() - started)
        written.append(write_bytes() - before)
    os.access(f"{MARKER}end", os.F_OK)
    print(json.dumps({"seconds": seconds, "written": written, "top": os.path.getsize(config.store_path),
                      "granted": reader.grant_count}))


if __name__ == "__main__":
    main()
