"""Shared pieces of the benchmarks: poplock's executables, a scratch configuration, timing."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPOSITORY / "tests"))

from support.poplock import Setup, command  # noqa: E402  (after the path is set)

__all__ = ["REPOSITORY", "Setup", "command", "fill_store", "timed", "best_of", "percentile", "median"]


def fill_store(setup: Setup, network: str, count: int = 1000) -> None:
    """`count` live grants for addresses in NETWORK.x.y (e.g. "10.50"), as a busy site would have."""
    import time as clock

    from poplock.grants import Grant
    from poplock.storewriter import StoreWriter

    now = int(clock.time())
    with StoreWriter(str(setup.store)).transaction() as transaction:
        for index in range(count):
            address = f"{network}.{index >> 8}.{index & 255}"
            transaction.grants[address] = Grant(address, now + 1800, now, "dovecot")


def timed(argv: list[str], **kwargs) -> float:
    """Wall-clock seconds one run of a command takes (its output discarded)."""
    started = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, check=True, **kwargs)
    return time.perf_counter() - started


def best_of(runs: int, measure) -> float:
    """The fastest of several runs: the least disturbed by the rest of the machine."""
    return min(measure() for _ in range(runs))


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def median(values: list[float]) -> float:
    return statistics.median(values)
