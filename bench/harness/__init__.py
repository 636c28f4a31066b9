"""Speed and peak memory of every projection method against `torch.autograd.grad` (issue 7).

Baselines are written the way the seed wrote them, on a plain PEFT `PeftModel` (the
`functional_probe.testing.peft_twin` of the model, whose LoRA parameters equal `model.lora`):

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

`bench/run.py` is the full sweep; `bench/quick.py` the quick subset. Scripts in bench/ import
this package as `harness` (Python puts a script's own directory on sys.path; pytest gets bench/
from pyproject's `pythonpath`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import torch

from .baselines import (
    BASELINES,
    FORWARDS,
    autograd_alpha,
    autograd_loop,
    opacus_module,
    opacus_projections,
    plain_forward,
    seed_x_losses,
)  # fmt: skip
from .memory import allocator, current_rss, machine_info, peak_rss, reset_peak_rss
from .points import (
    ALL_METHODS,
    CONTENDERS,
    GROUP,
    SIZES,
    PointSpec,
    Setup,
    bench_batch,
    bench_config,
    bench_model,
    build_setup,
    make_runners,
    measure_memory,
    measure_memory_here,
    reference_projections,
    run_point,
    time_interleaved,
)  # fmt: skip
from .report import markdown_report, markdown_table, plot_sweeps, profile_method, ratios, save_result

__all__ = [
    "ALL_METHODS", "BASELINES", "CONTENDERS", "FORWARDS", "GROUP", "SIZES", "PointSpec", "Setup",
    "allocator", "autograd_alpha", "autograd_loop", "bench_batch", "bench_config", "bench_model",
    "build_setup", "current_rss", "machine_info", "make_runners", "markdown_report", "markdown_table",
    "measure_memory", "measure_memory_here", "opacus_module", "opacus_projections", "peak_rss",
    "plain_forward", "plot_sweeps", "profile_method", "ratios", "reference_projections",
    "reset_peak_rss", "run_point", "run_points", "save_result", "seed_x_losses", "time_interleaved",
]  # fmt: skip


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
