"""poplock-socketmap under load: lookups per second with 20 concurrent connections, in paired runs.

Two load processes hold 10 connections each and send socketmap lookups in lock step (a new
request once the last was answered), as Postfix's smtpd processes do on the connections they
keep open, for DURATION seconds; half the keys hold grants in a store of 1,000, so half the
answers are `OK OK` (each logged, as in production) and half `NOTFOUND ` (each after the
fresh look, which asks poplock-reader to read the journal first). Baseline, in the
same run and under the same load: an asyncio Protocol server that answers NOTFOUND to every
netstring without parsing it or reading the store (the cost of the event loop and the sockets
alone). PAIRS pairs of runs, the order alternating within each pair; the figure is the median
ratio of poplock-socketmap's rate to the baseline's, with its spread. Three variants: a stand-in
reader that answers at once (a process of its own, as poplock-reader is), no reader at all (each
fresh look a failed connect), and the fresh look off ([Store] ReaderWait=0).
Goal: at least 20,000 lookups per second on this 2-core machine.
"""

from __future__ import annotations

import multiprocessing
import os
import selectors
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import bench_setup, fill_store, percentile, report_section
from support.ports import free_port, wait_for_port
from support.socketmap import SocketmapProcess

DURATION = float(os.environ.get("DURATION", "3"))
PAIRS = int(os.environ.get("PAIRS", "4"))
CONNECTIONS = 20
LOAD_PROCESSES = 2
GOAL = 20000

BASELINE_SERVER = """
import asyncio, sys
NOTFOUND = b"9:NOTFOUND ,"
class Baseline(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport
    def data_received(self, data):
        count = data.count(b",")  # one comma ends each request (keys hold none)
        if count:
            self.transport.write(NOTFOUND * count)
async def main():
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Baseline, "127.0.0.1", int(sys.argv[1]))
    await server.serve_forever()
asyncio.run(main())
"""


def netstring(text: str) -> bytes:
    return b"%d:%s," % (len(text), text.encode())


def load(port: int, connections: int, seed: int, results) -> None:
    keys = [f"10.60.{n >> 8 & 3}.{n & 255}" if n % 2 else f"10.61.0.{n & 255}" for n in range(seed, seed + 997)]
    requests = [netstring(f"poplock {key}") for key in keys]
    selector = selectors.DefaultSelector()
    started = {}
    latencies = []
    count = 0
    for index in range(connections):
        client = socket.create_connection(("127.0.0.1", port))
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        selector.register(client, selectors.EVENT_READ, [index, b""])
        client.sendall(requests[index % len(requests)])
        started[client] = time.perf_counter()
    deadline = time.perf_counter() + DURATION
    while time.perf_counter() < deadline:
        for key, _ in selector.select(1):
            client, state = key.fileobj, key.data
            state[1] += client.recv(4096)
            while True:  # every whole reply netstring in what has come
                length, colon, rest = state[1].partition(b":")
                if not colon or len(rest) <= int(length):
                    break
                state[1] = rest[int(length) + 1:]
                now = time.perf_counter()
                latencies.append(now - started[client])
                count += 1
                state[0] += 1
                client.sendall(requests[state[0] % len(requests)])
                started[client] = now
    for key in list(selector.get_map().values()):
        key.fileobj.close()
    results.put((count, latencies))


def measure(port: int) -> tuple[float, list[float]]:
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    workers = [context.Process(target=load, args=(port, CONNECTIONS // LOAD_PROCESSES, n * 1000, results))
               for n in range(LOAD_PROCESSES)]
    for worker in workers:
        worker.start()
    outcomes = [results.get() for _ in workers]
    for worker in workers:
        worker.join()
    total = sum(count for count, _ in outcomes)
    return total / DURATION, [latency for _, latencies in outcomes for latency in latencies]


# A stand-in for poplock-reader's ReaderSocket=, in a process of its own: `ok` to every `sync` at once,
# as a reader that has nothing new to read answers.
READER = """
import asyncio, os, sys
async def answer(reader, writer):
    while (line := await reader.readline()) in (b"sync\\n", b"sync grants\\n"):
        writer.write(b"ok\\n")
        await writer.drain()
    writer.close()
async def main():
    server = await asyncio.start_unix_server(answer, sys.argv[1])
    await server.serve_forever()
asyncio.run(main())
"""

VARIANTS = (  # name, [Store] settings, whether a stand-in reader answers on ReaderSocket=
    ("as shipped, reader answering", "", True),
    ("as shipped, no reader", "", False),  # each fresh look is a failed connect, and a warning a minute
    ("ReaderWait=0", "ReaderWait=0\n", False),  # no fresh look: the protocol and the decision alone
)


def wait_for_unix_socket(path: Path, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(path))
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
        time.sleep(0.01)


def run_pairs(port: int, socketmap: SocketmapProcess, name: str) -> list[tuple[tuple, tuple]]:
    pairs = []
    for index in range(PAIRS):
        if index % 2 == 0:
            baseline = measure(port)
            measured = measure(socketmap.port)
        else:
            measured = measure(socketmap.port)
            baseline = measure(port)
        pairs.append((baseline, measured))
        print(f"  {name}, pair {index + 1}: baseline {baseline[0]:6.0f}/s, {measured[0]:6.0f}/s, "
              f"ratio {measured[0] / baseline[0]:.2f}", flush=True)
    return pairs


def summary(name: str, pairs: list, allowed: int) -> tuple[list[str], list[str]]:
    ratios = [measured[0] / baseline[0] for baseline, measured in pairs]
    rates = [measured[0] for _, measured in pairs]
    baseline_rates = [baseline[0] for baseline, _ in pairs]
    latencies = [latency for _, measured in pairs for latency in measured[1]]
    baseline_latencies = [latency for baseline, _ in pairs for latency in baseline[1]]
    met = "met by every run" if min(rates) >= GOAL else (
        "met by the median, not by every run" if statistics.median(rates) >= GOAL else "NOT met")
    lines = [
        f"{name}: {CONNECTIONS} connections in lock step, {PAIRS} pairs of {DURATION:.0f}s runs",
        f"  NOTFOUND-to-everything server  median {statistics.median(baseline_rates):7.0f} lookups/s  "
        f"p50 {percentile(baseline_latencies, 0.5) * 1000:5.2f} ms  "
        f"p99 {percentile(baseline_latencies, 0.99) * 1000:5.2f} ms",
        f"  {name[:30]:30} median {statistics.median(rates):7.0f} lookups/s  "
        f"p50 {percentile(latencies, 0.5) * 1000:5.2f} ms  p99 {percentile(latencies, 0.99) * 1000:5.2f} ms  "
        f"(runs {min(rates):.0f} to {max(rates):.0f})",
        f"  ratio to the baseline: median {statistics.median(ratios):.2f}, spread {min(ratios):.2f} to "
        f"{max(ratios):.2f}   ({allowed} relays allowed and logged)",
        f"  goal, at least {GOAL} lookups/s: {met}",
    ]
    rows = [f"| {name} | {statistics.median(baseline_rates):.0f} | {statistics.median(rates):.0f} "
            f"({min(rates):.0f}–{max(rates):.0f}) | {statistics.median(ratios):.2f} "
            f"({min(ratios):.2f}–{max(ratios):.2f}) |"]
    return lines, rows


def main() -> None:
    table = ["| server | NOTFOUND server, median lookups/s | poplock-socketmap, median (runs) | ratio, median "
             "(spread) |", "|---|---|---|---|"]
    report = []
    with tempfile.TemporaryDirectory(prefix="poplock-bench-") as scratch:
        port = free_port()
        baseline_server = subprocess.Popen([sys.executable, "-c", BASELINE_SERVER, str(port)])
        try:
            wait_for_port("127.0.0.1", port)
            for number, (name, settings, answering) in enumerate(VARIANTS):
                directory = Path(scratch) / str(number)
                directory.mkdir()
                setup = bench_setup(directory)
                if settings:
                    setup.config.write_text(setup.config.read_text().replace("[Store]\n", "[Store]\n" + settings, 1))
                fill_store(setup, "10.60")
                reader = None
                if answering:
                    reader = subprocess.Popen([sys.executable, "-c", READER, str(directory / "reader.sock")])
                    wait_for_unix_socket(directory / "reader.sock")
                try:
                    with SocketmapProcess(setup) as socketmap:
                        pairs = run_pairs(port, socketmap, name)
                finally:
                    if reader is not None:
                        reader.terminate()
                        reader.wait()
                lines, rows = summary(name, pairs, socketmap.output().count("relay allowed for"))
                report += lines
                table += rows
        finally:
            baseline_server.terminate()
            baseline_server.wait()
    print("\n".join(report))
    report_section("poplock-socketmap: lookups per second over 20 connections", "\n".join(table))


if __name__ == "__main__":
    main()
