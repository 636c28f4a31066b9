"""Speed of the dual forward and the fast primal against transformers' eager forward (issue 17).

Run: ``python bench/dual_speed.py [--size smollm2|small] [--seq 128 512] [--rounds 7] [--profile]
[--out bench/results/dual_speed]``, optionally under
``LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2`` (the allocator in use is printed and saved).
Models (random weights, no download; LoRA r=8, alpha=16 on all 7 projections, both factors non-zero):
``smollm2`` = SmolLM2-135M's shape (Llama, hidden 576, 30 layers, 9/3 heads, head_dim 64, MLP 1536,
vocab 49152, tied); ``small`` = DESIGN §3's Qwen2 (hidden 256, 4 layers, vocab 4096). Batch: 8 prompts x
2 responses, T columns, ragged (prompts T/8..T/4, responses T/2..3T/4: left and right padding).
Timed in one process, the order shuffled every round, medians and [min, max] of ``--rounds``: wall and
process CPU time (the latter less inflated by other jobs), and minor page faults per call:

- ``hf``           transformers eager forward of the PEFT twin (logits at every position), no_grad
- ``primal``       ``fp.sequence_logprobs(derivatives=False)`` (the fast primal)
- ``plain_primal`` the same S through the plain forward (``grouped_logprobs``), no_grad
- ``dual``         ``fp.sequence_logprobs_and_tangent`` (what ``method="jvp"`` runs)
- ``jvp``          ``fp.alpha_projections(method="jvp")``
- ``dual_nf4``     the dual on the same model with NF4 base linears

On this shared 2-core machine other processes inflate times; ratios of interleaved runs are what
the bench reports (the load average is printed). Each of issue 17's bars (`BARS`) is reported as
the ratio of medians and as the median [min, max] of the paired per-round ratios; `matmul_gflops`
gives each runner's matmul FLOPs (equal to torch's FlopCounterMode, tests/test_benchmark.py), i.e.
the ratios each would have at one FLOP rate. ``--profile`` splits one call of hf, primal and dual
into matmul, attention and head shares with torch.profiler. The JSON keeps the raw rounds and the
commit; ``--replot A.json B.json --out C`` merges runs into one table and plot.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager

import torch
from harness.memory import current_rss, peak_rss, reset_peak_rss
from harness.points import bench_batch, bench_model, random_direction

import functional_probe as fp
from functional_probe.logprobs import grouped_logprobs
from functional_probe.model import dual, fast_primal, head_stream
from functional_probe.model.dual_attention import BLOCK_Q
from functional_probe.model.packing import needed
from functional_probe.testing import peft_twin

QKV = ("q_proj", "k_proj", "v_proj")
MATMULS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::addmm_", "aten::baddbmm", "aten::baddbmm_")
# Issue 17's bars: name -> (numerator runner, denominator runner, the ratio not to exceed).
BARS = {
    "dual / hf": ("dual", "hf", 1.5),
    "dual / primal": ("dual", "primal", 2.1),
    "primal / hf": ("primal", "hf", 0.85),
    "dual_nf4 / dual": ("dual_nf4", "dual", 1.1),
}


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


def minor_faults() -> int:
    """This process's minor page faults so far (getrusage ru_minflt): first touches of fresh pages."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_interleaved(runners, rounds: int, seed: int = 0) -> dict[str, dict[str, list[float]]]:
    """Wall and process CPU seconds and minor page faults of each runner, `rounds` times in a
    shuffled order (CPU time counts only this process's threads, so other jobs on the machine
    inflate it less; faults count the fresh pages a call touches, which reused buffers avoid)."""
    for run in runners.values():  # warm-up
        run()
    kinds = ("wall", "cpu", "faults")
    times, order, rng = {k: {kind: [] for kind in kinds} for k in runners}, list(runners), random.Random(seed)
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            faults, start, start_cpu = minor_faults(), time.perf_counter(), time.process_time()
            runners[name]()
            times[name]["cpu"].append(time.process_time() - start_cpu)
            times[name]["wall"].append(time.perf_counter() - start)
            times[name]["faults"].append(minor_faults() - faults)
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
        labelled(head_stream, "head_logprobs_tangent", "head"), labelled(fast_primal, "head_logprobs", "head"),
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


def paired_ratios(a: list[float], b: list[float]) -> list[float]:
    """a[i] / b[i] per round (both runners timed in the same shuffled round)."""
    return [x / y for x, y in zip(a, b, strict=True)]


def summarize(times: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, float]]:
    """Medians and [min, max] of wall and CPU time; ratios of medians to hf and the range of the
    paired per-round ratios to hf (paired_x_hf_min/max, wall); dual/primal and nf4/dual of medians."""
    base = {k: statistics.median(times["hf"][k]) for k in ("wall", "cpu")}
    out = {}
    for name, kinds in times.items():
        ts, cpu = kinds["wall"], kinds["cpu"]
        med, med_cpu = statistics.median(ts), statistics.median(cpu)
        paired = paired_ratios(ts, times["hf"]["wall"])
        out[name] = {"median_s": med, "min_s": min(ts), "max_s": max(ts), "x_hf": med / base["wall"],
                     "paired_x_hf_min": min(paired), "paired_x_hf_max": max(paired),
                     "cpu_median_s": med_cpu, "cpu_min_s": min(cpu), "cpu_max_s": max(cpu),
                     "cpu_x_hf": med_cpu / base["cpu"]}  # fmt: skip
        if kinds.get("faults"):  # files before the fault count have none
            out[name]["faults_median"] = statistics.median(kinds["faults"])
    for kind in ("", "cpu_"):
        out["dual"][f"{kind}x_primal"] = out["dual"][f"{kind}median_s"] / out["primal"][f"{kind}median_s"]
        if "dual_nf4" in out:
            out["dual_nf4"][f"{kind}x_dual"] = out["dual_nf4"][f"{kind}median_s"] / out["dual"][f"{kind}median_s"]
    return out


def bar_ratios(times: dict[str, dict[str, list[float]]]) -> dict[str, dict]:
    """Each of `BARS` from the raw rounds: the ratio of the medians and, since the order is shuffled
    within a round, the paired per-round ratios num[i] / den[i] (median, min, max), wall and CPU.
    met: both the ratio of medians and the paired median of wall time are at or under the bar."""
    out = {}
    for name, (num, den, bar) in BARS.items():
        if num not in times:
            continue
        entry: dict = {"bar": bar}
        for kind in ("wall", "cpu"):
            a, b = times[num][kind], times[den][kind]
            paired = paired_ratios(a, b)
            entry[kind] = {
                "of_medians": statistics.median(a) / statistics.median(b),
                "paired_median": statistics.median(paired), "paired_min": min(paired), "paired_max": max(paired),
            }  # fmt: skip
        entry["met"] = max(entry["wall"]["of_medians"], entry["wall"]["paired_median"]) <= bar
        out[name] = entry
    return out


def matmul_gflops(model, batch) -> dict[str, float]:
    """Matmul GFLOPs (2 per multiply-add) of one call of hf, primal and dual on `batch`: the floor
    each would reach at one and the same FLOP rate. Counted: the body's linears (PEFT's unmerged
    LoRA in hf, x Aᵀ then Bᵀ: 2 FLOPs per factor entry and token; merged in ours, plus the dual's low-rank tangent terms u = x[Ȧ; A]ᵀ and
    u[B, Ḃ]ᵀ), attention scores and values (hf: every [T, T] pair; ours: the packed slots'
    block-causal query-block x key-prefix products, three in the dual per primal one: q kᵀ,
    q̇ kᵀ + q k̇ᵀ, e[v, v̇] + ės v) and the head (hf: every position; primal: the M response
    positions; dual: z = hWᵀ and pᵀW); ours skip the last layer's o and MLP outside the M
    positions and merge LoRA once per pass. Elementwise work, norms and softmax are not counted."""
    cfg = model.hf_config
    dm, f, layers, vocab = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    heads, kv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or dm // heads
    q, k, o, mlp = (heads * d, dm), (kv * d, dm), (dm, heads * d), [(f, dm), (f, dm), (dm, f)]
    shapes = [q, k, k, o, *mlp]  # (out, in) of q, k, v, o, gate, up, down
    dense, qkv = sum(a * b for a, b in shapes), sum(a * b for a, b in shapes[:3])
    # per layer, entries of the LoRA factors (all of them; of q/k/v): r·(in + out) per projection
    lora = sum(v.numel() for v in model.lora.values()) // layers
    qkv_lora = sum(v.numel() for k, v in model.lora.items() if k.split(".")[-4] in QKV) // layers
    rows, t = batch.input_ids.shape[0] * batch.input_ids.shape[1], batch.input_ids.shape[2]
    keep, head_rows, _, _ = needed(
        batch.attention_mask.flatten(0, 1), batch.response_mask.flatten(0, 1), batch.prompt_end
    )
    n, m, width = int(keep.sum()), head_rows.numel(), int(keep.sum(-1).max())
    blocks = [(i, min(i + BLOCK_Q, width)) for i in range(0, width, BLOCK_Q)]
    pairs_ours = rows * sum((i1 - i0) * i1 for i0, i1 in blocks)  # query-key products per head
    attention = lambda pairs: 2 * 2 * pairs * heads * d * layers  # noqa: E731  (s = q kᵀ and p v)
    head, merge = 2 * vocab * dm, 2 * rank_of(model) * dense * layers  # merge: W + s·B A per projection
    # ours: the last layer's o and MLP only at the M response positions (nothing else feeds S)
    body = 2 * (n * dense * layers - (n - m) * (dense - qkv))
    body_lora = 2 * (n * lora * layers - (n - m) * (lora - qkv_lora))
    gflops = {
        "hf": 2 * rows * t * (dense + lora) * layers + attention(rows * t * t) + rows * t * head,
        "primal": body + merge + attention(pairs_ours) + m * head,
        "dual": 2 * body - 2 * n * qkv + 2 * body_lora + merge + 3 * attention(pairs_ours) + 2 * m * head,
    }
    return {name: v / 1e9 for name, v in gflops.items()}


def rank_of(model) -> int:
    """The LoRA rank shared by every projection (the merge count assumes one); ValueError if not."""
    ranks = {v.shape[0] for k, v in model.lora.items() if "lora_A" in k}
    if len(ranks) != 1:
        raise ValueError(f"LoRA ranks {sorted(ranks)}; matmul_gflops expects one rank for all projections")
    return ranks.pop()


def commit() -> str:
    """The checkout's commit (short hash, '+dirty' with uncommitted changes), or 'unknown'."""

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], capture_output=True, text=True, cwd=os.path.dirname(__file__))

    head = git("rev-parse", "--short", "HEAD")
    if head.returncode:
        return "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    return head.stdout.strip() + ("+dirty" if dirty else "")


def long_point(seq: int, responses: int, threads: int) -> dict:
    """One fresh-process point of the long-T sweep: 1 prompt (64 tokens) x `responses` responses
    filling T columns; wall and process CPU time (less sensitive to other processes) and peak RSS
    over the loaded model of alpha_projections(method="jvp")."""
    torch.set_num_threads(threads)
    model = bench_model("smollm2")
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


def point_label(point: dict) -> str:
    """'T=128, 16 rows, 21 rounds, load 0.9 @ e28ca89' (what the plot's legend names a point by)."""
    return (f"T={point['T']}, {point['rows']} rows, {point['rounds']} rounds, "
            f"load {point['load_average']:.1f} @ {point.get('commit', '?')}")  # fmt: skip


def merge_reports(reports: list[dict]) -> dict:
    """One report holding every point of `reports` (runs of the same size), keyed by `point_label`,
    so that two runs at the same T stay apart; each point keeps its own rounds, load and commit."""
    sizes = {r["size"] for r in reports}
    if len(sizes) != 1:
        raise ValueError(f"reports of different sizes {sorted(sizes)}; expected one size")
    merged = {k: reports[0][k] for k in ("size", "torch", "threads", "allocator")}
    merged["points"] = {}
    for r in reports:
        for seq, point in r["points"].items():
            point = {"rounds": r.get("rounds"), "commit": r.get("commit"), "T": int(seq), **point}
            merged["points"][point_label(point)] = point
    merged["long"] = [p for r in reports for p in r.get("long", [])]
    return merged


def plot(report: dict, path: str) -> None:
    """Median time / transformers' per runner and point (bars; whiskers: the paired per-round
    ratios' range), issue 17's bars as short lines; the long-T sweep's time and memory on a second
    panel when the report has one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweep = report.get("long", [])
    fig, axes = plt.subplots(1, 2 if sweep else 1, figsize=(12 if sweep else 8, 4.5), squeeze=False)
    left = axes[0, 0]
    names = ["primal", "plain_primal", "dual", "jvp", "dual_nf4"]
    points = report["points"]
    width = 0.8 / max(len(points), 1)
    for i, point in enumerate(points.values()):
        times = point["times"]
        js = [j for j, n in enumerate(names) if n in times]
        ratios = [times[names[j]]["x_hf"] for j in js]
        low = [r - times[names[j]].get("paired_x_hf_min", r) for r, j in zip(ratios, js, strict=True)]
        high = [times[names[j]].get("paired_x_hf_max", r) - r for r, j in zip(ratios, js, strict=True)]
        dp = times["dual"]["x_primal"]
        left.bar([j + width * (i - (len(points) - 1) / 2) for j in js], ratios, width=width,
                 yerr=[low, high], capsize=2, label=f"{point_label(point)}; dual/primal {dp:.2f}")  # fmt: skip
    left.axhline(1.0, color="k", lw=0.8)
    against_hf = {num: bar for num, den, bar in BARS.values() if den == "hf"}
    against_hf["jvp"] = against_hf["dual"]  # what method="jvp" runs
    for name, bar in against_hf.items():
        j = names.index(name)
        left.hlines(bar, j - 0.45, j + 0.45, colors="r", linestyles="--", lw=1)
    left.set_xticks(range(len(names)), names)
    left.set_ylabel("time / transformers eager forward")
    left.set_title(f"{report['size']}, {report['threads']} threads; red: issue 17's bars "
                   f"(dual/primal ≤ {BARS['dual / primal'][2]})", fontsize=9)  # fmt: skip
    left.set_ylim(0, left.get_ylim()[1] * 1.3)  # room for the legend above the bars
    left.legend(fontsize=7, loc="upper left")
    if sweep:
        right = axes[0, 1]
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
    plt.close(fig)


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
    parser.add_argument("--replot", nargs="+", default=None, metavar="JSON",
                        help="merge these reports into <out>.json/.png (no timing)")  # fmt: skip
    args = parser.parse_args()
    if args.replot:
        if not args.out:
            parser.error("--replot needs --out")
        reports = []
        for path in args.replot:
            with open(path) as f:
                reports.append(json.load(f))
        write(merge_reports(reports), args.out)
        return
    if args.long_point is not None:
        print(json.dumps(long_point(args.long_point, args.responses, args.threads)))
        return
    torch.set_num_threads(args.threads)
    model = bench_model(args.size)
    nf4_model = None if args.no_nf4 else bench_model(args.size, "nf4")
    report = {"size": args.size, "torch": torch.__version__, "threads": args.threads, "allocator": allocator(),
              "rounds": args.rounds, "commit": commit(), "points": {}}  # fmt: skip
    print(f"{args.size}; torch {torch.__version__}, {args.threads} threads; {report['allocator']}; "
          f"commit {report['commit']}")  # fmt: skip
    for seq in args.seq:
        batch = bench_batch(args.prompts, seq, model.vocab_size, group=2)
        point = {"T": seq, "rows": batch.input_ids.shape[0] * batch.input_ids.shape[1], "rounds": args.rounds,
                 "commit": report["commit"],
                 "check": check(model, batch), "gflops": matmul_gflops(model, batch)}  # fmt: skip
        runners = make_runners(model, nf4_model, batch, nf4_model is not None)
        load_before = os.getloadavg()[0]
        point["raw"] = time_interleaved(runners, args.rounds)
        point["times"], point["bars"] = summarize(point["raw"]), bar_ratios(point["raw"])
        if args.profile:
            point["profile"] = {k: profile_shares(runners[k]) for k in ("hf", "primal", "dual")}
        point["load_average"], point["load_before"] = os.getloadavg()[0], load_before
        report["points"][seq] = point
        print(f"T={seq}: {point['rows']} rows; errors {point['check']}; load {load_before:.1f} -> "
              f"{point['load_average']:.1f}; matmul GFLOPs " + ", ".join(f"{k} {v:.0f}" for k, v in point["gflops"].items()))  # fmt: skip
        for name, t in point["times"].items():
            extra = "".join(f"  {k} {v:.2f}" for k, v in t.items() if k.endswith(("x_primal", "x_dual")))
            print(f"  {name:>12}: wall {t['median_s']:7.3f} s [{t['min_s']:.3f}, {t['max_s']:.3f}] {t['x_hf']:.2f} x hf;"
                  f" cpu {t['cpu_median_s']:7.3f} s [{t['cpu_min_s']:.3f}, {t['cpu_max_s']:.3f}]"
                  f" {t['cpu_x_hf']:.2f} x hf; minor faults {t['faults_median'] / 1e3:.0f}k{extra}")  # fmt: skip
        for name, b in point["bars"].items():
            w, c = b["wall"], b["cpu"]
            print(f"  bar {name:>15} <= {b['bar']}: {'met' if b['met'] else 'MISSED'}; wall {w['of_medians']:.2f} of"
                  f" medians, paired {w['paired_median']:.2f} [{w['paired_min']:.2f}, {w['paired_max']:.2f}];"
                  f" cpu {c['of_medians']:.2f}, paired {c['paired_median']:.2f}")  # fmt: skip
        for name, p in point.get("profile", {}).items():
            print(f"  profile {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in p.items()))
    if args.long:
        report["long"] = long_sweep(args.long, args.responses, args.threads)
    if args.out:
        write(report, args.out)


def write(report: dict, out: str) -> None:
    """<out>.json and <out>.png."""
    with open(f"{out}.json", "w") as f:
        json.dump(report, f, indent=1)
    plot(report, f"{out}.png")


if __name__ == "__main__":
    main()
