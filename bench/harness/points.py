"""Models, batches and runners of one benchmark point; interleaved timing; memory in a fresh process."""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from functional_probe.alpha import METHODS, alpha_projections
from functional_probe.batch import Batch, make_batch
from functional_probe.model.functional import FunctionalModel
from functional_probe.testing import peft_twin

from .baselines import (
    BASELINES,
    FORWARDS,
    autograd_alpha,
    autograd_loop,
    opacus_module,
    opacus_projections,
    plain_forward,
)  # fmt: skip
from .memory import current_rss, peak_rss, reset_peak_rss

CONTENDERS = tuple(METHODS) + tuple(f"nf4:{m}" for m in METHODS)
ALL_METHODS = FORWARDS + BASELINES + CONTENDERS
SIZES = ("tiny", "small", "smollm2", "qwen05")
GROUP = 2
TOLERANCE = 1e-4


# ----------------------------------------------------------------------------- models, data


def bench_config(size: str):
    """The transformers config of a benchmark model: 'tiny' (`tiny_config`), 'small' (Qwen2,
    hidden 256, intermediate 704, 4 layers, 4/2 heads, vocab 4096 — DESIGN §3), 'smollm2'
    (SmolLM2-135M-shaped Llama: hidden 576, 30 layers, 9/3 heads, head_dim 64, MLP 1536, vocab
    49152, tied) or 'qwen05' (Qwen2.5-0.5B-shaped: hidden 896, 24 layers, 14/2 heads, intermediate
    4864, vocab 151936, tied)."""
    from transformers import LlamaConfig, Qwen2Config

    from functional_probe.model.tiny import tiny_config

    common = dict(max_position_embeddings=4096, rms_norm_eps=1e-6)
    if size == "tiny":
        return tiny_config()
    if size == "small":
        return Qwen2Config(vocab_size=4096, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                           **common)  # fmt: skip
    if size == "smollm2":
        return LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                           num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True,
                           max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0)  # fmt: skip
    if size == "qwen05":
        return Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                           num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
                           rope_theta=1000000.0, **common)  # fmt: skip
    raise ValueError(f"size={size!r}; expected one of {SIZES}")


def bench_model(size: str, quantize: str | None = None, seed: int = 0) -> FunctionalModel:
    """Random base weights (`tiny_state_dict`; a tied head shares the head's scale) with LoRA
    r=8, alpha=16 on all 7 projections, both factors non-zero; base fp32 or NF4."""
    from functional_probe.model.base_weights import dense_or_nf4
    from functional_probe.model.loading import build_model
    from functional_probe.model.tiny import tiny_lora, tiny_state_dict

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
    LD_PRELOAD; bench/ prepended to PYTHONPATH so the child finds `harness`); {'error': ...} if it fails."""
    cmd = [sys.executable, "-m", "harness", "memory", size, str(num_prompts),
           str(seq_len), method, str(threads)]  # fmt: skip
    bench_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join(p for p in (bench_dir, os.environ.get("PYTHONPATH", "")) if p)
    try:
        out = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, "PYTHONPATH": path}
        )
    except subprocess.TimeoutExpired:
        return {"method": method, "error": f"timeout after {timeout:.0f} s"}
    if out.returncode != 0:
        return {
            "method": method,
            "error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed",
        }
    return json.loads(out.stdout.strip().splitlines()[-1])


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
