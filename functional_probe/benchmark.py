"""Speed and peak memory of every projection method against `torch.autograd.grad` (issue 7).

Baselines are written the way the seed wrote them, on a plain PEFT `PeftModel` (the
`reference.peft_twin` of the model, whose LoRA parameters equal `model.lora`):

- ``autograd_alpha``: the α-trick — α = ones(N) (requires grad), per-prompt X losses Lx from
  the PEFT model's teacher-forced log-probs of the padded batch (full logits, log_softmax,
  DESIGN §1 transcribed), L = Σ α·Lx, g = autograd.grad(L, lora, create_graph=True),
  h = Σ <g, μY>, s = autograd.grad(h, α).
- ``autograd_loop``: one forward + `autograd.grad` per prompt, contracted with μY.
- ``opacus``: Opacus `GradSampleModule` on another PEFT twin: per-row gradients of Σ Lx
  (every row belongs to one prompt and c is under stop-gradient, so the rows of prompt n sum
  to ∇Lx[n]), contracted with μY.

Contenders are `alpha_projections(..., method=m)` for m in METHODS, on an fp32 base and on an
NF4 base ("nf4:<m>"). ``forward_eager`` (the PEFT twin's no-grad forward of the whole batch,
eager attention: the denominator of every "x forward") and ``forward_sdpa`` are timed beside them.

Timing: one process, a warm-up call (also the correctness check), then `repeats` rounds in
which every method runs once (round-robin, the starting method rotated each round), so every
ratio compares calls made under the same machine load. Memory: each (point, method) in a fresh
subprocess, peak RSS of one call minus the RSS just before it (the high-water mark is reset
through /proc/self/clear_refs where Linux allows, so building the model is not counted).

`bench/run.py` is the full sweep; `functional_probe.quick_bench` (`functional-probe bench`)
the quick subset.
"""

from __future__ import annotations

import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .alpha import METHODS, alpha_projections
from .batch import Batch, make_batch
from .model.functional import FunctionalModel
from .reference import peft_twin

BASELINES = ("autograd_alpha", "autograd_loop", "opacus")
FORWARDS = ("forward_eager", "forward_sdpa")
CONTENDERS = tuple(METHODS) + tuple(f"nf4:{m}" for m in METHODS)
ALL_METHODS = FORWARDS + BASELINES + CONTENDERS
SIZES = ("tiny", "small", "qwen05")
GROUP = 2
TOLERANCE = 1e-4


# ----------------------------------------------------------------------------- models, data


def bench_config(size: str):
    """The transformers config of a benchmark model: 'tiny' (`tiny_config`), 'small' (Qwen2,
    hidden 256, intermediate 704, 4 layers, 4/2 heads, vocab 4096 — DESIGN §3) or 'qwen05'
    (Qwen2.5-0.5B-shaped: hidden 896, 24 layers, 14/2 heads, intermediate 4864, vocab 151936, tied)."""
    from transformers import Qwen2Config

    from .model.tiny import tiny_config

    common = dict(max_position_embeddings=4096, rms_norm_eps=1e-6)
    if size == "tiny":
        return tiny_config()
    if size == "small":
        return Qwen2Config(vocab_size=4096, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                           **common)  # fmt: skip
    if size == "qwen05":
        return Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                           num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
                           rope_theta=1000000.0, **common)  # fmt: skip
    raise ValueError(f"size={size!r}; expected one of {SIZES}")


def bench_model(size: str, quantize: str | None = None, seed: int = 0) -> FunctionalModel:
    """Random base weights (`tiny_state_dict`; a tied head shares the head's scale) with LoRA
    r=8, alpha=16 on all 7 projections, both factors non-zero; base fp32 or NF4."""
    from .model.loading import build_model, dense_or_nf4
    from .model.tiny import tiny_lora, tiny_state_dict

    config = bench_config(size)
    state = tiny_state_dict(config, seed=seed)
    if config.tie_word_embeddings:
        state["model.embed_tokens.weight"] = state.pop("lm_head.weight")
    frozen = dense_or_nf4(state.get, quantize, torch.float32, "cpu")
    lora = tiny_lora(config, seed=seed, rank=8, alpha=16.0)
    model = build_model(config, state.get, frozen, lora)
    del state
    gc.collect()
    return model


def bench_batch(num_prompts: int, seq_len: int, vocab_size: int, group: int = GROUP, seed: int = 0) -> Batch:
    """N prompts x G responses of random tokens, exactly `seq_len` columns: prompt lengths in
    [T/8, T/4] and response lengths in [T/2, 3T/4] (the first of each at the maximum), so rows
    are left- and right-padded like real rollouts."""
    gen = torch.Generator().manual_seed(seed)
    p_max, r_max = seq_len // 4, seq_len - seq_len // 4

    def lengths(count: int, lo: int, hi: int) -> list[int]:
        out = torch.randint(lo, hi + 1, (count,), generator=gen).tolist()
        out[0] = hi
        return out

    def tokens(length: int) -> list[int]:
        return torch.randint(0, vocab_size, (length,), generator=gen).tolist()

    prompts = [tokens(n) for n in lengths(num_prompts, max(1, seq_len // 8), p_max)]
    resp_lens = lengths(num_prompts * group, max(1, seq_len // 2), r_max)
    responses = [[tokens(resp_lens[n * group + g]) for g in range(group)] for n in range(num_prompts)]
    advantages = torch.randn(num_prompts, group, generator=gen).tolist()
    return make_batch(prompts, responses, advantages=advantages)


def random_direction(lora: Mapping[str, Tensor], seed: int = 1) -> dict[str, Tensor]:
    """A fixed random direction shaped like the LoRA dict (stands in for μY)."""
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in lora.items()}


# ----------------------------------------------------------------------------- baselines


def flat_rows(batch: Batch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """input_ids, attention_mask (long), position_ids, response_mask as [N·G, T]."""
    n, g, t = batch.input_ids.shape
    flat = lambda x: x.reshape(n * g, t)  # noqa: E731
    return (flat(batch.input_ids), flat(batch.attention_mask).long(), flat(batch.position_ids),
            flat(batch.response_mask))  # fmt: skip


def peft_logits(peft_model, batch: Batch) -> Tensor:
    """The PEFT model's logits [N·G, T, V] on the padded batch (positions from the batch)."""
    ids, mask, pos, _ = flat_rows(batch)
    return peft_model(input_ids=ids, attention_mask=mask, position_ids=pos).logits


def peft_sequence_logprobs(peft_model, batch: Batch) -> Tensor:
    """S [N, G] the seed's way: full logits, full log_softmax, gather, masked sum."""
    ids, _, _, response = flat_rows(batch)
    logp = peft_logits(peft_model, batch)[:, :-1].float().log_softmax(-1)
    logp = logp.gather(-1, ids[:, 1:, None])[..., 0]
    return (logp * response[:, 1:]).sum(-1).reshape(batch.num_prompts, batch.group_size)


def seed_x_losses(S: Tensor, batch: Batch) -> Tensor:
    """DESIGN §1 transcribed (dr_grpo): w = S/Lmax, leave-one-out b, c = stopgrad(w − b),
    Lx[n] = −mean_g(c·S)."""
    G = S.shape[1]
    w = S / batch.max_lengths[:, None]
    b = (w.sum(1, keepdim=True) - w) / max(G - 1, 1)
    c = (w - b).detach()
    return -(c * S).mean(1)


def trainable(peft_model) -> dict[str, Tensor]:
    """The PEFT model's trainable parameters (its LoRA factors) by name."""
    return {n: p for n, p in peft_model.named_parameters() if p.requires_grad}


def autograd_alpha(peft_model, batch: Batch, direction: Mapping[str, Tensor]) -> Tensor:
    """The seed's α-trick with `torch.autograd.grad` (double reverse)."""
    params = trainable(peft_model)
    alpha = torch.ones(batch.num_prompts, requires_grad=True)
    L = (alpha * seed_x_losses(peft_sequence_logprobs(peft_model, batch), batch)).sum()
    g = torch.autograd.grad(L, list(params.values()), create_graph=True)
    h = sum((gk * direction[k]).sum() for k, gk in zip(params, g, strict=True))
    return torch.autograd.grad(h, alpha)[0].detach()


def autograd_loop(peft_model, batch: Batch, direction: Mapping[str, Tensor]) -> Tensor:
    """One forward and `torch.autograd.grad` per prompt (its G rows, padding trimmed)."""
    params = trainable(peft_model)
    out = []
    for n in range(batch.num_prompts):
        one = batch[n]
        Lx = seed_x_losses(peft_sequence_logprobs(peft_model, one), one)[0]
        g = torch.autograd.grad(Lx, list(params.values()))
        out.append(sum((gk * direction[k]).sum() for k, gk in zip(params, g, strict=True)).detach())
    return torch.stack(out)


def opacus_module(peft_model):
    """Opacus `GradSampleModule` around a PEFT model (per-row gradients, loss_reduction='sum')."""
    from opacus import GradSampleModule

    return GradSampleModule(peft_model, batch_first=True, loss_reduction="sum")


def opacus_projections(gsm, batch: Batch, direction: Mapping[str, Tensor]) -> Tensor:
    """Per-row gradients of Σ_n Lx[n] by Opacus hooks, summed per prompt, contracted with μY."""
    gsm.zero_grad(set_to_none=True)
    S = peft_sequence_logprobs(gsm, batch)
    seed_x_losses(S, batch).sum().backward()
    n, g = batch.num_prompts, batch.group_size
    s = torch.zeros(n)
    for name, p in gsm.named_parameters():
        if p.requires_grad:
            key = name.removeprefix("_module.")
            rows = p.grad_sample.reshape(n * g, -1) @ direction[key].reshape(-1)
            s += rows.reshape(n, g).sum(1)
    gsm.zero_grad(set_to_none=True)
    return s


def plain_forward(peft_model, batch: Batch) -> Tensor:
    """The PEFT model's forward of the whole batch under no_grad (the '× forward' denominator)."""
    with torch.no_grad():
        return peft_logits(peft_model, batch)


# ----------------------------------------------------------------------------- setup and runners


@dataclass
class Setup:
    """Everything one benchmark point needs, built once per process."""

    size: str
    num_prompts: int
    seq_len: int
    batch: Batch
    models: dict[str | None, FunctionalModel] = field(default_factory=dict)
    direction: dict[str, Tensor] = field(default_factory=dict)
    twins: dict[str, object] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def needs(methods: Sequence[str]) -> tuple[set, set]:
    """(quantizations, twins) the methods need."""
    quant, twins = set(), set()
    for m in methods:
        if m.startswith("nf4:"):
            quant.add("nf4")
        else:
            quant.add(None)  # every baseline's twin is built from the fp32 model
        twins |= {"forward_eager": {"eager"}, "autograd_alpha": {"eager"}, "autograd_loop": {"eager"},
                  "forward_sdpa": {"sdpa"}, "opacus": {"opacus"}}.get(m, set())  # fmt: skip
    return quant, twins


def build_setup(size: str, num_prompts: int, seq_len: int, methods: Sequence[str], seed: int = 0) -> Setup:
    """Models (fp32 and/or NF4, same random weights), twins, batch and direction for `methods`."""
    quant, twins = needs(methods)
    models = {q: bench_model(size, q, seed=seed) for q in sorted(quant, key=str)}
    any_model = next(iter(models.values()))
    setup = Setup(size, num_prompts, seq_len, bench_batch(num_prompts, seq_len, any_model.vocab_size, seed=seed),
                  models, random_direction(any_model.lora, seed=seed + 1))  # fmt: skip
    fp32 = models.get(None)
    for twin in sorted(twins):
        try:
            setup.twins[twin] = peft_twin(fp32, attn_implementation="eager" if twin == "opacus" else twin)
            if twin == "opacus":  # Opacus records activations in training mode only (no dropout here)
                setup.twins[twin] = opacus_module(setup.twins[twin].train())
        except Exception as err:  # record why a baseline cannot run; never hide it
            setup.skipped["opacus" if twin == "opacus" else f"forward_{twin}"] = (
                f"{type(err).__name__}: {err}"
            )
        gc.collect()
    return setup


def make_runners(setup: Setup, methods: Sequence[str]) -> dict[str, Callable[[], Tensor]]:
    """A no-argument callable per method (methods whose setup failed are left out)."""
    b, v = setup.batch, setup.direction
    runners: dict[str, Callable[[], Tensor]] = {}
    for m in methods:
        if m in setup.skipped:
            continue
        if m == "forward_eager":
            runners[m] = lambda: plain_forward(setup.twins["eager"], b)
        elif m == "forward_sdpa":
            runners[m] = lambda: plain_forward(setup.twins["sdpa"], b)
        elif m == "autograd_alpha":
            runners[m] = lambda: autograd_alpha(setup.twins["eager"], b, v)
        elif m == "autograd_loop":
            runners[m] = lambda: autograd_loop(setup.twins["eager"], b, v)
        elif m == "opacus":
            runners[m] = lambda: opacus_projections(setup.twins["opacus"], b, v)
        else:
            q, method = ("nf4", m[4:]) if m.startswith("nf4:") else (None, m)
            if method not in METHODS:
                raise ValueError(f"unknown benchmark method {m!r}; expected one of {ALL_METHODS}")
            model = setup.models[q]
            runners[m] = lambda model=model, method=method: alpha_projections(
                model, model.lora, b, v, method=method
            )
    return runners


def proj_rel_err(a: Tensor, b: Tensor) -> float:
    """max|a − b| / max|b| (DESIGN §1's relative error for projections), in float64."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max()).item()


def reference_projections(setup: Setup) -> dict[str | None, Tensor]:
    """s by `alpha_projections(method="loop")` for each base in the setup (the reference)."""
    return {
        q: alpha_projections(m, m.lora, setup.batch, setup.direction, method="loop")
        for q, m in setup.models.items()
    }


# ----------------------------------------------------------------------------- timing


def summarize(times: Sequence[float]) -> dict[str, float]:
    """Median, quartiles (inclusive method) and min/max of a list of seconds."""
    ts = sorted(times)
    q = statistics.quantiles(ts, n=4, method="inclusive") if len(ts) > 1 else [ts[0]] * 3
    return {"median_s": statistics.median(ts), "q1_s": q[0], "q3_s": q[2], "min_s": ts[0], "max_s": ts[-1]}


def time_interleaved(
    runners: Mapping[str, Callable[[], object]], repeats: int, warmed_up: bool = False
) -> dict[str, dict]:
    """Run every method once per round for `repeats` rounds (start rotated each round; one warm-up
    round unless `warmed_up`); wall and process-CPU seconds and their summaries per method."""
    names = list(runners)
    if not warmed_up:
        for name in names:
            runners[name]()
    wall: dict[str, list[float]] = {n: [] for n in names}
    cpu: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            gc.collect()
            t0, c0 = time.perf_counter(), time.process_time()
            runners[name]()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return {
        n: {**summarize(wall[n]), "times_s": wall[n], "cpu_median_s": statistics.median(cpu[n])}
        for n in names
    }


# ----------------------------------------------------------------------------- memory


def reset_peak_rss() -> bool:
    """Reset the process's RSS high-water mark (Linux /proc/self/clear_refs); False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def current_rss() -> int:
    """Resident set size in bytes (from /proc/self/statm; psutil-free)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    """Peak resident set size of this process in bytes: VmHWM of /proc/self/status (the high-water
    mark `reset_peak_rss` resets), else getrusage's ru_maxrss.

    Not ru_maxrss first: on Linux it is max(the mm's high-water mark, signal->maxrss), and exec
    stores the *parent's* high-water mark in signal->maxrss, so a child of a 4.7 GB benchmark
    process reported a 4.7 GB peak for every call (measured)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_memory_here(size: str, num_prompts: int, seq_len: int, method: str, threads: int = 2) -> dict:
    """Peak extra MiB of one call of `method` in this (fresh) process."""
    torch.set_num_threads(threads)
    setup = build_setup(size, num_prompts, seq_len, [method])
    if method in setup.skipped:
        return {"method": method, "skipped": setup.skipped[method]}
    run = make_runners(setup, [method])[method]
    gc.collect()
    reset = reset_peak_rss()
    before = current_rss()
    run()
    peak = peak_rss()
    return {"method": method, "peak_mib": (peak - before) / 2**20, "rss_before_mib": before / 2**20,
            "hwm_reset": reset}  # fmt: skip


def measure_memory(size: str, num_prompts: int, seq_len: int, method: str, threads: int = 2,
                   timeout: float = 1800) -> dict:  # fmt: skip
    """`measure_memory_here` in a fresh subprocess (same interpreter and environment, so the same
    LD_PRELOAD); {'error': ...} if it fails."""
    cmd = [sys.executable, "-m", "functional_probe.benchmark", "memory", size, str(num_prompts),
           str(seq_len), method, str(threads)]  # fmt: skip
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"method": method, "error": f"timeout after {timeout:.0f} s"}
    if out.returncode != 0:
        return {
            "method": method,
            "error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed",
        }
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- machine


def allocator() -> str:
    """The malloc in use: LD_PRELOAD and any jemalloc/tcmalloc mapped into this process."""
    with open("/proc/self/maps") as f:
        mapped = {line.split()[-1] for line in f if "malloc" in line}
    tuned = sorted(os.path.basename(m) for m in mapped if "jemalloc" in m or "tcmalloc" in m)
    return (
        f"LD_PRELOAD={os.environ.get('LD_PRELOAD', '')!r}; tuned malloc: {', '.join(tuned) or 'none (glibc)'}"
    )


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo ('unknown' elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict:
    """Platform, torch version, threads, allocator, CPU model, cores, load average."""
    return {
        "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "allocator": allocator(), "cpu": cpu_model(),
        "cpu_count": os.cpu_count(), "load_average": os.getloadavg()[0],
    }  # fmt: skip


# ----------------------------------------------------------------------------- one point


@dataclass
class PointSpec:
    """One benchmark point: model size, N prompts (x GROUP responses), T columns, methods."""

    size: str
    num_prompts: int
    seq_len: int
    methods: tuple[str, ...]
    memory_methods: tuple[str, ...] = ()
    repeats: int = 5
    note: str = ""


def run_point(spec: PointSpec, threads: int = 2, log: Callable[[str], None] = print) -> dict:
    """Check, time (interleaved) and measure (subprocesses) one point -> a JSON-able dict."""
    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    setup = build_setup(spec.size, spec.num_prompts, spec.seq_len, spec.methods)
    runners = make_runners(setup, spec.methods)
    log(f"[{spec.size} N={spec.num_prompts} T={spec.seq_len}] built in {time.perf_counter() - t0:.1f} s; "
        f"checking {len(runners)} methods against method='loop'")  # fmt: skip
    refs = reference_projections(setup)
    errors: dict[str, float] = {}
    for name, run in runners.items():  # the check is also the warm-up
        try:
            out = run()
        except Exception as err:
            setup.skipped[name] = f"{type(err).__name__}: {err}"
            continue
        if name in FORWARDS:
            continue
        ref = refs["nf4" if name.startswith("nf4:") else None]
        errors[name] = proj_rel_err(out, ref)
        flag = "" if errors[name] <= TOLERANCE else "  ** EXCEEDS 1e-4 **"
        log(f"  {name:>15}: max|s - s_loop|/max|s_loop| = {errors[name]:.2e}{flag}")
    runners = {n: r for n, r in runners.items() if n not in setup.skipped}
    timings = time_interleaved(runners, spec.repeats, warmed_up=True)
    memory = {m: measure_memory(spec.size, spec.num_prompts, spec.seq_len, m, threads)
              for m in spec.memory_methods if m not in setup.skipped}  # fmt: skip
    methods = {}
    for name in spec.methods:
        row: dict = {}
        if name in timings:
            row.update(timings[name])
        if name in errors:
            row["rel_err_vs_loop"] = errors[name]
        if name in memory:
            mem = memory[name]
            row["peak_mib"] = mem.get("peak_mib")
            if "error" in mem or "skipped" in mem:
                row["memory_error"] = mem.get("error") or mem.get("skipped")
        if name in setup.skipped:
            row["skipped"] = setup.skipped[name]
        methods[name] = row
    batch = setup.batch
    return {
        "size": spec.size, "num_prompts": spec.num_prompts, "group": batch.group_size,
        "seq_len": batch.seq_len, "response_tokens": int(batch.response_mask.sum()),
        "real_tokens": int(batch.attention_mask.sum()), "repeats": spec.repeats, "note": spec.note,
        "seconds": time.perf_counter() - t0, "load_average_after": os.getloadavg()[0], "methods": methods,
    }  # fmt: skip


def ratios(point: Mapping) -> dict[str, dict[str, float | None]]:
    """Per method: median time over the eager forward, the autograd α-trick and the autograd loop."""
    med = {n: r.get("median_s") for n, r in point["methods"].items()}
    out = {}
    for name, t in med.items():
        out[name] = {
            key: (t / med[den] if t is not None and med.get(den) else None)
            for key, den in (
                ("x_forward", "forward_eager"),
                ("x_alpha", "autograd_alpha"),
                ("x_loop", "autograd_loop"),
            )  # fmt: skip
        }
    return out


# ----------------------------------------------------------------------------- reporting


def fmt(x: float | None, spec: str, suffix: str = "") -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:{spec}}{suffix}"


def markdown_table(point: Mapping) -> str:
    """A Markdown table of one point: median (IQR) ms, x forward, x α-trick, x loop, peak MiB, error."""
    rat = ratios(point)
    head = (f"**{point['size']}**, N={point['num_prompts']} prompts x G={point['group']}, "
            f"T={point['seq_len']}, {point['repeats']} interleaved repeats")  # fmt: skip
    lines = [head, "", "| method | median ms | IQR ms | x forward | x autograd α-trick | x autograd loop "
             "| peak MiB | max rel. err vs loop |", "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name, row in point["methods"].items():
        if "skipped" in row and "median_s" not in row:
            lines.append(f"| {name} | skipped: {row['skipped'][:80]} | | | | | | |")
            continue
        r = rat[name]
        iqr = f"{row['q1_s'] * 1e3:.0f}–{row['q3_s'] * 1e3:.0f}" if "q1_s" in row else "—"
        lines.append(
            f"| {name} | {fmt(row.get('median_s') and row['median_s'] * 1e3, '.1f')} | {iqr} "
            f"| {fmt(r['x_forward'], '.2f')} | {fmt(r['x_alpha'], '.2f')} | {fmt(r['x_loop'], '.2f')} "
            f"| {fmt(row.get('peak_mib'), '.0f')} | {fmt(row.get('rel_err_vs_loop'), '.1e')} |"
        )
    return "\n".join(lines)


def markdown_report(result: Mapping) -> str:
    """The machine line and one table per point."""
    m = result["machine"]
    parts = [f"torch {m['torch']}, {m['threads']} threads, {m['cpu']} ({m['cpu_count']} cores), {m['allocator']}",
             f"command: `{result.get('command', '')}`", ""]  # fmt: skip
    for point in result["points"]:
        parts += [markdown_table(point), ""]
    return "\n".join(parts)


def plot_sweeps(result: Mapping, path_prefix: str, size: str = "small") -> list[str]:
    """Log-log PNGs of median time and peak memory vs N (at the sweep's T) and vs T (at its N)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [p for p in result["points"] if p["size"] == size]
    sweeps = {"N": [p for p in points if "sweep N" in p.get("note", "")],
              "T": [p for p in points if "sweep T" in p.get("note", "")]}  # fmt: skip
    written = []
    for what, key, unit in (("time", "median_s", "median s"), ("memory", "peak_mib", "peak extra MiB")):
        fig, axes = plt.subplots(1, 2, figsize=(12, 5))
        drawn = False
        for ax, (axis, pts) in zip(axes, sweeps.items(), strict=True):
            xs_key = "num_prompts" if axis == "N" else "seq_len"
            names = sorted({n for p in pts for n, r in p["methods"].items() if r.get(key)},
                           key=ALL_METHODS.index)  # fmt: skip
            for name in names:
                xy = sorted(
                    (p[xs_key], p["methods"][name][key]) for p in pts if p["methods"].get(name, {}).get(key)
                )
                if xy:
                    ax.plot(*zip(*xy, strict=True), marker="o", label=name,
                            linestyle="--" if name in BASELINES or name in FORWARDS else "-")  # fmt: skip
                    drawn = True
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("N prompts (x2 responses)" if axis == "N" else "T tokens per row")
            ax.set_ylabel(unit)
            ax.set_title(f"{size}: {what} vs {axis}")
            ax.grid(True, which="both", alpha=0.3)
        if drawn:
            labelled = [ax for ax in axes if ax.get_legend_handles_labels()[0]]
            labelled[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
            fig.tight_layout()
            out = f"{path_prefix}_{size}_{what}.png"
            fig.savefig(out, dpi=110)
            written.append(out)
        plt.close(fig)
    return written


def profile_method(runner: Callable[[], object], rows: int = 20) -> str:
    """One call under torch.profiler: the top ops by self CPU time."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        runner()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def save_result(result: Mapping, directory: str, stem: str) -> dict[str, str]:
    """Write <stem>.json and <stem>.md (and plots where sweeps exist) into `directory`."""
    os.makedirs(directory, exist_ok=True)
    base = os.path.join(directory, stem)
    with open(base + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(markdown_report(result) + "\n")
    out = {"json": base + ".json", "md": base + ".md"}
    for size in sorted({p["size"] for p in result["points"]}):
        for png in plot_sweeps(result, base, size):
            out[png] = png
    return out


def run_points(specs: Sequence[PointSpec], threads: int = 2, command: str = "",
               log: Callable[[str], None] = print) -> dict:  # fmt: skip
    """Run several points in this process -> {'machine', 'command', 'points'}."""
    torch.set_num_threads(threads)
    result = {"machine": machine_info(), "command": command, "points": []}
    log(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {result['machine']['allocator']}")
    for spec in specs:
        point = run_point(spec, threads, log)
        result["points"].append(point)
        log(markdown_table(point))
    result["machine"]["load_average_end"] = os.getloadavg()[0]
    return result


def _memory_child(argv: list[str]) -> None:
    size, n, t, method, threads = argv
    print(json.dumps(measure_memory_here(size, int(n), int(t), method, int(threads))))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "memory":
        _memory_child(sys.argv[2:])
    else:
        print(__doc__)
