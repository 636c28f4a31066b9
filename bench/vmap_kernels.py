"""Where `alpha_projections(method="vmap")`'s time goes at the README's T = 128 point (32 prompts ×
2 responses × 128 tokens, the "small" bench model): the default first-order kernels (SDPA, recompute
head, checkpointing past CHECKPOINT_MIN_TOKENS of the vmapped chunk) against variants, alternated.

    python bench/vmap_kernels.py --part time      # kernel variants, vmap and loop, --rounds rounds each
    python bench/vmap_kernels.py --part memory --checkpoint-by prompt|chunk   # one call, fresh process

Run under the bench lock (`flock /tmp/fp_bench.lock nice -n -10 env OMP_NUM_THREADS=2 ...`); the
memory part once per process (peak RSS above the loaded model, ru_maxrss).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from harness.points import bench_batch, bench_model, random_direction  # noqa: E402

import functional_probe as fp  # noqa: E402
import functional_probe.grads as grads  # noqa: E402
from functional_probe.model.kernels import PLAIN, Kernels  # noqa: E402

DEFAULT = grads.reverse_kernels


def variants() -> dict:
    """name -> a stand-in for grads.reverse_kernels(batch, prompts=None)."""
    return {
        "default": DEFAULT,
        "plain": lambda b, prompts=None: PLAIN,
        "plain_attention_recompute_head_checkpoint": lambda b, prompts=None: Kernels(
            "plain", head="recompute", checkpoint=DEFAULT(b, prompts).checkpoint),
        "plain_attention_recompute_head": lambda b, prompts=None: Kernels("plain", head="recompute"),
        "sdpa_unchecked": lambda b, prompts=None: Kernels(
            "sdpa", causal_only=DEFAULT(b, prompts).causal_only, head="recompute"),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", choices=("time", "memory"), required=True)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--checkpoint-by", choices=("chunk", "prompt"), default="chunk",
                   help="memory: checkpoint by the vmapped chunk's size (the default) or by one prompt's")
    args = p.parse_args()
    torch.set_num_threads(2)
    model = bench_model("small")
    batch = bench_batch(32, 128, model.vocab_size)
    d = random_direction(model.lora)
    if args.part == "memory":
        if args.checkpoint_by == "prompt":
            grads.reverse_kernels = lambda b, prompts=None: DEFAULT(b, 1)
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        start = time.perf_counter()
        fp.alpha_projections(model, model.lora, batch, d, method="vmap")
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
        print(f"checkpoint by {args.checkpoint_by}: {time.perf_counter() - start:.2f} s, peak {peak:.0f} MiB over loaded")
        return
    times = {(m, k): [] for m in ("vmap", "loop") for k in variants()}
    for _ in range(args.rounds):
        for (method, name), seen in times.items():
            grads.reverse_kernels = variants()[name]
            start = time.perf_counter()
            fp.alpha_projections(model, model.lora, batch, d, method=method)
            seen.append(time.perf_counter() - start)
    grads.reverse_kernels = DEFAULT
    for (method, name), seen in times.items():
        print(f"{method:5s} {name:42s} median {statistics.median(seen):.3f} s  {[round(t, 2) for t in seen]}")


if __name__ == "__main__":
    main()
