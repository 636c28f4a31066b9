"""`--first-order` of `demo` and `run`: does δH₁ come true along the step the optimizer takes next?

The probe predicts δH₁ for Δθ, the optimizer's exact next step (`AdamState.step` for
p.grad = −mean ∇Ly over U, as `fp.next_step` gives it). The check walks θ + s·Δθ for each scale
s of `--scales` (s = 1 is the probed step) and sets the prediction s·δH₁ ± SE (and δH₁ + δH₂, the
curvature by jvp of jvp) against the realized change ΔH(s) of the per-token entropy rate,
measured on `--check-samples` fresh responses per prompt of E at θ and at each θ + s·Δθ (common
random numbers: "crn"; their full-vocabulary token entropies: "rb"; θ's responses reweighted to θ'
+ s·Δθ token by token: "rb_is"). See `entropy_check`.

The prediction's SE here is the probe's `se_conditional` (E's sampling only): Δθ is fixed
by U, so U's sampling noise is no part of the comparison along it.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

DEFAULT_SCALES = "0.0625,0.125,0.25,0.5,1,2"


def add_options(q: argparse.ArgumentParser, check_samples: int) -> None:
    q.add_argument("--first-order", action="store_true",
                   help="also check δH₁ against the entropy change that happens along the step (table + PNG)")  # fmt: skip
    q.add_argument("--scales", default=DEFAULT_SCALES,
                   help=f"with --first-order: scales s of the step θ + s·Δθ checked, s = 1 the probed step "
                   f"(comma-separated, > 0; default {DEFAULT_SCALES})")  # fmt: skip
    q.add_argument("--check-samples", type=int, default=check_samples,
                   help="with --first-order: fresh responses per prompt of E at θ and at each θ + s·Δθ")  # fmt: skip


def check_options(args: argparse.Namespace) -> list[float] | None:
    """The scales of `--scales` (None without --first-order); ValueError naming the bad option."""
    if not args.first_order:
        return None
    scales = []
    for part in args.scales.split(","):
        try:
            s = float(part)
        except ValueError:
            s = math.nan
        if not (math.isfinite(s) and s > 0):
            raise ValueError(f"--scales {args.scales!r}: {part.strip()!r} is not a finite number > 0")
        scales.append(s)
    if isinstance(args.check_samples, bool) or args.check_samples < 2:
        raise ValueError(f"--check-samples {args.check_samples}: expected an integer >= 2 (the SE of each prompt's mean)")
    return scales


def exact_step(model, lora, U, state, lr: float | None):
    """Δθ of the optimizer's next step for p.grad = −mean_p ∇Ly[p] over U (the trainer minimises −Ly)."""
    from .grads import mean_grad

    g = mean_grad(model, lora, U, loss="y", distributed=False)
    return state.step({k: -v for k, v in g.items()}, lora, lr=lr).delta


def run_check(model, lora, E, U, state, result, args, say, *, lr=None, eos_token_id=None):
    """(EntropyCheck, settings): the check of `result` (the probe of this step) along the exact
    next step, and how it sampled and how long it took (for the JSON and the table)."""
    from .entropy_check import entropy_check

    start = time.perf_counter()
    say(f"entropy check: {args.check_samples} fresh responses per prompt of E at θ and at θ + s·Δθ, "
        f"s in {args.scales}")  # fmt: skip
    step = exact_step(model, lora, U, state, lr)
    check = entropy_check(model, lora, step, E, args.check_scales, delta_h1=result.delta_h1,
                          delta_h1_se=result.se_conditional, samples_per_prompt=args.check_samples,
                          eos_token_id=eos_token_id, seed=args.seed)  # fmt: skip
    settings = dict(step="the optimizer's exact next step", samples_per_prompt=args.check_samples,
                    prompts=len(E), temperature=1.0, eos_token_id=eos_token_id, seed=args.seed,
                    prediction_se="se_conditional (E's sampling; the step is fixed by U)",
                    seconds=time.perf_counter() - start)  # fmt: skip
    return check, settings


def finish(args, result, check, settings, say, state_order: str | None) -> None:
    """Print the verdict and table (and the entropy check's table and PNG), write the JSON."""
    from . import report

    v = report.verdict(result, check)
    print(report.format_probe(result, v))
    extra = None if check is None else {"entropy_check": check.to_dict() | {"settings": settings}}
    Path(args.out).write_text(report.result_json(result, v, extra, state_order))
    say.done(f"wrote {args.out}")
    if check is not None:
        png = Path(args.out).with_suffix(".first_order.png")
        print(report.format_entropy_check(check, settings))
        report.plot_entropy_check(check, png)
        say.done(f"wrote {png}")


def eos_token_ids(model_dir: Path) -> int | list[int] | None:
    """The EOS id(s) the model stops at: generation_config.json's, else config.json's (None: none)."""
    for name in ("generation_config.json", "config.json"):
        path = model_dir / name
        if path.is_file():
            eos = json.loads(path.read_text()).get("eos_token_id")
            if eos is not None:
                return eos
    return None
