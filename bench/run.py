"""Run every benchmark under bench/ and print its figures (`make bench`).

`bench/run.py [NAME.py ...]` runs only those. With BENCH_REPORT=PATH (`make bench
BENCH_REPORT=report.md`), the figures are also written to PATH as Markdown: the tables of
the benchmarks that make one (scale.py), and every other benchmark's output as it printed it.
"""

import io
import os
import runpy
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# scale.py last: its table is the one to read at the end.
BENCHMARKS = ["catchup.py", "latency.py", "relaylock.py", "policy.py", "socketmap.py", "fresh.py", "received.py",
              "scale.py"]


class Tee(io.TextIOBase):
    """Standard output, kept as well."""

    def __init__(self, stream):
        self.stream = stream
        self.kept = io.StringIO()

    def write(self, text: str) -> int:
        self.kept.write(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()


def main() -> None:
    sys.path.insert(0, str(HERE))
    os.environ["POPLOCK_BENCH_SUITE"] = "1"  # benchmarks leave the report to this script
    import common

    started = time.perf_counter()
    outputs = []
    for name in sys.argv[1:] or BENCHMARKS:
        print(f"\n### {name}", flush=True)
        tee = Tee(sys.stdout)
        sys.stdout = tee
        begun = time.perf_counter()
        try:
            runpy.run_path(str(HERE / name), run_name="__main__")
        finally:
            sys.stdout = tee.stream
        seconds = time.perf_counter() - begun
        print(f"  ({name} took {seconds:.0f}s)", flush=True)
        outputs.append((name, tee.kept.getvalue(), seconds))
    total = time.perf_counter() - started
    print(f"\nall benchmarks: {total:.0f}s")
    if os.environ.get("BENCH_REPORT"):
        parts = [f"# poplock benchmarks\n\nAll benchmarks took {total:.0f}s "
                 f"({', '.join(f'{name} {seconds:.0f}s' for name, _, seconds in outputs)}).\n"]
        parts += [f"## {title}\n\n{markdown}\n" for title, markdown in common.REPORT_SECTIONS]
        parts += [f"## {name}\n\n```\n{output.strip()}\n```\n" for name, output, _ in outputs if name != "scale.py"]
        Path(os.environ["BENCH_REPORT"]).write_text("\n".join(parts))
        print(f"report written to {os.environ['BENCH_REPORT']}")


if __name__ == "__main__":
    main()
