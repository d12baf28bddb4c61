"""Time `efface demo` end to end (the README's main command): issue 4 asks for <= 2 minutes on 2 CPU cores.

Runs the command in a fresh subprocess (model loading, erasure, evaluation and report included) into a
temporary directory, and prints wall time and the child's peak memory, and the ratio to the budget.

    python bench/demo_time.py [--runs 1]
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import tempfile
import time

BUDGET_S = 120.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    times = []
    for _ in range(args.runs):
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "efface", "-q", "demo", "--out", f"{tmp}/demo"], check=True,
                           stdout=subprocess.DEVNULL)
            times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    best = min(times)
    print(f"efface demo: {best:.1f} s (best of {len(times)}: {', '.join(f'{t:.1f}' for t in times)}), "
          f"peak memory {peak:.0f} MB; budget {BUDGET_S:.0f} s -> ratio {best / BUDGET_S:.2f} "
          f"({'within' if best <= BUDGET_S else 'OVER'} budget)")
    return 0 if best <= BUDGET_S else 1


if __name__ == "__main__":
    raise SystemExit(main())
