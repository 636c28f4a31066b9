"""Full sweep of issue 7: every projection method against `torch.autograd.grad`, speed and memory.

Run: ``python bench/run.py [--quick | --lean] [--only main,N,T,tiny,qwen05,smollm2] [--repeats 7] [--threads 2]``,
optionally under ``LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2`` (the code does not need
it; the allocator in use is printed and stored). Writes bench/results/<stem>.json, .md and PNGs
(<stem>_small_time.png, <stem>_small_memory.png; log-log vs N and vs T), stem = issue7_<allocator>
unless --stem is given.

Points (G = 2 responses per prompt, models in `harness.bench_config`):
- main:   small, N=32, T=128, every method, memory of every method (the issue's bars).
- N:      small, T=128, N = 4, 8, 16, 64 (+ main's 32); SWEEP_METHODS timed (the slowest
          contenders, loop and func_jvp, and NF4 vmap/loop/func_jvp only at the main point),
          memory of SWEEP_MEMORY.
- T:      small, N=16, T = 64, 128, 256, 512; same; T=512 measures memory of every SWEEP_METHOD.
- tiny:   tiny_config, N=16, T=128, every method.
- qwen05: Qwen2.5-0.5B-shaped (24 layers, vocab 151936, tied), N=2, T=64, 3 repeats, only the
          forwards, the autograd α-trick and vjp/jvp: the per-prompt loops, vmap, func_jvp and
          Opacus take minutes per call there.
- smollm2: SmolLM2-135M-shaped (Llama, 30 layers, vocab 49152, tied), N=8, T=128, 3 repeats: the
          forwards, the autograd α-trick and loop, vjp/jvp/func_jvp and the NF4 jvp; memory of
          the forwards, the α-trick, vjp, jvp and the NF4 jvp.
Every point outside the sweeps also gets a bar chart, <stem>_<size>_N<n>_T<t>.png.
--lean: the bars' methods only (LEAN_MAIN at main, LEAN_SWEEP at 3 repeats in the sweeps,
         memory at T=512), for a loaded machine.
--quick: main at 3 repeats and memory of jvp / vjp / autograd_alpha / forward_eager only.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path

from harness import ALL_METHODS, FORWARDS, PointSpec, run_points, save_result

RESULTS = Path(__file__).parent / "results"
SWEEP_METHODS = FORWARDS + (
    "autograd_alpha",
    "autograd_loop",
    "opacus",
    "vjp",
    "jvp",
    "vmap",
    "nf4:vjp",
    "nf4:jvp",
)
SWEEP_MEMORY = ("forward_eager", "autograd_alpha", "vjp", "jvp", "nf4:jvp")
LEAN_MAIN = FORWARDS + ("autograd_alpha", "autograd_loop", "vjp", "jvp", "nf4:jvp")
LEAN_SWEEP = ("forward_eager", "autograd_alpha", "vjp", "jvp", "nf4:jvp")
QWEN_METHODS = FORWARDS + ("autograd_alpha", "vjp", "jvp", "nf4:jvp")
SMOLLM2_METHODS = FORWARDS + ("autograd_alpha", "autograd_loop", "vjp", "jvp", "nf4:jvp", "func_jvp")
SMOLLM2 = PointSpec("smollm2", 8, 128, SMOLLM2_METHODS, QWEN_METHODS, 3, "smollm2; slow methods skipped")


def lean_specs(only: set[str], repeats: int) -> list[PointSpec]:
    """--lean: the bars' methods only (main at `repeats`, sweeps at 3 repeats, memory at T=512)."""
    out = []
    if "main" in only:
        out.append(PointSpec("small", 32, 128, LEAN_MAIN, (), repeats, "main; sweep N"))
    if "T" in only:
        for t in (64, 128, 256, 512):
            out.append(PointSpec("small", 16, t, LEAN_SWEEP, LEAN_SWEEP if t == 512 else (), 3, "sweep T"))
    if "N" in only:
        out += [PointSpec("small", n, 128, LEAN_SWEEP, (), 3, "sweep N") for n in (4, 8, 16, 64)]
    if "qwen05" in only:
        out.append(PointSpec("qwen05", 2, 64, QWEN_METHODS, (), 3, "qwen05; slow methods skipped"))
    if "smollm2" in only:
        out.append(SMOLLM2)
    return out


def specs(only: set[str], repeats: int, quick: bool, lean: bool = False) -> list[PointSpec]:
    """The benchmark points selected by `only`."""
    if lean:
        return lean_specs(only, repeats)
    out = []
    if "main" in only:
        mem = ("forward_eager", "autograd_alpha", "vjp", "jvp") if quick else ALL_METHODS
        out.append(PointSpec("small", 32, 128, ALL_METHODS, mem, 3 if quick else repeats, "main; sweep N"))
    if quick:
        return out
    if "N" in only:
        out += [
            PointSpec("small", n, 128, SWEEP_METHODS, SWEEP_MEMORY, repeats, "sweep N")
            for n in (4, 8, 16, 64)
        ]
    if "T" in only:
        for t in (64, 128, 256, 512):
            mem = SWEEP_METHODS if t == 512 else SWEEP_MEMORY
            out.append(PointSpec("small", 16, t, SWEEP_METHODS, mem, repeats, "sweep T"))
    if "tiny" in only:
        out.append(PointSpec("tiny", 16, 128, ALL_METHODS, SWEEP_MEMORY, repeats, "tiny"))
    if "qwen05" in only:
        out.append(PointSpec("qwen05", 2, 64, QWEN_METHODS, QWEN_METHODS, 3, "qwen05; slow methods skipped"))
    if "smollm2" in only:
        out.append(SMOLLM2)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="main point only, 3 repeats, 4 memory runs")
    parser.add_argument("--lean", action="store_true", help="the bars' methods only (see lean_specs)")
    parser.add_argument("--only", default="main,N,T,tiny,qwen05,smollm2", help="comma-separated point groups")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--stem", default=None, help="output file stem in bench/results/")
    args = parser.parse_args()
    only = set(args.only.split(","))
    preload = os.environ.get("LD_PRELOAD", "")
    alloc = "jemalloc" if "jemalloc" in preload else "tcmalloc" if "tcmalloc" in preload else "glibc"
    kind = "quick_" if args.quick else "lean_" if args.lean else ""
    stem = args.stem or f"issue7_{kind}{alloc}"
    command = " ".join(
        ([f"LD_PRELOAD={preload}"] if preload else []) + ["python"] + [shlex.quote(a) for a in sys.argv]
    )
    start = time.perf_counter()
    result = run_points(
        specs(only, args.repeats, args.quick, args.lean), threads=args.threads, command=command
    )
    result["wall_seconds"] = time.perf_counter() - start
    for path in save_result(result, str(RESULTS), stem).values():
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
