"""Run every benchmark under bench/ and print its figures (`make bench`)."""

import runpy
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = ["catchup.py", "latency.py", "relaylock.py", "policy.py"]

if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    for name in sys.argv[1:] or BENCHMARKS:
        print(f"\n### {name}", flush=True)
        runpy.run_path(str(HERE / name), run_name="__main__")
