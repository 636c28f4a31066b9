"""Speed of the dual forward and the fast primal against transformers' eager forward (issue 17).

Run: ``python bench/dual_speed.py [--size smollm2|small] [--seq 128 512] [--rounds 7] [--profile]
[--out bench/results/dual_speed]``, optionally under
``LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2`` (the allocator in use is printed and saved).
Models (random weights, no download; LoRA r=8, alpha=16 on all 7 projections, both factors non-zero):
``smollm2`` = SmolLM2-135M's shape (Llama, hidden 576, 30 layers, 9/3 heads, head_dim 64, MLP 1536,
vocab 49152, tied); ``small`` = DESIGN §3's Qwen2 (hidden 256, 4 layers, vocab 4096). Batch: 8 prompts x
2 responses, T columns, ragged (prompts T/8..T/4, responses T/2..3T/4: left and right padding).
Timed in one process, the order shuffled every round, medians and [min, max] of ``--rounds``, wall
and process CPU time (the latter less inflated by other jobs):

- ``hf``           transformers eager forward of the PEFT twin (logits at every position), no_grad
- ``primal``       ``fp.sequence_logprobs(derivatives=False)`` (the fast primal)
- ``plain_primal`` the same S through the plain forward (``grouped_logprobs``), no_grad
- ``dual``         ``fp.sequence_logprobs_and_tangent`` (what ``method="jvp"`` runs)
- ``jvp``          ``fp.alpha_projections(method="jvp")``
- ``dual_nf4``     the dual on the same model with NF4 base linears

On this shared 2-core machine other processes inflate times; ratios of interleaved runs are what
the bench reports (the load average is printed). ``--profile`` splits one dual and one primal call
into matmul, attention and head shares with torch.profiler.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager

import torch
from harness.memory import current_rss, peak_rss, reset_peak_rss
from harness.points import bench_batch, random_direction

import functional_probe as fp
from functional_probe.logprobs import grouped_logprobs
from functional_probe.model import dual, fast_primal
from functional_probe.model.base_weights import dense_or_nf4
from functional_probe.model.loading import build_model
from functional_probe.model.tiny import tiny_lora, tiny_state_dict
from functional_probe.testing import peft_twin

MATMULS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::addmm_", "aten::baddbmm", "aten::baddbmm_")


def config(size: str):
    from transformers import LlamaConfig, Qwen2Config

    if size == "smollm2":
        return LlamaConfig(
            vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
            num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True,
            max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0,
        )  # fmt: skip
    return Qwen2Config(
        vocab_size=4096, hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False,
    )  # fmt: skip


def make_model(size: str, quantize: str | None = None):
    cfg = config(size)
    state = tiny_state_dict(cfg, seed=0)
    if cfg.tie_word_embeddings:
        state["model.embed_tokens.weight"] = state.pop("lm_head.weight")
    frozen = dense_or_nf4(state.get, quantize, torch.float32, "cpu")
    return build_model(cfg, state.get, frozen, tiny_lora(cfg, rank=8, alpha=16.0))


def allocator() -> str:
    """The malloc in use: LD_PRELOAD and any jemalloc/tcmalloc mapped into this process."""
    with open("/proc/self/maps") as f:
        mapped = {line.split()[-1] for line in f if "malloc" in line}
    tuned = sorted(os.path.basename(m) for m in mapped if "jemalloc" in m or "tcmalloc" in m)
    return f"LD_PRELOAD={os.environ.get('LD_PRELOAD', '')!r}; tuned malloc: {tuned or 'none (glibc)'}"


def make_runners(model, nf4_model, batch, with_nf4: bool):
    lora, direction = model.lora, random_direction(model.lora)
    twin = peft_twin(model)
    b = batch

    def hf():
        with torch.no_grad():
            return twin(
                input_ids=b.input_ids.flatten(0, 1), attention_mask=b.attention_mask.flatten(0, 1).long()
            ).logits

    def primal():
        with torch.no_grad():
            return fp.sequence_logprobs(model, lora, b, derivatives=False)

    def plain_primal():
        with torch.no_grad():
            args = (b.input_ids, b.attention_mask, b.position_ids, b.response_mask)
            return grouped_logprobs(model, lora, *args, prompt_end=b.prompt_end)

    runners = {
        "hf": hf, "primal": primal, "plain_primal": plain_primal,
        "dual": lambda: fp.sequence_logprobs_and_tangent(model, lora, direction, b),
        "jvp": lambda: fp.alpha_projections(model, lora, b, direction, method="jvp"),
    }  # fmt: skip
    if with_nf4:
        runners["dual_nf4"] = lambda: fp.sequence_logprobs_and_tangent(nf4_model, lora, direction, b)
    return runners


def check(model, batch) -> dict[str, float]:
    """Relative errors of the fast paths against torch.func.jvp / autograd over the plain forward."""
    lora, direction = model.lora, random_direction(model.lora)
    S_of = lambda lo: fp.sequence_logprobs(model, lo, batch)  # noqa: E731
    ref, ref_dot = torch.func.jvp(S_of, (lora,), (direction,))
    S, S_dot = fp.sequence_logprobs_and_tangent(model, lora, direction, batch)
    with torch.no_grad():
        fast = fp.sequence_logprobs(model, lora, batch, derivatives=False)
    err = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    return {"dual_S": err(S, ref), "dual_S_dot": err(S_dot, ref_dot), "primal_S": err(fast, ref)}


def time_interleaved(runners, rounds: int, seed: int = 0) -> dict[str, dict[str, list[float]]]:
    """Wall and process CPU seconds of each runner, `rounds` times in a shuffled order (CPU time
    counts only this process's threads, so other jobs on the machine inflate it less)."""
    for run in runners.values():  # warm-up
        run()
    times, order, rng = {k: {"wall": [], "cpu": []} for k in runners}, list(runners), random.Random(seed)
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            start, start_cpu = time.perf_counter(), time.process_time()
            runners[name]()
            times[name]["cpu"].append(time.process_time() - start_cpu)
            times[name]["wall"].append(time.perf_counter() - start)
    return times


@contextmanager
def labelled(module, name: str, label: str):
    """Wrap module.name in a torch.profiler record_function (bench-only instrumentation)."""
    original = getattr(module, name)

    def wrapped(*a, **k):
        with torch.profiler.record_function(label):
            return original(*a, **k)

    setattr(module, name, wrapped)
    try:
        yield
    finally:
        setattr(module, name, original)


def profile_shares(run) -> dict[str, float]:
    """Share of one call's CPU time in matmuls (self time of mm/bmm/addmm/baddbmm), in attention
    (inside attention_dual / attention_fast) and in the head."""
    with (
        labelled(dual, "attention_dual", "attention"), labelled(fast_primal, "attention_fast", "attention"),
        labelled(dual, "head_logprobs_tangent", "head"), labelled(fast_primal, "head_logprobs", "head"),
        torch.profiler.profile() as prof,
    ):  # fmt: skip
        with torch.profiler.record_function("total"):
            run()
    by_name = {e.key: e for e in prof.key_averages()}
    total = by_name["total"].cpu_time_total
    matmul = sum(by_name[k].self_cpu_time_total for k in MATMULS if k in by_name)
    share = lambda k: by_name[k].cpu_time_total / total if k in by_name else 0.0  # noqa: E731
    return {
        "total_ms": total / 1e3,
        "matmul": matmul / total,
        "attention": share("attention"),
        "head": share("head"),
    }


def summarize(times: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, float]]:
    """Medians and [min, max] of wall and CPU time; ratios of medians to hf (and dual/primal, nf4/dual)."""
    base = {k: statistics.median(times["hf"][k]) for k in ("wall", "cpu")}
    out = {}
    for name, kinds in times.items():
        ts, cpu = kinds["wall"], kinds["cpu"]
        med, med_cpu = statistics.median(ts), statistics.median(cpu)
        out[name] = {"median_s": med, "min_s": min(ts), "max_s": max(ts), "x_hf": med / base["wall"],
                     "cpu_median_s": med_cpu, "cpu_min_s": min(cpu), "cpu_max_s": max(cpu),
                     "cpu_x_hf": med_cpu / base["cpu"]}  # fmt: skip
    for kind in ("", "cpu_"):
        out["dual"][f"{kind}x_primal"] = out["dual"][f"{kind}median_s"] / out["primal"][f"{kind}median_s"]
        if "dual_nf4" in out:
            out["dual_nf4"][f"{kind}x_dual"] = out["dual_nf4"][f"{kind}median_s"] / out["dual"][f"{kind}median_s"]
    return out


def long_point(seq: int, responses: int, threads: int) -> dict:
    """One fresh-process point of the long-T sweep: 1 prompt (64 tokens) x `responses` responses
    filling T columns; wall and process CPU time (less sensitive to other processes) and peak RSS
    over the loaded model of alpha_projections(method="jvp")."""
    torch.set_num_threads(threads)
    model = make_model("smollm2")
    gen = torch.Generator().manual_seed(0)
    tokens = lambda n: torch.randint(0, model.vocab_size, (n,), generator=gen).tolist()  # noqa: E731
    batch = fp.make_batch(
        [tokens(64)], [[tokens(seq - 64) for _ in range(responses)]], advantages=[[1.0] * responses]
    )
    direction = random_direction(model.lora)
    reset = reset_peak_rss()
    before, start, start_cpu = current_rss(), time.perf_counter(), time.process_time()
    s = fp.alpha_projections(model, model.lora, batch, direction, loss="y", method="jvp")
    seconds, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    return {"T": seq, "rows": responses, "seconds": seconds, "cpu_seconds": cpu, "peak_mib": (peak_rss() - before) / 2**20,
            "rss_before_mib": before / 2**20, "hwm_reset": reset, "finite": bool(torch.isfinite(s).all())}  # fmt: skip


def long_sweep(seqs: list[int], responses: int, threads: int) -> list[dict]:
    """`long_point` of each T in a fresh subprocess (same interpreter, environment, LD_PRELOAD)."""
    out = []
    for seq in seqs:
        cmd = [sys.executable, __file__, "--long-point", str(seq), "--responses", str(responses),
               "--threads", str(threads)]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"  T={seq}: {out[-1]}")
    return out


def plot(report: dict, path: str) -> None:
    """Ratios to hf per point (left) and the long-T sweep's time and peak memory (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    names = ["primal", "plain_primal", "dual", "jvp", "dual_nf4"]
    seqs = list(report["points"])
    for i, seq in enumerate(seqs):
        times = report["points"][seq]["times"]
        xs = [j + 0.35 * i for j, n in enumerate(names) if n in times]
        left.bar(xs, [times[n]["x_hf"] for n in names if n in times], width=0.35, label=f"T={seq}")
    if not seqs:
        left.axis("off")
    left.axhline(1.0, color="k", lw=0.8)
    left.set_xticks(range(len(names)), names)
    left.set_ylabel("median time / transformers eager forward")
    left.set_title(f"{report['size']}, 16 rows, {report['threads']} threads (contended)")
    left.legend()
    sweep = report.get("long", [])
    if sweep:
        ts = [p["T"] for p in sweep]
        right.loglog(ts, [p["seconds"] for p in sweep], "o-", label="jvp time (s)")
        right.loglog(ts, [p["peak_mib"] / 1024 for p in sweep], "s-", label="jvp peak over model (GB)")
        right.loglog(
            ts, [sweep[0]["seconds"] * (t / ts[0]) ** 2 for t in ts], "k:", label="T² from the first"
        )
        right.set_xlabel("T (tokens per row)")
        right.set_title(f"alpha_projections(method='jvp'), 1 prompt x {sweep[0]['rows']}")
        right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["smollm2", "small"], default="smollm2")
    parser.add_argument("--seq", type=int, nargs="*", default=[128, 512])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-nf4", action="store_true", help="skip the NF4 dual")
    parser.add_argument("--profile", action="store_true", help="matmul / attention / head shares")
    parser.add_argument("--long", type=int, nargs="*", default=[], help="long-T sweep (fresh processes)")
    parser.add_argument("--responses", type=int, default=4, help="responses per prompt in the long sweep")
    parser.add_argument("--long-point", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help="write <out>.json and <out>.png")
    args = parser.parse_args()
    if args.long_point is not None:
        print(json.dumps(long_point(args.long_point, args.responses, args.threads)))
        return
    torch.set_num_threads(args.threads)
    model = make_model(args.size)
    nf4_model = None if args.no_nf4 else make_model(args.size, "nf4")
    report = {"size": args.size, "torch": torch.__version__, "threads": args.threads, "allocator": allocator(),
              "rounds": args.rounds, "points": {}}  # fmt: skip
    print(f"{args.size}; torch {torch.__version__}, {args.threads} threads; {report['allocator']}")
    for seq in args.seq:
        batch = bench_batch(args.prompts, seq, model.vocab_size, group=2)
        point = {"rows": batch.input_ids.shape[0] * batch.input_ids.shape[1], "check": check(model, batch)}
        runners = make_runners(model, nf4_model, batch, nf4_model is not None)
        point["times"] = summarize(time_interleaved(runners, args.rounds))
        if args.profile:
            point["profile"] = {k: profile_shares(runners[k]) for k in ("hf", "primal", "dual")}
        point["load_average"] = os.getloadavg()[0]
        report["points"][seq] = point
        print(f"T={seq}: {point['rows']} rows; errors {point['check']}; load {point['load_average']:.1f}")
        for name, t in point["times"].items():
            extra = "".join(f"  {k} {v:.2f}" for k, v in t.items() if k.endswith(("x_primal", "x_dual")))
            print(f"  {name:>12}: wall {t['median_s']:7.3f} s [{t['min_s']:.3f}, {t['max_s']:.3f}] {t['x_hf']:.2f} x hf;"
                  f" cpu {t['cpu_median_s']:7.3f} s [{t['cpu_min_s']:.3f}, {t['cpu_max_s']:.3f}]"
                  f" {t['cpu_x_hf']:.2f} x hf{extra}")  # fmt: skip
        for name, p in point.get("profile", {}).items():
            print(f"  profile {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in p.items()))
    if args.long:
        report["long"] = long_sweep(args.long, args.responses, args.threads)
    if args.out:
        with open(f"{args.out}.json", "w") as f:
            json.dump(report, f, indent=1)
        plot(report, f"{args.out}.png")


if __name__ == "__main__":
    main()
