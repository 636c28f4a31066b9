"""Do dual_speed's `hf` runner and the harness's forward time the same call? (issue 17)

Run: ``python bench/forward_calls.py [--rounds 4] [--threads 2]``. One fresh process, SmolLM2-135M
shape (random weights), the bench batch (8 prompts x 2 responses, T = 128): the PEFT eager twin
called as `bench/dual_speed.py` calls it (input_ids, attention_mask) and as the harness does
(`harness.baselines.peft_logits`: position_ids too), alternated, one warm-up each; prints the
medians and every round in seconds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from harness.baselines import peft_logits
from harness.points import bench_batch, bench_model

from functional_probe.testing import peft_twin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = bench_model("smollm2")
    batch = bench_batch(8, 128, model.vocab_size, group=2)
    twin = peft_twin(model)
    ids, mask = batch.input_ids.flatten(0, 1), batch.attention_mask.flatten(0, 1).long()
    calls = {
        "dual_speed hf": lambda: twin(input_ids=ids, attention_mask=mask).logits,
        "harness forward_eager": lambda: peft_logits(twin, batch),
    }
    times: dict[str, list[float]] = {name: [] for name in calls}
    with torch.no_grad():
        for call in calls.values():  # warm-up
            call()
        for _ in range(args.rounds):
            for name, call in calls.items():
                start = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - start)
    for name, ts in times.items():
        print(f"{name:>22}: median {statistics.median(ts):.3f} s; rounds " + ", ".join(f"{t:.2f}" for t in ts))


if __name__ == "__main__":
    main()
