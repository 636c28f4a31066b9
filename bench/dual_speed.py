"""Speed of the dual forward against transformers' eager forward (DESIGN §3, "small" config).

Run: ``python bench/dual_speed.py [--batch 64] [--seq 128] [--repeats 7] [--quantize nf4] [--profile]``,
optionally under ``LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2`` (the code does not
depend on it; the allocator in use is printed). Minima are printed besides medians because on a
shared 2-core machine other processes inflate medians (the load average is printed); so is the
process CPU time (robust to other processes with ``--threads 1``). Model: a random Qwen2, hidden 256, intermediate 704, 4 layers, 4 query /
2 kv heads, vocab 4096, LoRA r=8 on all 7 projections with both factors non-zero; fp32,
2 threads. Timed, interleaved, medians of ``--repeats``:

- ``hf``      transformers eager forward of the PEFT twin (logits), no_grad
- ``primal``  our forward: ``model.hidden_states`` + head logits, no_grad
- ``jvp``     ``torch.func.jvp`` of per-token log-probs over ``model.hidden_states`` + head
- ``dual``    ``dual_hidden_states`` + ``head_logprobs_tangent`` on all B·T positions
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from transformers import Qwen2Config

from functional_probe.model.dual import dual_hidden_states, head_logprobs_tangent
from functional_probe.model.loading import build_model, dense_or_nf4
from functional_probe.model.tiny import tiny_lora, tiny_state_dict
from functional_probe.reference import peft_twin


def small_model(quantize: str | None = None):
    config = Qwen2Config(
        vocab_size=4096, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        rms_norm_eps=1e-6, tie_word_embeddings=False,
    )  # fmt: skip
    state = tiny_state_dict(config, seed=0)
    frozen = dense_or_nf4(state.get, quantize, torch.float32, "cpu")
    return build_model(config, state.get, frozen, tiny_lora(config, rank=8, alpha=16.0))


def allocator() -> str:
    """The malloc in use: LD_PRELOAD and any jemalloc/tcmalloc mapped into this process."""
    with open("/proc/self/maps") as f:
        mapped = {line.split()[-1] for line in f if "malloc" in line}
    tuned = sorted(os.path.basename(m) for m in mapped if "jemalloc" in m or "tcmalloc" in m)
    return f"LD_PRELOAD={os.environ.get('LD_PRELOAD', '')!r}; tuned malloc: {tuned or 'none (glibc)'}"


def make_runners(model, batch: int, seq: int):
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.vocab_size, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.bool)
    targets = ids.roll(-1, dims=1)
    lora = model.lora
    direction = {k: torch.randn(v.shape, generator=gen) for k, v in lora.items()}
    head = model.head_weight
    twin = peft_twin(model)

    def token_logp(lo):
        logits = model.hidden_states(lo, ids, mask) @ head.T
        return logits.log_softmax(-1).gather(-1, targets[..., None])[..., 0]

    def hf():
        with torch.no_grad():
            return twin(input_ids=ids, attention_mask=mask.long()).logits

    def primal():
        with torch.no_grad():
            return model.hidden_states(lora, ids, mask) @ head.T

    def jvp():
        return torch.func.jvp(token_logp, (lora,), (direction,))[1]

    def dual():
        h, h_dot = dual_hidden_states(model, lora, direction, ids, mask)
        d = h.shape[-1]
        return head_logprobs_tangent(h.reshape(-1, d), h_dot.reshape(-1, d), head, targets.reshape(-1))[1]

    return {"hf": hf, "primal": primal, "jvp": jvp, "dual": dual}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quantize", choices=["nf4"], default=None, help="NF4 base linears")
    parser.add_argument("--profile", action="store_true", help="profile the dual once and print ops")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = small_model(args.quantize)
    runners = make_runners(model, args.batch, args.seq)
    ref = runners["jvp"]().reshape(-1)
    got = runners["dual"]()
    err = ((got - ref).norm() / ref.norm()).item()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {allocator()}")
    print(
        f"batch {args.batch} x T={args.seq}, base {args.quantize or 'fp32'}; dual vs jvp relative error {err:.2e}"
    )
    times = {name: [] for name in runners}
    cpu = {name: [] for name in runners}
    for run in runners.values():  # warm-up
        run()
    for _ in range(args.repeats):
        for name, run in runners.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            run()
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    base, base_min, base_cpu = (f(t["hf"]) for f, t in ((statistics.median, times), (min, times), (min, cpu)))
    for name, ts in times.items():
        med, low, low_cpu = statistics.median(ts), min(ts), min(cpu[name])
        print(
            f"{name:>7}: median {med * 1e3:7.1f} ms ({med / base:4.2f} x hf)  "
            f"min {low * 1e3:7.1f} ms ({low / base_min:4.2f} x hf)  max {max(ts) * 1e3:6.0f} ms  "
            f"min CPU time {low_cpu * 1e3:7.1f} ms ({low_cpu / base_cpu:4.2f} x hf)"
        )
    ratio = statistics.median(times["dual"]) / statistics.median(times["primal"])
    print(f"dual / primal (medians): {ratio:.2f}")
    print(f"load average after the run: {os.getloadavg()[0]:.2f} (other processes on {os.cpu_count()} cores)")
    if args.profile:
        with torch.profiler.profile() as prof:
            runners["dual"]()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
