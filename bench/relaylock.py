"""relaylock's whole-process cost per SMTP connection, against a bare Python start-up.

Baseline, in the same run: `/usr/bin/python3 -IS -c pass`. Measured: `relaylock --
/bin/true` for a client that holds a grant, as a systemd Accept=yes service would start it
(REMOTE_ADDR set), two ways:

  * with the local store (a store of 1,000 grants, a static allow list of 20 networks);
  * on a host without the store ([Relaylock] Server=): relaylock asks a poplock-socketmap
    running on loopback with that store, end to end (connect, question, `OK` answer, exec);

and `/bin/true` alone for the cost of the exec that relaylock always ends with.

ROUNDS rounds; in each, the commands take turns run by run (baseline, /bin/true, local,
Server=, baseline, ...), so that drift in the machine's load hits all alike, and each
round gives its ratio of medians to the baseline. The figure is the median ratio over
the rounds, with its spread (lowest to highest).
Goals: relaylock with the local store at most 1.3x the baseline; with Server= at most 1.5x.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from pathlib import Path

from common import bench_setup, command, fill_store, median
from support.socketmap import SocketmapProcess

RUNS = int(os.environ.get("RUNS", "300"))  # of each command, per round
ROUNDS = int(os.environ.get("ROUNDS", "5"))
BASELINE = "python3 -IS -c pass (baseline)"
EXEC = "/bin/true"
LOCAL = "relaylock -- /bin/true (local store)"
SERVER = "relaylock -- /bin/true (Server=)"
GOALS = {LOCAL: 1.3, SERVER: 1.5}


def spawn_time(argv: list[str], environment: dict[str, str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, env=environment, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - started


def check_grants(argv: list[str], environment: dict[str, str], line: str) -> None:
    """The measured path really grants, and the way it is meant to."""
    result = subprocess.run(argv[:-1] + ["/usr/bin/env"], env=environment, stdin=subprocess.DEVNULL,
                            capture_output=True, text=True)
    assert "RELAYCLIENT=" in result.stdout and line in result.stderr, result.stderr


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="poplock-bench-") as scratch:
        setup = bench_setup(Path(scratch))
        fill_store(setup, "10.50")
        setup.static.write_text("".join(f"192.168.{index}.0/24\n" for index in range(20)))
        environment = {"PATH": os.environ["PATH"], "REMOTE_ADDR": "10.50.3.7"}
        with SocketmapProcess(setup) as service:
            server = f"127.0.0.1:{service.port}"
            storeless = Path(scratch) / "smtp-host.conf"  # the SMTP host's own static list: the same 20 networks
            storeless.write_text(f"[Grants]\nStaticAllowFile={setup.static}\n\n[Relaylock]\nServer={server}\n")
            commands = {
                BASELINE: ["/usr/bin/python3", "-IS", "-c", "pass"],
                EXEC: ["/bin/true"],
                LOCAL: [command("relaylock"), "-c", str(setup.config), "--", "/bin/true"],
                SERVER: [command("relaylock"), "-c", str(storeless), "--", "/bin/true"],
            }
            check_grants(commands[LOCAL], environment, "relay allowed for 10.50.3.7: manual grant")
            check_grants(commands[SERVER], environment, f"relay allowed for 10.50.3.7: server {server} answers OK")
            rounds = []
            for _ in range(ROUNDS):
                samples: dict[str, list[float]] = {name: [] for name in commands}
                for _ in range(RUNS):
                    for name, argv in commands.items():
                        samples[name].append(spawn_time(argv, environment))
                rounds.append(samples)
    everything = {name: [value for samples in rounds for value in samples[name]] for name in commands}
    baseline = median(everything[BASELINE])
    print(f"per-connection cost, median of {ROUNDS} x {RUNS} runs each, the commands taking turns run by run")
    for name, values in everything.items():
        print(f"  {name:40} {median(values) * 1000:6.2f} ms   {median(values) / baseline:5.2f}x baseline")
    print(f"ratio to the baseline, per round (median of each round's {RUNS} runs against its baseline's):")
    for name, goal in GOALS.items():
        ratios = [median(samples[name]) / median(samples[BASELINE]) for samples in rounds]
        met = sum(ratio <= goal for ratio in ratios)
        print(f"  {name:40} median {median(ratios):4.2f}x, spread {min(ratios):4.2f}x to {max(ratios):4.2f}x "
              f"({' '.join(f'{ratio:4.2f}' for ratio in ratios)}); goal at most {goal:.2f}x: "
              f"met in {met} of {ROUNDS} rounds")


if __name__ == "__main__":
    main()
