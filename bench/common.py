"""Shared pieces of the benchmarks: poplock's executables, a scratch configuration, filled stores, timing,
and the Markdown report `make bench BENCH_REPORT=path` writes."""

from __future__ import annotations

import datetime
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPOSITORY / "tests"))

from support.poplock import Setup, command  # noqa: E402  (after the path is set)

__all__ = ["REPOSITORY", "Setup", "bench_setup", "command", "grant_address", "write_grant_file", "import_grants",
           "fill_store", "timed", "best_of", "percentile", "median", "report_section", "REPORT_SECTIONS",
           "spread", "verdict", "layout"]

# (title, Markdown) from each benchmark that has a table to paste; run.py writes them to $BENCH_REPORT.
REPORT_SECTIONS: list[tuple[str, str]] = []


def bench_setup(directory: Path, extra: str = "") -> Setup:
    """A Setup whose poplock-reader answers decisions on a socket of its own ([Store] ReaderSocket=
    in DIRECTORY): never /run/poplock/reader.sock, where another reader on the machine may answer."""
    setup = Setup(directory, extra=extra)
    text = setup.config.read_text()
    if f"ReaderSocket={directory / 'reader.sock'}\n" not in text:
        setup.config.write_text(text.replace("[Store]\n", f"[Store]\nReaderSocket={directory / 'reader.sock'}\n", 1))
    return setup


def grant_address(network: str, index: int) -> str:
    """The index-th address of NETWORK ("10.50" or "10"): the free octets count up, the last fastest."""
    free = 4 - len(network.split("."))
    if index >= 256 ** free:
        raise ValueError(f"{network} holds fewer than {index + 1} addresses")
    octets = [(index >> (8 * shift)) & 255 for shift in reversed(range(free))]
    return ".".join([network, *map(str, octets)])


def iso_time(seconds: float) -> str:
    return datetime.datetime.fromtimestamp(int(seconds)).astimezone().isoformat(timespec="seconds")


def write_grant_file(path: Path, network: str, count: int, expires_at, *, start: int = 0) -> None:
    """`count` lines of `poplock import`'s plain form, ADDRESS EXPIRES: the addresses of NETWORK from
    `start`, and `expires_at(index)` (seconds since the epoch) for each."""
    cache: dict[float, str] = {}
    with open(path, "w", encoding="ascii") as file:
        lines = []
        for index in range(start, start + count):
            expires = expires_at(index)
            text = cache.get(expires) or cache.setdefault(expires, iso_time(expires))
            lines.append(f"{grant_address(network, index)} {text}\n")
            if len(lines) >= 10000:
                file.writelines(lines)
                lines = []
        file.writelines(lines)


def import_grants(setup: Setup, path: Path) -> float:
    """`poplock import --no-journal PATH` into the setup's store (the bulk path: one transaction, merged
    into a base); the seconds it took."""
    started = time.perf_counter()
    result = subprocess.run([command("poplock"), "-c", str(setup.config), "import", "--no-journal", str(path)],
                            capture_output=True, text=True, timeout=900)
    if result.returncode != 0 or "left out" in result.stdout:
        raise RuntimeError(f"poplock import {path} failed or left grants out: {result.stdout}{result.stderr}")
    return time.perf_counter() - started


def fill_store(setup: Setup, network: str, count: int = 1000, *, expires_in: float = 1800) -> float:
    """`count` live grants for the addresses of NETWORK (e.g. "10.50": 10.50.0.0 on), as a busy site
    would have, loaded with `poplock import`; the seconds the import took."""
    path = setup.directory / f"grants-{network}-{count}.txt"
    expires_at = time.time() + expires_in
    write_grant_file(path, network, count, lambda index: expires_at)
    try:
        return import_grants(setup, path)
    finally:
        path.unlink()


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


def report_section(title: str, markdown: str) -> None:
    """Keep a benchmark's table for the Markdown report; written at once when the benchmark runs alone."""
    REPORT_SECTIONS.append((title, markdown))
    if not os.environ.get("POPLOCK_BENCH_SUITE") and os.environ.get("BENCH_REPORT"):
        Path(os.environ["BENCH_REPORT"]).write_text(f"## {title}\n\n{markdown}\n")


# --- the tables of figures (fresh.py, scale.py) ----------------------------------------------------

def spread(values: list[float], show) -> str:
    values = [value for value in values if value is not None]
    if not values:
        return "n/a"
    if len(values) == 1:
        return show(values[0])
    return f"{show(median(values))} ({show(min(values))}-{show(max(values))})"


def verdict(passed: list[bool]) -> str:
    if not passed:
        return "n/a"
    if all(passed):
        return f"met on all runs ({len(passed)}/{len(passed)})"
    if any(passed):
        return f"met on some runs ({sum(passed)}/{len(passed)})"
    return f"not met (0/{len(passed)})"


def layout(rows: list[list[str]]) -> tuple[str, str]:
    """Rows (the first a header) as aligned text and as a Markdown table."""
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    text = "\n".join("  " + "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
                     for row in rows)
    markdown = "\n".join("| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |"
                         for row in [rows[0], ["---"] * len(rows[0]), *rows[1:]])
    return text, markdown
