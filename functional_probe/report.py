"""What the numbers mean: a verdict on δH₁, tables as strings, the JSON, the first-order plot.

δH₁ = η·<μX, μY> is the first-order change of the per-token entropy rate (nats per token: the
sequence entropy over Lmax, averaged over the evaluation prompts) that the step
θ → θ + η·μY causes; positive means the step raises the entropy. It is *resolved* when
|δH₁| ≥ 2·SE. Both variances shrink as 1/B, so at the measured variances resolving it needs
each of E and U scaled by k = (2·SE/|δH₁|)².
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from .entropy_check import EntropyCheck
from .first_order import TOLERANCE, FirstOrderCheck, FirstOrderPoint
from .probe import ProbeResult

RESOLVE_AT = 2.0  # standard errors

# Field descriptions of the JSON (README "How to read the result" repeats them).
UNITS = {
    "delta_h1": "δH₁ = η·<μX, μY>: predicted change of the per-token entropy rate, nats/token; > 0 raises it",
    "se": "standard error of delta_h1 over E and U (nats/token)",
    "se_conditional": "standard error of delta_h1 given U (E's sampling only)",
    "se_jackknife": "delete-one-prompt jackknife standard error of delta_h1 over E and U (nats/token)",
    "x_estimator": "the X loss of μX: 'loo' (leave-one-out score function) or 'rb' (Rao–Blackwellized)",
    "bars_dot": "<μX, μY> per unit step (nats/token per unit η)",
    "V_X, V_Y, C_XY": "variances of the means of s and t and their covariance, per unit step (no η)",
    "s, t": "per-prompt projections <X_n, μY> (E) and <Y_p, P(μX)> (U), per unit step",
}


class Progress:
    """Callable that announces each phase on stderr with the elapsed time; silent when `quiet`."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.start = time.perf_counter()

    def __call__(self, phase: str) -> None:
        if not self.quiet:
            from tqdm.auto import tqdm

            tqdm.write(f"[{time.perf_counter() - self.start:6.1f} s] {phase}", file=sys.stderr)

    done = __call__


@dataclass(frozen=True)
class Verdict:
    """What δH₁ ± SE says, in the terms a researcher acts on.

    Attributes:
        z: δH₁ / SE (nan when SE = 0).
        resolved: |δH₁| ≥ 2·SE (and SE > 0).
        direction: "raises" / "lowers" the entropy when resolved, else "unresolved".
        prompts_needed_E, prompts_needed_U: prompts each batch needs for |δH₁| = 2·SE at the
            measured variances (the current counts when already resolved; None if δH₁ = 0).
        first_order_ratio: actual/predicted change at the probed η (None: check not run).
        warnings: one line each (η outside the first-order range, SE = 0, ...).
    """

    z: float
    resolved: bool
    direction: str
    prompts_needed_E: int | None
    prompts_needed_U: int | None
    first_order_ratio: float | None
    warnings: list[str]


def verdict(r: ProbeResult, check: FirstOrderCheck | None = None) -> Verdict:
    """The verdict on `r`; with `check` (run at the probe's η), a warning when η is past the
    range where the first-order picture holds."""
    warnings = []
    if r.se > 0:
        z = r.delta_h1 / r.se
    else:
        z = math.nan
        warnings.append("SE = 0: every projection is equal (identical prompts?); no uncertainty is known")
    resolved = r.se > 0 and abs(z) >= RESOLVE_AT
    if r.delta_h1 == 0 or r.se == 0:
        need_e = need_u = None
    else:
        k = max((RESOLVE_AT * r.se / abs(r.delta_h1)) ** 2, 1.0)
        need_e, need_u = math.ceil(k * r.B_E), math.ceil(k * r.B_U)
    ratio = None
    if check is not None and check.probed is not None:
        ratio = check.probed.ratio
        warnings += first_order_warnings(check)
    direction = ("raises" if z > 0 else "lowers") if resolved else "unresolved"
    return Verdict(z, resolved, direction, need_e, need_u, ratio, warnings)


def first_order_warnings(check: FirstOrderCheck) -> list[str]:
    p = check.probed
    if not check.usable(p):
        return [f"at η = {p.eta:.3g} the predicted change is within 10x the fp32 noise floor "
                f"({check.noise_floor:.2g} nats/token): the first-order check cannot confirm it"]  # fmt: skip
    if check.holds(p):
        return []
    span = check.linear_range()
    where = (f"it holds for η in [{span[0]:.3g}, {span[1]:.3g}]: probe an lr in that range, or"
             if span else "it held at no step checked above the noise floor:")  # fmt: skip
    return [f"η = {p.eta:.3g} is outside the range where the first-order picture holds: the actual change "
            f"is {p.ratio:.3g}x the predicted (tolerance ±{TOLERANCE:.0%}); {where} read δH₁ as the slope "
            "at θ, not as this step's change"]  # fmt: skip


def format_probe(r: ProbeResult, v: Verdict | None = None) -> str:
    """The probe as a two-column table, headed by the verdict; SE lines say what they assume."""
    v = v or verdict(r)
    cross = (
        f"includes the cross term of {r.shared_prompts} prompts shared by E and U"
        if r.shared_prompts
        else "E and U share no prompt: independent draws"
    )
    rows = [
        ("δH₁ = η·<μX, μY>", f"{r.delta_h1:+.6g} ± {r.se:.3g} nats/token (change of the per-token entropy rate)"),
        ("verdict", verdict_line(r, v)),
        ("SE(δH₁)", f"{r.se:.6g}   ({cross})"),
        ("jackknife SE (over prompts)", "not computed" if r.se_jackknife is None
         else f"{r.se_jackknife:.6g}   (delete one prompt of E or U at a time)"),  # fmt: skip
        ("SE given U (conditional)", f"{r.se_conditional:.6g}"),
        ("δH₁ / SE", f"{v.z:+.3g}"),
        ("bars_dot = <μX, μY>", f"{r.bars_dot:+.6g} per unit η"),
        ("η", f"{r.eta:.6g}"),
        ("V_X, V_Y, C_XY (per unit step)", f"{r.V_X:.4g}, {r.V_Y:.4g}, {r.C_XY:.4g}"),
        ("B_E, B_U (prompts)", f"{r.B_E}, {r.B_U}"),
        ("method, weighting, X estimator", f"{r.method}, {r.weighting}, {r.x_estimator}"),
    ]
    rows += [(f"time: {k}", f"{t:.3f} s") for k, t in r.timings.items()]
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {val}" for k, val in rows]
    return "\n".join(lines + [f"WARNING: {w}" for w in v.warnings])


def verdict_line(r: ProbeResult, v: Verdict) -> str:
    if v.resolved:
        return f"the step {v.direction} the entropy: resolved at {RESOLVE_AT:g} SE (|δH₁/SE| = {abs(v.z):.3g})"
    if v.prompts_needed_E is None:
        return "not resolved; more prompts cannot resolve a zero δH₁"
    return (f"not resolved at {RESOLVE_AT:g} SE (|δH₁/SE| = {abs(v.z):.3g}); at the measured variance it "
            f"needs about {v.prompts_needed_E} prompts in E and {v.prompts_needed_U} in U")  # fmt: skip


def result_json(r: ProbeResult, v: Verdict, check: FirstOrderCheck | None = None,
                optimizer_state: str | None = None) -> str:  # fmt: skip
    """The ProbeResult fields, plus `verdict`, `units`, `first_order` (if run) and how the
    optimizer state was matched (`optimizer_state`). `ProbeResult.from_json` reads it back."""
    out = asdict(r) | {"verdict": asdict(v), "units": UNITS}
    if check is not None:
        out["first_order"] = check.to_dict()
    if optimizer_state is not None:
        out["optimizer_state"] = optimizer_state
    return json.dumps(out, indent=2)


def format_first_order(check: FirstOrderCheck) -> str:
    head = f"{'‖ηΔ‖/‖θ‖':>10} {'η':>11} {'predicted':>12} {'actual':>12} {'actual/pred':>11}"
    lines = [f"first-order check: change of the X surrogate (nats/token) along θ + η·μY, "
             f"<μX, μY> = {check.bars_dot:+.6g}; fp32 noise floor {check.noise_floor:.2g}", head]  # fmt: skip
    points = sorted(check.points + ([check.probed] if check.probed else []), key=lambda p: p.eta)
    for p in points:
        mark = "  <- probed η" if p is check.probed else ""
        mark += "" if check.usable(p) else "  (near the noise floor)"
        lines.append(f"{p.relative_step:>10.1e} {p.eta:>11.3e} {p.predicted:>12.5g} {p.actual:>12.5g} "
                     f"{p.ratio:>11.4f}{mark}")  # fmt: skip
    return "\n".join(lines)


def plot_change(ax, etas: Sequence[float], values: Sequence[float], label: str, color: str) -> None:
    """|value| against η on log-log axes; ▲ where the value is positive, ▽ where negative."""
    ax.loglog(etas, [abs(v) for v in values], "-", color=color, lw=1, label=label)
    for sign, marker, fill in ((1, "^", color), (-1, "v", "white")):
        pts = [(e, abs(v)) for e, v in zip(etas, values, strict=True) if v * sign > 0]
        if pts:
            ax.loglog(*zip(*pts, strict=True), marker, color=color, mfc=fill, ms=6, ls="none")


def save_change_plot(fig, ax, xlabel: str, title: str, path: Path) -> None:
    """The sign legend, axis labels and title shared by the change plots; saves and closes `fig`."""
    import matplotlib.pyplot as plt

    ax.plot([], [], "k^", label="change > 0 (entropy up)")
    ax.plot([], [], "kv", mfc="white", label="change < 0 (entropy down)")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("|change of the per-token entropy rate| (nats/token)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_first_order(check: FirstOrderCheck, path: Path,
                     extra: Mapping[str, tuple[Sequence[float], Sequence[float]]] | None = None) -> None:  # fmt: skip
    """Predicted and actual change against the step η (log-log, |value|; ▲ > 0, ▽ < 0), the
    probed η marked, the fp32 noise floor drawn. `extra`: more series {label: (etas, values)}
    (e.g. a realized entropy change) drawn the same way. Writes a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points: list[FirstOrderPoint] = sorted(check.points + ([check.probed] if check.probed else []),
                                           key=lambda p: p.eta)  # fmt: skip
    etas = [p.eta for p in points]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    plot_change(ax, etas, [p.predicted for p in points], "predicted  η·<μX, μY>", "C0")
    plot_change(ax, etas, [p.actual for p in points], "actual (X surrogate re-evaluated at θ + η·μY)", "C1")
    for i, (label, (xs, ys)) in enumerate((extra or {}).items()):
        plot_change(ax, xs, ys, label, f"C{i + 2}")
    if check.noise_floor > 0:
        ax.axhline(check.noise_floor, color="gray", ls=":", lw=1,
                   label=f"fp32 noise floor {check.noise_floor:.1g}: below it, rounding of S")  # fmt: skip
    if check.probed is not None:
        ax.axvline(check.probed.eta, color="k", ls="--", lw=0.8, label=f"probed η = {check.probed.eta:.3g}")
    save_change_plot(fig, ax, "step size η (θ → θ + η·μY)",
                     "Where the first-order prediction holds (the curves coincide)", path)  # fmt: skip


def plot_entropy_check(check: EntropyCheck, path: Path) -> None:
    """Predicted δH₁(s), δH₁(s) + δH₂(s) and the realized ΔH(s) per estimator against the scale s of
    the step (log-log, |value| with ±SE bars; ▲ > 0, ▽ < 0), the probed step s = 1 and the edge of
    the first-order range s* marked, the fit's slope and R² in the legend. Writes a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = [p.scale for p in check.points]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    plot_change(ax, s, [p.predicted for p in check.points], "predicted δH₁(s) = s·δH₁", "C0")
    plot_change(ax, s, [p.predicted_2 for p in check.points], "predicted δH₁ + δH₂", "C4")
    for i, e in enumerate(check.estimators):
        values, ses = [p.realized[e] for p in check.points], [p.realized_se[e] for p in check.points]
        fit = "" if check.slope[e] is None else f": slope {check.slope[e]:.2f}, R² {check.r2[e]:.3f}"
        plot_change(ax, s, values, f"realized ΔH(s), {e}{fit}", f"C{i + 1}")
        ax.errorbar(s, [abs(v) for v in values], yerr=ses, fmt="none", ecolor=f"C{i + 1}", lw=0.8)
    ax.axvline(check.probed_scale, color="k", ls="--", lw=0.8, label="the probed step (s = 1)")
    if check.s_star is not None:
        ax.axvline(check.s_star, color="gray", ls=":", lw=1,
                   label=f"s* = {check.s_star:.3g}: |δH₂| = {check.fraction:g}·|δH₁|")  # fmt: skip
    save_change_plot(fig, ax, "scale s of the step (θ → θ + s·Δθ)",
                     "Does δH₁ come true? (on the line where the curves coincide)", path)  # fmt: skip
