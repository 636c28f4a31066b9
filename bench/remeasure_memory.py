"""Re-measure the peak memory of a stored result's points (fresh subprocess per method) in place.

Run: ``python bench/remeasure_memory.py bench/results/issue7_glibc.json [--methods a,b] [--points 0,1]``.
Rewrites the JSON's `peak_mib` (and the .md / PNGs beside it). Used after the fix to
`harness.peak_rss` (ru_maxrss in a child starts at the parent's peak), so the timings of the run
stay as they were measured.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from harness import measure_memory, save_result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("result", type=Path)
    parser.add_argument("--methods", default=None, help="comma-separated (default: every method)")
    parser.add_argument("--points", default=None, help="comma-separated point indices (default: all)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    result = json.loads(args.result.read_text())
    indices = range(len(result["points"])) if args.points is None else map(int, args.points.split(","))
    for i in indices:
        point = result["points"][i]
        names = args.methods.split(",") if args.methods else list(point["methods"])
        for name in names:
            mem = measure_memory(point["size"], point["num_prompts"], point["seq_len"], name, args.threads)
            row = point["methods"].setdefault(name, {})
            row["peak_mib"] = mem.get("peak_mib")
            row.pop("memory_error", None)
            if "error" in mem or "skipped" in mem:
                row["memory_error"] = mem.get("error") or mem.get("skipped")
            print(
                f"[{point['size']} N={point['num_prompts']} T={point['seq_len']}] {name}: {mem}", flush=True
            )
    result["memory_remeasured_under"] = os.environ.get("LD_PRELOAD", "") or "glibc"
    save_result(result, str(args.result.parent), args.result.stem)


if __name__ == "__main__":
    main()
