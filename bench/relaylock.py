"""relaylock's whole-process cost per SMTP connection, against a bare Python start-up.

Baseline, in the same run: `/usr/bin/python3 -IS -c pass`. Measured: `relaylock --
/bin/true` for a client that holds a grant (a store of 1,000 grants, a static allow
list of 20 networks), as a systemd Accept=yes service would start it (REMOTE_ADDR set),
and `/bin/true` alone for the cost of the exec that relaylock always ends with.
Goal: relaylock at most 1.3x the baseline.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from pathlib import Path

from common import bench_setup, command, fill_store, median

RUNS = 400


def spawn_times(argv: list[str], environment: dict[str, str]) -> list[float]:
    times = []
    for _ in range(RUNS):
        started = time.perf_counter()
        subprocess.run(argv, env=environment, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - started)
    return times


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="poplock-bench-") as scratch:
        setup = bench_setup(Path(scratch))
        fill_store(setup, "10.50")
        setup.static.write_text("".join(f"192.168.{index}.0/24\n" for index in range(20)))
        environment = {"PATH": os.environ["PATH"], "REMOTE_ADDR": "10.50.3.7"}
        relaylock = [command("relaylock"), "-c", str(setup.config), "--", "/bin/true"]
        check = subprocess.run(relaylock[:-1] + ["/usr/bin/env"], env=environment, stdin=subprocess.DEVNULL,
                               capture_output=True, text=True)
        assert "RELAYCLIENT=" in check.stdout, check.stderr  # the measured path really grants
        samples = {"python3 -IS -c pass (baseline)": [], "/bin/true": [], "relaylock -- /bin/true": []}
        for _ in range(3):  # interleaved rounds, so drift in the machine's load hits all alike
            samples["python3 -IS -c pass (baseline)"] += spawn_times(["/usr/bin/python3", "-IS", "-c", "pass"],
                                                                     environment)
            samples["/bin/true"] += spawn_times(["/bin/true"], environment)
            samples["relaylock -- /bin/true"] += spawn_times(relaylock, environment)
    baseline = median(samples["python3 -IS -c pass (baseline)"])
    print(f"per-connection cost, median of {3 * RUNS} runs each")
    for name, values in samples.items():
        print(f"  {name:34} {median(values) * 1000:6.2f} ms   {median(values) / baseline:5.2f}x baseline")
    print("  goal: relaylock at most 1.30x the baseline")


if __name__ == "__main__":
    main()
