"""What a running process uses, read from outside it: CPU time and wake-ups from /proc, and
system calls counted by `perf stat` on the kernel's syscall tracepoints.

/proc/PID/stat's utime + stime (proc(5)) count in clock ticks (1/100 s here); the
scheduler's own account, /proc/PID/task/TID/schedstat (sched-stats.rst), counts the
nanoseconds each thread ran. A process that blocks in select(2) and is woken gives up
the CPU of its own accord: each wake-up is one voluntary context switch (proc(5),
/proc/PID/status). `perf stat` (perf-stat(1)) counts tracepoints without ptrace, so the
process runs at full speed; it starts with its counters off (-D -1) and is switched on
and off through a control FIFO (--control), so that it counts exactly the window asked for.
"""

from __future__ import annotations

import dataclasses
import os
import select
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

CLOCK_TICK = 1 / os.sysconf("SC_CLK_TCK")


@dataclasses.dataclass(frozen=True)
class Usage:
    """A process's totals at one moment (time.perf_counter() seconds)."""

    at: float
    cpu: float  # utime + stime, seconds (clock-tick resolution)
    runtime: float  # seconds on a CPU, from schedstat, all threads (nanosecond resolution)
    voluntary: int  # context switches: each a wait the process chose (a wake-up after it)
    involuntary: int

    def __sub__(self, earlier: Usage) -> Usage:
        return Usage(self.at - earlier.at, self.cpu - earlier.cpu, self.runtime - earlier.runtime,
                     self.voluntary - earlier.voluntary, self.involuntary - earlier.involuntary)

    @property
    def share(self) -> float:
        """Of a difference: the part of one core used over its span (schedstat)."""
        return self.runtime / self.at if self.at > 0 else 0.0


def usage(pid: int) -> Usage:
    """The totals of process `pid` now. Raises OSError once it has gone."""
    at = time.perf_counter()
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()  # after "PID (comm) ": field 3 (state) on
    cpu = (int(fields[11]) + int(fields[12])) * CLOCK_TICK  # fields 14 and 15: utime, stime
    runtime = 0
    voluntary = involuntary = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            runtime += int((task / "schedstat").read_text().split()[0])
            for line in (task / "status").read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    voluntary += int(line.split()[1])
                elif line.startswith("nonvoluntary_ctxt_switches:"):
                    involuntary += int(line.split()[1])
        except FileNotFoundError:  # a thread that just ended
            continue
    return Usage(at, cpu, runtime / 1e9, voluntary, involuntary)


class SyscallCounter:
    """`perf stat -p PID` counting tracepoints, on only between enable() and disable().

    `events`: name -> (tracepoint, filter or None), e.g. "accepted" ->
    ("syscalls:sys_exit_accept4", "ret >= 0"). When perf is missing or cannot attach,
    `available` is False and counts() gives None for every event.
    """

    def __init__(self, pid: int, events: dict[str, tuple[str, str | None]], directory: Path):
        self.events = events
        self.process = None
        self.available = False
        self._control = self._ack = None
        if shutil.which("perf") is None:
            return
        name = uuid.uuid4().hex[:8]
        self._paths = [directory / f"perf-{name}.control", directory / f"perf-{name}.ack"]
        for path in self._paths:
            os.mkfifo(path)
        argv = ["perf", "stat", "-x,", "--control", f"fifo:{self._paths[0]},{self._paths[1]}", "-D", "-1",
                "-p", str(pid)]
        for tracepoint, tracefilter in events.values():
            argv += ["-e", tracepoint] + (["--filter", tracefilter] if tracefilter else [])
        self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, text=True)
        self._ack = os.open(self._paths[1], os.O_RDONLY | os.O_NONBLOCK)
        deadline = time.monotonic() + 10
        while self._control is None:
            try:
                self._control = os.open(self._paths[0], os.O_WRONLY | os.O_NONBLOCK)
            except OSError:  # ENXIO: perf has not opened its end yet
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.close()
                    return
                time.sleep(0.01)
        self.available = True

    def _send(self, command: str) -> bool:
        if not self.available:
            return False
        os.write(self._control, command.encode() + b"\n")
        deadline = time.monotonic() + 10
        answer = b""
        while b"\n" not in answer:  # perf answers "ack\n\0"
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self._ack], [], [], remaining)[0]:
                self.available = False
                return False
            try:
                answer += os.read(self._ack, 64)
            except BlockingIOError:
                continue
        return True

    def enable(self) -> None:
        self._send("enable")

    def disable(self) -> None:
        self._send("disable")

    def counts(self) -> dict[str, int | None]:
        """Stop perf; each event's count over the enabled windows (None when not counted)."""
        found: dict[str, int | None] = dict.fromkeys(self.events)
        if self.process is None:
            return found
        worked = self.available
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            _, errors = self.process.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _, errors = self.process.communicate()
        self.close()
        if not worked:
            return found
        by_tracepoint: dict[str, list[int | None]] = {}
        for line in errors.splitlines():
            cells = line.split(",")
            if len(cells) >= 3 and ":" in cells[2]:
                by_tracepoint.setdefault(cells[2], []).append(int(cells[0]) if cells[0].isdigit() else None)
        for name, (tracepoint, _) in self.events.items():  # in order: one tracepoint may be given twice
            values = by_tracepoint.get(tracepoint)
            found[name] = values.pop(0) if values else None
        return found

    def close(self) -> None:
        for descriptor in (self._control, self._ack):
            if descriptor is not None:
                os.close(descriptor)
        self._control = self._ack = None
        for path in getattr(self, "_paths", ()):
            path.unlink(missing_ok=True)
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


class SyscallTimes:
    """`perf trace -s -p PID -e CALLS` (perf-trace(1)): how many times each system call was made while
    it ran, and how long they took (total, mean, max, in seconds). Traces every call, so it is for
    processes that make a few thousand a second at most. Without perf, times() is empty."""

    def __init__(self, pid: int, calls: list[str], directory: Path):
        self.output = directory / f"perf-trace-{uuid.uuid4().hex[:8]}.txt"
        self.process = None
        if shutil.which("perf") is None:
            return
        self.process = subprocess.Popen(["perf", "trace", "-s", "-p", str(pid), "-e", ",".join(calls),
                                         "-o", str(self.output)], stdin=subprocess.DEVNULL,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10  # perf writes its output file once it is tracing
        while not self.output.exists() and self.process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)

    def times(self) -> dict[str, dict[str, float]]:
        """Stop tracing; call -> {"calls", "total", "mean", "max"}."""
        if self.process is None:
            return {}
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        found: dict[str, dict[str, float]] = {}
        try:
            text = self.output.read_text()
        except OSError:
            return found
        for line in text.splitlines():
            cells = line.split()
            # syscall calls errors total min avg max stddev (milliseconds)
            if len(cells) >= 7 and cells[1].isdigit() and cells[2].isdigit():
                try:
                    total, longest = float(cells[3]), float(cells[6])
                except ValueError:
                    continue
                entry = found.setdefault(cells[0], {"calls": 0, "total": 0.0, "mean": 0.0, "max": 0.0})
                entry["calls"] += int(cells[1])
                entry["total"] += total / 1000
                entry["max"] = max(entry["max"], longest / 1000)
                entry["mean"] = entry["total"] / entry["calls"]
        self.output.unlink(missing_ok=True)
        return found
