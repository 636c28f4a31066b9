"""Long responses: time and peak memory of `mean_grad`, `alpha_projections(method="jvp")` and the
transformers + PEFT anchor (SDPA, gradient checkpointing, one forward+backward of the same rows).

Model: random weights with SmolLM2-135M's shape (hidden 576, 30 layers, 9 query / 3 kv heads,
head_dim 64, MLP 1536, vocab 49152, tied embeddings), LoRA r=8 on all 7 projections, fp32.
Batch: 1 prompt of 64 tokens × 4 responses of T tokens (rows of 64 + T columns), X loss.

Each memory point runs in a fresh subprocess: peak RSS (VmHWM) over the RSS once model and batch
are loaded. Timings on this shared machine are contended, so the number to read is the ratio
ours / anchor from a separate subprocess that runs the two alternately (anchor, ours, anchor,
ours) and also checks that the two gradients agree. Every subprocess holds /tmp/fp_bench.lock
at nice -10 (the benchmark lock of this machine), so each point is one short locked run; points
already in the JSON are skipped (delete them to remeasure). The library's defaults are what is
measured: no allocator variable is set unless --mmap-threshold is given.

Run: `python bench/long_sequences.py [--T 512 1024 2048 4096] [--jvp-max-T 4096] [--no-ratio]
[--mmap-threshold 1048576]` (the allocator setting applies to every child, the anchor included).
Writes bench/results/long_sequences.{json,md,png} (merging with points already there).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
PROMPT, GROUP, RANK = 64, 4, 8
MODES = ("mean_grad", "jvp", "anchor")


def smollm2_config(vocab: int = 49152, layers: int = 30):
    """A transformers LlamaConfig with SmolLM2-135M's shape."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
        num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
        rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
    )  # fmt: skip


def smollm2_model(vocab: int = 49152, layers: int = 30, dtype=None):
    """Random SmolLM2-shaped FunctionalModel, LoRA r=8 (both factors non-zero), in `dtype`
    (None: fp32; the same random weights in any dtype, e.g. float64 for a reference)."""
    import torch

    from functional_probe.model.base_weights import dense_or_nf4
    from functional_probe.model.loading import build_model
    from functional_probe.model.tiny import tiny_lora, tiny_state_dict

    config = smollm2_config(vocab, layers)
    state = tiny_state_dict(config)
    state["model.embed_tokens.weight"] = state.pop("lm_head.weight")  # tied: the head's scale
    dtype = dtype or torch.float32
    frozen = dense_or_nf4(state.get, None, dtype, "cpu")
    return build_model(config, state.get, frozen, tiny_lora(config, rank=RANK, alpha=2.0 * RANK), dtype=dtype)


def long_batch(T: int, vocab: int = 49152, seed: int = 0):
    """1 prompt of PROMPT tokens × GROUP responses of exactly T tokens, random advantages."""
    import torch

    import functional_probe as fp

    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, vocab, (1, PROMPT), generator=gen).tolist()
    responses = torch.randint(0, vocab, (1, GROUP, T), generator=gen).tolist()
    return fp.make_batch(prompt, responses, advantages=torch.randn(1, GROUP, generator=gen).tolist())


def anchor_model(model):
    """transformers + PEFT twin with SDPA and (non-reentrant) gradient checkpointing, train mode."""
    from functional_probe.testing import peft_twin

    peft_model = peft_twin(model, attn_implementation="sdpa")
    peft_model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return peft_model.train()


def runner(mode: str, model, batch):
    """A zero-argument call of `mode` returning what it computes."""
    import torch
    from harness.baselines import peft_sequence_logprobs, seed_x_losses, trainable

    import functional_probe as fp

    lora = model.lora
    if mode == "mean_grad":
        return lambda: fp.mean_grad(model, lora, batch, loss="x")
    if mode == "jvp":
        gen = torch.Generator().manual_seed(1)
        d = {k: torch.randn(v.shape, generator=gen) for k, v in lora.items()}
        return lambda: fp.alpha_projections(model, lora, batch, d, method="jvp")
    peft_model = anchor_model(model)
    params = trainable(peft_model)

    def anchor():
        loss = seed_x_losses(peft_sequence_logprobs(peft_model, batch), batch).sum()
        return dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))

    return anchor


def measure_point(mode: str, T: int) -> dict:
    """In this (fresh) process: peak RSS over the loaded model and wall time of one call."""
    import torch
    from harness.memory import current_rss, peak_rss, reset_peak_rss

    torch.set_num_threads(2)
    model, batch = smollm2_model(), long_batch(T)
    call = runner(mode, model, batch)
    reset_peak_rss()
    base = current_rss()
    start = time.perf_counter()
    call()
    seconds = time.perf_counter() - start
    return {"mode": mode, "T": T, "peak_gb": (peak_rss() - base) / 2**30, "seconds": seconds} | conditions()


def conditions() -> dict:
    """What else shaped a measurement: the allocator setting and the 1-minute load average."""
    import os

    return {"MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_"), "load_average": os.getloadavg()[0]}


def measure_ratio(T: int, repeats: int = 2) -> dict:
    """mean_grad and the anchor alternately in one process: times, ratio of medians, agreement."""
    import statistics

    import torch

    torch.set_num_threads(2)
    model, batch = smollm2_model(), long_batch(T)
    calls = {m: runner(m, model, batch) for m in ("anchor", "mean_grad")}
    times, outs = {m: [] for m in calls}, {}
    for _ in range(repeats):
        for m, call in calls.items():
            start = time.perf_counter()
            outs[m] = call()
            times[m].append(time.perf_counter() - start)
    ref, got = outs["anchor"], outs["mean_grad"]
    rel = max(((got[k] - ref[k]).double().norm() / ref[k].double().norm()).item() for k in ref)
    med = {m: statistics.median(v) for m, v in times.items()}
    return {"T": T, "times": times, "ratio": med["mean_grad"] / med["anchor"], "grad_rel_err": rel} | conditions()


def in_subprocess(*args: str, mmap_threshold: int | None = None) -> dict:
    """Run this file with `args` in a fresh process under the benchmark lock; its JSON result.

    `mmap_threshold` (bytes) sets glibc's MALLOC_MMAP_THRESHOLD_ for the child: a fixed
    threshold makes every allocation above it an mmap returned to the OS on free. glibc's
    default raises the threshold to 32 MB as large blocks are freed (functional_probe/model/
    allocator.py: what the library does about it).
    """
    import os

    env = dict(os.environ)
    if mmap_threshold is not None:
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    env["OMP_NUM_THREADS"] = "2"
    cmd = ["flock", "/tmp/fp_bench.lock", "nice", "-n", "-10", sys.executable, __file__, *args]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        errors = [line for line in out.stderr.splitlines() if "Error" in line]
        return {"error": errors[-1] if errors else f"exit code {out.returncode} (-9: killed, e.g. out of memory)"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_report(results: dict) -> None:
    """bench/results/long_sequences.{json,md,png} from all points measured so far."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "long_sequences.json").write_text(json.dumps(results, indent=2))
    Ts = sorted({int(t) for t in results["points"]} | {int(t) for t in results["ratios"]})
    lines = [
        "# Long responses: SmolLM2-135M-shaped random model, 1 prompt x 4 responses, fp32, LoRA r=8",
        "",
        f"Machine: {results['machine']}. Timings contended (2 cores shared with other jobs): read the",
        "ratio column (mean_grad / anchor, alternated in one process), not absolute seconds.",
        "",
        "| T (response tokens) | mean_grad peak GB | jvp peak GB | anchor peak GB | mean_grad s | jvp s | anchor s "
        "| ratio mean_grad/anchor | grad rel err |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(T: int, mode: str, key: str, fmt: str) -> str:
        point = results["points"].get(str(T), {}).get(mode)
        if point is None:
            return "—"
        return "error" if "error" in point else format(point[key], fmt)

    for T in Ts:
        r = results["ratios"].get(str(T), {})
        ratio = "—" if not r or "error" in r else f"{r['ratio']:.2f}"
        err = "—" if not r or "error" in r else f"{r['grad_rel_err']:.1e}"
        lines.append(
            f"| {T} | {cell(T, 'mean_grad', 'peak_gb', '.2f')} | {cell(T, 'jvp', 'peak_gb', '.2f')} | "
            f"{cell(T, 'anchor', 'peak_gb', '.2f')} | {cell(T, 'mean_grad', 'seconds', '.1f')} | "
            f"{cell(T, 'jvp', 'seconds', '.1f')} | {cell(T, 'anchor', 'seconds', '.1f')} | {ratio} | {err} |"
        )
    lines += ["", "Anchor: transformers + PEFT, attn_implementation='sdpa', gradient checkpointing (non-reentrant),",
              "full logits + log_softmax as the seed computed S. Peak = VmHWM over the RSS with model and batch loaded."]  # fmt: skip
    lines += [f"- {what}: {why}" for what, why in results.get("notes", {}).items()]  # left out, and why
    (RESULTS / "long_sequences.md").write_text("\n".join(lines) + "\n")
    plot(results, Ts)


def plot(results: dict, Ts: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_mem, ax_time) = plt.subplots(1, 2, figsize=(10, 4))
    for mode in MODES:
        pts = [(T, results["points"].get(str(T), {}).get(mode)) for T in Ts]
        pts = [(T, p) for T, p in pts if p and "error" not in p]
        if pts:
            ax_mem.plot([T for T, _ in pts], [p["peak_gb"] for _, p in pts], "o-", label=mode)
            ax_time.plot([T for T, _ in pts], [p["seconds"] for _, p in pts], "o-", label=mode)
    for ax, label in ((ax_mem, "peak RSS over model (GB)"), (ax_time, "seconds, one call (contended)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("response tokens T (4 rows)")
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle("SmolLM2-135M-shaped, 1 prompt x 4 responses, fp32")
    fig.tight_layout()
    fig.savefig(RESULTS / "long_sequences.png", dpi=100)


def done(point: dict | None) -> bool:
    return point is not None and "error" not in point


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--T", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--jvp-max-T", type=int, default=4096, help="skip jvp above this T (it may not fit)")
    parser.add_argument("--no-ratio", action="store_true")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--mmap-threshold", type=int, default=None,
                        help="glibc MALLOC_MMAP_THRESHOLD_ in bytes for every child, anchor included")  # fmt: skip
    args = parser.parse_args()
    from harness.memory import machine_info

    path = RESULTS / "long_sequences.json"
    results = json.loads(path.read_text()) if path.exists() else {"points": {}, "ratios": {}}
    results["machine"] = machine_info()
    for T in args.T:
        for mode in args.modes:
            if mode == "jvp" and T > args.jvp_max_T:
                continue
            if done(results["points"].get(str(T), {}).get(mode)):
                continue
            results["points"].setdefault(str(T), {})[mode] = in_subprocess("point", mode, str(T), mmap_threshold=args.mmap_threshold)
            print(T, mode, results["points"][str(T)][mode], flush=True)
            write_report(results)
        if not args.no_ratio and not done(results["ratios"].get(str(T))):
            results["ratios"][str(T)] = in_subprocess("ratio", str(T), str(args.repeats), mmap_threshold=args.mmap_threshold)
            print(T, "ratio", results["ratios"][str(T)], flush=True)
            write_report(results)


if __name__ == "__main__":
    if sys.argv[1:2] == ["point"]:
        print(json.dumps(measure_point(sys.argv[2], int(sys.argv[3]))))
    elif sys.argv[1:2] == ["ratio"]:
        print(json.dumps(measure_ratio(int(sys.argv[2]), int(sys.argv[3]))))
    else:
        main()
