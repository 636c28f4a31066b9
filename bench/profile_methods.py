"""Top ops by self CPU time of chosen methods at one benchmark point (for a missed bar of issue 7).

Run: ``python bench/profile_methods.py [--size small] [--prompts 32] [--seq 128] [--rows 15]
[--methods jvp,vjp,autograd_alpha,forward_eager]``. Each method runs once unprofiled (warm-up),
then once under torch.profiler; the table of each is printed.
"""

from __future__ import annotations

import argparse
import time

import torch
from harness import allocator, build_setup, make_runners, profile_method


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="small")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rows", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", default="jvp,vjp,autograd_alpha,forward_eager")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    methods = args.methods.split(",")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {allocator()}")
    setup = build_setup(args.size, args.prompts, args.seq, methods)
    runners = make_runners(setup, methods)
    for name, run in runners.items():
        run()
        start = time.perf_counter()
        table = profile_method(run, args.rows)
        print(f"\n=== {name} ({args.size}, N={args.prompts}, T={args.seq}; profiled call "
              f"{time.perf_counter() - start:.2f} s) ===\n{table}")  # fmt: skip


if __name__ == "__main__":
    main()
