"""How long `functional-probe --help` takes: the median wall time of several fresh processes.

    python bench/cli_startup.py [--runs 7]

Each run is a new interpreter (`python -m functional_probe --help`), so imports are paid every
time, as a user pays them. The machine's load is printed with the number: on a shared machine
the median is an upper bound.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time


def startup_times(runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "functional_probe", "--help"], check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=7)
    times = startup_times(p.parse_args().runs)
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"functional-probe --help: median {statistics.median(times):.2f} s over {len(times)} runs "
          f"(min {min(times):.2f}, max {max(times):.2f}); load average {load}")


if __name__ == "__main__":
    main()
