"""Benchmark a no-op `dvc repro` (everything up to date) in this workspace."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DVC = [sys.executable, "-m", "dvc"]


def main() -> None:
    status = subprocess.run(DVC + ["status", "dvc.yaml"], cwd=ROOT, capture_output=True, text=True)
    if "up to date" not in status.stdout:
        sys.exit("bench_repro: the pipeline is not up to date here; run `make repro` first\n" + status.stdout)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        out = subprocess.run(DVC + ["repro"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        times.append(time.perf_counter() - start)
        assert "Running stage" not in out, out
    print(f"no-op dvc repro: {min(times):.2f} s best, {max(times):.2f} s worst of 3 "
          f"(target < 5 s: {'met' if max(times) < 5 else 'NOT met'})")


if __name__ == "__main__":
    main()
