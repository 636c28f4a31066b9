"""What the numbers mean: a verdict on δH₁, tables as strings, the JSON, the entropy-check plot.

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

from .calibration import t_multiplier
from .entropy_check import RESOLVED_SE, EntropyCheck
from .probe import ProbeResult

RESOLVE_AT = 2.0  # standard errors
PREFERRED_FIT = ("rb_is", "rb")  # the verdict's estimator: rb_is resolves the small scales (SE ∝ s)
SLOPE_TOLERANCE = 0.25  # the entropy check confirms first order when |slope − 1| ≤ this ...
R2_MIN = 0.9  # ... and R² ≥ this, over at least 3 resolved scales within s*

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
        resolved: |δH₁| ≥ threshold·SE (and SE > 0).
        direction: "raises" / "lowers" the entropy when resolved, else "unresolved".
        prompts_needed_E, prompts_needed_U: prompts each batch needs for |δH₁| = threshold·SE at
            the measured variances (the current counts when already resolved; None if δH₁ = 0).
        first_order: the entropy check's one-line verdict (None: check not run).
        warnings: one line each (the probed step past the first-order range, SE = 0, ...).
        threshold: the multiplier of SE for "resolved at 2 SE": the Student-t quantile with the
            normal's two-sided tail at 2 (`calibration.t_multiplier`) on the probe's Welch `dof`
            (few heavy-tailed prompts: SE itself is noisy); 2 when the result has no dof.
    """

    z: float
    resolved: bool
    direction: str
    prompts_needed_E: int | None
    prompts_needed_U: int | None
    first_order: str | None
    warnings: list[str]
    threshold: float = RESOLVE_AT


def verdict(r: ProbeResult, check: EntropyCheck | None = None) -> Verdict:
    """The verdict on `r`; with `check` (the entropy check along the probe's step), its one-line
    verdict and a warning when the probed step lies past the first-order range."""
    warnings = []
    if r.se > 0:
        z = r.delta_h1 / r.se
    else:
        z = math.nan
        warnings.append("SE = 0: every projection is equal (identical prompts?); no uncertainty is known")
    at = RESOLVE_AT if r.dof is None else t_multiplier(RESOLVE_AT, r.dof)
    resolved = r.se > 0 and abs(z) >= at
    if r.delta_h1 == 0 or r.se == 0:
        need_e = need_u = None
    else:  # at today's dof: conservative, more prompts bring the t multiplier down towards 2
        k = max((at * r.se / abs(r.delta_h1)) ** 2, 1.0)
        need_e, need_u = math.ceil(k * r.B_E), math.ceil(k * r.B_U)
    line = None
    if check is not None:
        line, more = check_verdict(check)
        warnings += more
    direction = ("raises" if z > 0 else "lowers") if resolved else "unresolved"
    return Verdict(z, resolved, direction, need_e, need_u, line, warnings, at)


def check_verdict(check: EntropyCheck) -> tuple[str, list[str]]:
    """(one line on the entropy check, warnings): does the realized change grow like s·δH₁ over
    the first-order range (the fit of the first of `PREFERRED_FIT` fitted, else the first fitted one),
    and does the probed step lie inside that range (s* ≥ 1)?"""
    warnings = []
    if check.s_star_resolved and check.s_star < check.probed_scale:
        warnings.append(f"the probed step lies past the first-order range: s* = {check.s_star:.3g} < 1 (|δH₂| "
                        f"reaches {check.fraction:.0%} of |δH₁| there); read δH₁ as the slope at θ, not as this "
                        "step's change")  # fmt: skip
    fitted = [e for e in check.estimators if check.slope[e] is not None]
    if not fitted:
        return ("not resolved: no estimator has 3 scales within s* whose realized change is resolved at "
                f"{RESOLVED_SE:g} SE with the predicted sign (more prompts, or --check-samples)", warnings)  # fmt: skip
    e = next((e for e in PREFERRED_FIT if e in fitted), fitted[0])
    fit = f"{e}: slope {check.slope[e]:.2f}, R² {check.r2[e]:.3f} over {len(check.fit_scales[e])} scales"
    if abs(check.slope[e] - 1) <= SLOPE_TOLERANCE and check.r2[e] >= R2_MIN:
        return f"first order holds: the realized change grows like s·δH₁ ({fit})", warnings
    warnings.append(f"the realized change does not grow like s·δH₁ ({fit}; first order means slope 1 ± "
                    f"{SLOPE_TOLERANCE:g} with R² ≥ {R2_MIN:g})")  # fmt: skip
    return f"first order not confirmed ({fit})", warnings


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
    at = f"{RESOLVE_AT:g} SE" if r.dof is None else f"{RESOLVE_AT:g} SE (t, {r.dof:.3g} dof: {v.threshold:.3g} SE)"
    if v.resolved:
        return f"the step {v.direction} the entropy: resolved at {at} (|δH₁/SE| = {abs(v.z):.3g})"
    if v.prompts_needed_E is None:
        return "not resolved; more prompts cannot resolve a zero δH₁"
    return (f"not resolved at {at} (|δH₁/SE| = {abs(v.z):.3g}); at the measured variance it "
            f"needs about {v.prompts_needed_E} prompts in E and {v.prompts_needed_U} in U")  # fmt: skip


def result_json(r: ProbeResult, v: Verdict, extra: dict | None = None, optimizer_state: str | None = None) -> str:
    """The ProbeResult fields, plus `verdict`, `units`, `extra` (e.g. {"entropy_check": ...}) and
    how the optimizer state was matched (`optimizer_state`). `ProbeResult.from_json` reads it back."""
    out = asdict(r) | {"verdict": asdict(v), "units": UNITS} | (extra or {})
    if optimizer_state is not None:
        out["optimizer_state"] = optimizer_state
    return json.dumps(out, indent=2)


def format_entropy_check(check: EntropyCheck, settings: Mapping | None = None) -> str:
    """The entropy check as a table: per scale s the relative step ‖s·Δθ‖/‖θ‖, the prediction
    s·δH₁ ± SE, δH₁ + δH₂ ± SE and the realized ΔH ± SE per estimator (* = in the fit), the probed
    step marked; then each estimator's fit, s* and the one-line verdict. Nats per token."""
    pm = lambda v, se: f"{v:+.3e} ± {se:.1e}"  # noqa: E731
    head = f"{'s':>7} {'‖sΔθ‖/‖θ‖':>10}  {'predicted s·δH₁':<21} {'δH₁ + δH₂':<21}"
    head += "".join(f" {'realized ' + e:<22}" for e in check.estimators)
    lines = ["entropy check along θ + s·Δθ (Δθ the optimizer's exact next step, s = 1 the probed step): "
             "change of the per-token entropy rate, nats/token", head]  # fmt: skip
    for p in check.points:
        rel = "n/a" if p.relative_step is None else f"{p.relative_step:.1e}"
        row = f"{p.scale:>7.4g} {rel:>10}  {pm(p.predicted, p.predicted_se):<21} {pm(p.predicted_2, p.predicted_2_se):<21}"
        for e in check.estimators:
            mark = " *" if p.scale in check.fit_scales[e] else " !" if e in p.collapsed else ""
            row += f" {pm(p.realized[e], p.realized_se[e]) + mark:<22}"
        lines.append((row + ("  <- probed step" if p.scale == check.probed_scale else "")).rstrip())
    for e in check.estimators:
        n = len(check.fit_scales[e])
        fit = (f"slope {check.slope[e]:.3f}, R² {check.r2[e]:.4f} over {n} scales" if check.slope[e] is not None
               else f"no fit ({n} of {len(check.points)} scales qualify, 3 needed)")  # fmt: skip
        lines.append(f"fit of log|ΔH| on log|s·δH₁|, {e}: {fit}")
    lines.append(f"s* = {edge_text(check)}; the fit (*) uses the scales resolved at {RESOLVED_SE:g} SE with "
                 "the predicted sign, s ≤ s* when s* is resolved (! = importance weights collapsed: left out)")  # fmt: skip
    if settings:
        lines.append(f"realized: {settings['samples_per_prompt']} fresh responses per prompt for each of E's "
                     f"{settings['prompts']} prompts at θ and each θ + s·Δθ (same random numbers), temperature "
                     f"{settings['temperature']:g}; predicted: the probe's δH₁ from E's own responses ± its SE "
                     f"given U; {settings['seconds']:.1f} s")  # fmt: skip
    lines.append(f"first-order verdict: {check_verdict(check)[0]}")
    return "\n".join(lines)


def edge_text(check: EntropyCheck) -> str:
    """s* ± SE and what it means, or why it does not bound the fit."""
    if check.s_star is None:
        return "none (d²H/ds² = 0)"
    what = (f"{check.s_star:.3g} ± {check.s_star_se:.2g}: where |δH₂| reaches {check.fraction:.0%} of |δH₁|, the "
            "edge of the first-order range")  # fmt: skip
    if check.s_star_resolved:
        return what
    return f"{what}, not resolved (d²H/ds² within {RESOLVED_SE:g} SE of 0): no bound on the fit"


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
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))  # beside the axes, off the data
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_entropy_check(check: EntropyCheck, path: Path) -> None:
    """Predicted δH₁(s), δH₁(s) + δH₂(s) and the realized ΔH(s) per estimator against the scale s of
    the step (log-log, |value| with ±SE bars; ▲ > 0, ▽ < 0), the probed step s = 1 and the edge of
    the first-order range s* marked, the fit's slope and R² in the legend, and each estimator's
    noise floor (RESOLVED_SE × its SE, dotted: a realized change below it is not resolved). Writes a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = [p.scale for p in check.points]
    fig, ax = plt.subplots(figsize=(9.5, 4.2))
    plot_change(ax, s, [p.predicted for p in check.points], "predicted δH₁(s) = s·δH₁ (± SE)", "C0")
    ax.errorbar(s, [abs(p.predicted) for p in check.points], yerr=[p.predicted_se for p in check.points],
                fmt="none", ecolor="C0", lw=0.8)  # fmt: skip
    plot_change(ax, s, [p.predicted_2 for p in check.points], "predicted δH₁ + δH₂", "C4")
    for i, e in enumerate(check.estimators):
        values, ses = [p.realized[e] for p in check.points], [p.realized_se[e] for p in check.points]
        fit = "" if check.slope[e] is None else f": slope {check.slope[e]:.2f}, R² {check.r2[e]:.3f}"
        plot_change(ax, s, values, f"realized ΔH(s), {e}{fit} (± SE)", f"C{i + 1}")
        ax.errorbar(s, [abs(v) for v in values], yerr=ses, fmt="none", ecolor=f"C{i + 1}", lw=0.8)
        ax.loglog(s, [RESOLVED_SE * se for se in ses], ":", color=f"C{i + 1}", lw=1,
                  label=f"noise floor of {e}: {RESOLVED_SE:g}·SE")  # fmt: skip
    ax.axvline(check.probed_scale, color="k", ls="--", lw=0.8, label="the probed step (s = 1)")
    if check.s_star is not None:
        ax.axvline(check.s_star, color="gray", ls=":", lw=1,
                   label=f"s* = {check.s_star:.3g}: |δH₂| = {check.fraction:g}·|δH₁|"
                   + ("" if check.s_star_resolved else " (unresolved)"))  # fmt: skip
    save_change_plot(fig, ax, "scale s of the step (θ → θ + s·Δθ)",
                     "Does δH₁ come true? (on the line where the curves coincide)", path)  # fmt: skip
