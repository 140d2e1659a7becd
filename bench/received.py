"""Fresh decisions through received journals: a POP host's login reaches the SMTP host by
systemd-journal-remote, and poplock-policy is asked at once.

The SMTP host runs a real systemd-journal-remote (--split-mode=host, as an aggregating host
does) and poplock-reader with [Reader] Directory= on its output and [Source:dovecot]
Hosts=POP, POP being a loopback source address (127.0.0.5) the uploads come from; 5,000
grants stored. A trial uploads one Dovecot login of a client of its own, as POP's
systemd-journal-upload would, waits until the entry can be read in the received file (a
handle on the directory without matches, polled every 0.2 ms: fresh.py's JournalWatch), then asks poplock-policy at
once. Baseline trials upload an entry no source reads and ask for a stored grant. Blocks of
fresh and baseline trials take turns (every other pair backwards).

Figures, per block and over all: refusals (goal 0), entry readable -> OK p50 and p99
(goal p99 <= 10 ms, as for this host's own journal in fresh.py).
Environment: TRIALS (500), BLOCKS (5).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from common import bench_setup, fill_store, grant_address, percentile, spread, verdict
from fresh import READABLE_TIMEOUT, JournalWatch, PolicyConnection, login_line, trial_block
from support.journalremote import JournalReceiver
from support.poplock import PolicyProcess, ReaderProcess

TRIALS = int(os.environ.get("TRIALS", "500"))
BLOCKS = int(os.environ.get("BLOCKS", "5"))
STORED_GRANTS = 5000
POP = "127.0.0.5"  # the POP host, as journal-remote tells it: the upload's source address
STORED = "10.60"
FRESH = "10.85"


def entry(message: str, identifier: str = "dovecot", unit: str = "dovecot.service") -> dict:
    """An entry as the POP host's journald records it under systemd."""
    return {"__REALTIME_TIMESTAMP": int(time.time() * 1e6), "SYSLOG_IDENTIFIER": identifier,
            "_SYSTEMD_UNIT": unit, "_UID": 0, "_PID": 801, "_TRANSPORT": "syslog", "PRIORITY": 6,
            "MESSAGE": message}


def block(receiver: JournalReceiver, watch: JournalWatch, connection: PolicyConnection, first: int, trials: int,
          *, fresh: bool) -> dict:
    """`trials` trials: a login of a client of its own, else an entry no source reads and a stored grant."""
    if fresh:
        planned = [(grant_address(FRESH, index), "dovecot", f"rip={grant_address(FRESH, index)},")
                   for index in range(first, first + trials)]
    else:
        planned = [(grant_address(STORED, index % STORED_GRANTS), "CRON", f"baseline entry {index} ")
                   for index in range(first, first + trials)]

    def send(address: str, identifier: str, marker: str) -> None:
        receiver.upload(POP, [entry(login_line(address)) if fresh else
                              entry(f"CMD (run-parts) {marker}", identifier, "cron.service")])

    return trial_block(watch, connection, planned, send)


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="poplock-bench-") as scratch_name:
        scratch = Path(scratch_name)
        with JournalReceiver(scratch / "remote") as receiver:
            # The POP host's file exists before the reader starts, as on a running aggregator.
            receiver.upload(POP, [entry(f"CMD (run-parts) first {time.time()}", "CRON", "cron.service")])
            receiver.wait_for_file(POP)
            (scratch / "smtp").mkdir()
            setup = bench_setup(scratch / "smtp", extra=f"Sources=dovecot\nDirectory={receiver.directory}\n\n"
                                                       f"[Source:dovecot]\nHosts={POP}\n")
            fill_store(setup, STORED, STORED_GRANTS)
            with ReaderProcess(setup) as reader, PolicyProcess(setup) as policy:
                watch = JournalWatch(receiver.directory)
                connection = PolicyConnection(policy.port)
                per_block = max(1, TRIALS // BLOCKS)
                blocks: dict[str, list[dict]] = {"fresh": [], "baseline": []}
                try:
                    for number in range(BLOCKS):
                        kinds = ["fresh", "baseline"] if number % 2 == 0 else ["baseline", "fresh"]
                        for kind in kinds:
                            blocks[kind].append(block(receiver, watch, connection, number * per_block, per_block,
                                                      fresh=kind == "fresh"))
                finally:
                    connection.close()
                    watch.close()
                status = reader.process.poll()
            if status is not None:
                raise RuntimeError(f"poplock-reader ended ({status}): {reader.output()[-2000:]}")

    def milliseconds(value: float) -> str:
        return f"{value * 1000:.2f} ms"

    print(f"fresh decisions through received journals: {BLOCKS} blocks of {per_block} trials, fresh and baseline "
          f"taking turns; {STORED_GRANTS} grants stored; a login uploaded from {POP} to systemd-journal-remote")
    for kind in ("fresh", "baseline"):
        runs = blocks[kind]
        everything = [delay for run in runs for delay in run["delays"]]
        refused = [refusal for run in runs for refusal in run["refused"]]
        print(f"  {kind:8} refused {len(refused)} (granted when asked again: "
              f"{sum(refusal[3] for refusal in refused)}), never readable within {READABLE_TIMEOUT:.0f} s: "
              f"{sum(run['unreadable'] for run in runs)}; readable -> OK p50 "
              f"{spread([percentile(run['delays'], 0.5) for run in runs if run['delays']], milliseconds)}, "
              f"p99 {spread([percentile(run['delays'], 0.99) for run in runs if run['delays']], milliseconds)}; "
              f"over all p99 {milliseconds(percentile(everything, 0.99))}, max {milliseconds(max(everything))}")
    fresh_runs = blocks["fresh"]
    print(f"  goal: no refusal: {verdict([not run['refused'] and run['unreadable'] == 0 for run in fresh_runs])}; "
          f"readable -> OK p99 <= 10 ms: {verdict([percentile(run['delays'], 0.99) <= 0.010 for run in fresh_runs])}")


if __name__ == "__main__":
    main()
