"""poplock-policy under load: decisions per second and latency with 20 concurrent connections.

Two load processes hold 10 connections each and send Postfix 3.7's relay-check request in
lock step (a new request once the last was answered), as smtpd processes do, for
DURATION seconds; half the clients hold grants in a store of 1,000. Baseline, in the
same run and under the same load: an asyncio server that answers DUNNO to everything
without reading the store (the cost of the protocol and the event loop alone).
One run of each, so a view, not a result: the goal (at least 20,000 decisions a second and
0.4x the baseline) is checked on paired runs by fresh.py, granted clients and inbound mail apart.
"""

from __future__ import annotations

import multiprocessing
import os
import selectors
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import bench_setup, fill_store, percentile
from support.poplock import PolicyProcess
from support.ports import free_port, wait_for_port

DURATION = float(os.environ.get("DURATION", "5"))
CONNECTIONS = 20
LOAD_PROCESSES = 2

REQUEST = (
    "request=smtpd_access_policy\nprotocol_state=RCPT\nprotocol_name=ESMTP\nclient_address={client}\n"
    "client_name=unknown\nclient_port=41234\nreverse_client_name=unknown\nserver_address=127.0.0.1\n"
    "server_port=25\nhelo_name=client.example\nsender=a@example.org\nrecipient=b@elsewhere.example\n"
    "recipient_count=0\nqueue_id=\ninstance=2b5e.6612e9c3.e1b1.0\nsize=0\netrn_domain=\nstress=\n"
    "sasl_method=\nsasl_username=\nsasl_sender=\nccert_subject=\nccert_issuer=\nccert_fingerprint=\n"
    "ccert_pubkey_fingerprint=\nencryption_protocol=\nencryption_cipher=\nencryption_keysize=0\n"
    "policy_context=\n\n"
)

BASELINE_SERVER = """
import asyncio, sys
async def serve(reader, writer):
    pending = b""
    try:
        while data := await reader.read(65536):
            pending += data
            count = pending.count(b"\\n\\n")
            if count:
                pending = pending[pending.rfind(b"\\n\\n") + 2:]
                writer.write(b"action=DUNNO\\n\\n" * count)
                await writer.drain()
    except ConnectionError:
        pass
    writer.close()
async def main():
    server = await asyncio.start_server(serve, "127.0.0.1", int(sys.argv[1]))
    await server.serve_forever()
asyncio.run(main())
"""


def load(port: int, connections: int, seed: int, results) -> None:
    requests = [REQUEST.format(client=f"10.60.{n >> 8 & 3}.{n & 255}" if n % 2 else f"10.61.0.{n & 255}").encode()
                for n in range(seed, seed + 997)]
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
            data = client.recv(4096)
            state[1] += data
            while b"\n\n" in state[1]:
                _, _, state[1] = state[1].partition(b"\n\n")
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


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="poplock-bench-") as scratch:
        setup = bench_setup(Path(scratch))
        fill_store(setup, "10.60")
        port = free_port()
        baseline_server = subprocess.Popen([sys.executable, "-c", BASELINE_SERVER, str(port)])
        try:
            wait_for_port("127.0.0.1", port)
            baseline_rate, baseline_latencies = measure(port)
        finally:
            baseline_server.terminate()
            baseline_server.wait()
        with PolicyProcess(setup) as policy:
            rate, latencies = measure(policy.port)
        allowed = policy.output().count("relay allowed for")
    print(f"poplock-policy, {CONNECTIONS} connections in lock step for {DURATION:.0f}s each run")
    for name, value, values in (("DUNNO-to-everything server (baseline)", baseline_rate, baseline_latencies),
                                ("poplock-policy", rate, latencies)):
        print(f"  {name:40} {value:9.0f} decisions/s  p50 {percentile(values, 0.5) * 1000:5.2f} ms  "
              f"p99 {percentile(values, 0.99) * 1000:5.2f} ms")
    print(f"  ratio to the baseline: {rate / baseline_rate:.2f}x   ({allowed} relays allowed and logged)")
    print("  goal: at least 20000 decisions/s and 0.4x the baseline, checked on paired runs by fresh.py")


if __name__ == "__main__":
    main()
