"""Does δH₁ come true? The predicted entropy change against the change that happens, across step sizes.

Along θ + s·Δθ (Δθ the exact next step, s = 1 the step itself) the prediction is linear,
δH₁(s) = s·δH₁, with the second-order term δH₂(s) = s²/2·d²H/ds² (`curvature`) beside it; the
realized ΔH(s) comes from `realized_entropy_change` (fresh coupled samples: "crn", and their
Rao–Blackwellised token entropies: "rb"; θ's fresh responses reweighted to θ' token by token:
"rb_is", whose SE shrinks ∝ s, so it resolves the small scales where crn/rb decouple; each ± SE). All in nats per token: the change of the
per-token entropy rate with Lmax fixed.

The fit: over the first-order range — scales s ≤ s* (where |δH₂| reaches `fraction`·|δH₁|) whose
realized change is resolved (|ΔH| > 2 SE) with the sign of the prediction — the least-squares line
log|ΔH(s)| = a + slope·log|δH₁(s)|, with its R². First order holds when slope ≈ 1 and R² ≈ 1; a
slope far from 1 at small s says the linearisation is wrong, not noisy. s* bounds the fit only when
the curvature itself is resolved (|d²H/ds²| > 2 SE): an s* made of noise would cut the range at
random, so without a resolved curvature every resolved scale enters and the slope alone says
whether the change stays linear.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from torch import Tensor

from .batch import Batch
from .curvature import Curvature, curvature
from .model import FunctionalModel
from .realized import ESTIMATORS, EntropyEstimateWarning, RealizedPoint, realized_entropy_change
from .validation import check_step_size

__all__ = ["EntropyCheck", "EntropyCheckPoint", "entropy_check", "loglog_fit"]

RESOLVED_SE = 2.0  # a realized change enters the fit only when |ΔH| > this × its SE


@dataclass(frozen=True)
class EntropyCheckPoint:
    """One scale s: predicted δH₁(s) ± SE, δH₁(s) + δH₂(s) ± SE, realized ΔH(s) ± SE per estimator
    (nats per token), and ‖s·Δθ‖/‖θ‖; `collapsed`: the reweighting estimators whose importance
    weights collapsed at this scale (ESS below ess_warn_fraction of the responses: not in the fit)."""

    scale: float
    relative_step: float | None
    predicted: float
    predicted_se: float
    predicted_2: float
    predicted_2_se: float
    realized: dict[str, float]
    realized_se: dict[str, float]
    collapsed: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class EntropyCheck:
    """The check across `points`; per estimator the fit's `slope`, `r2` and the `fit_scales` it
    used (None / [] when fewer than 3 points qualify); `s_star` ± `s_star_se` the edge of the
    first-order range (None when d²H/ds² = 0), `s_star_resolved` whether d²H/ds² is resolved at
    RESOLVED_SE (only then does s* bound the fit); `probed_scale` the step the probe reports (1.0)."""

    points: list[EntropyCheckPoint]
    estimators: list[str]
    delta_h1: float
    delta_h1_se: float
    s_star: float | None
    s_star_se: float | None
    s_star_resolved: bool
    fraction: float
    slope: dict[str, float | None]
    r2: dict[str, float | None]
    fit_scales: dict[str, list[float]]
    probed_scale: float = 1.0

    def to_dict(self) -> dict:
        return asdict(self)


def loglog_fit(predicted: Sequence[float], realized: Sequence[float]) -> tuple[float, float]:
    """(slope, R²) of the least-squares line log|realized| = a + slope·log|predicted| (≥ 3 points)."""
    x, y = np.log(np.abs(np.asarray(predicted, float))), np.log(np.abs(np.asarray(realized, float)))
    if len(x) < 3:
        raise ValueError(f"loglog_fit needs at least 3 points, got {len(x)}")
    slope, intercept = np.polyfit(x, y, 1)
    residual = y - (intercept + slope * x)
    total = float(((y - y.mean()) ** 2).sum())
    return float(slope), (1.0 - float((residual**2).sum()) / total) if total > 0 else math.nan


def fit_edge(curv: Curvature) -> float | None:
    """s* when the curvature d²H/ds² is resolved at RESOLVED_SE (then it bounds the fit), else None."""
    return curv.s_star if curv.s_star is not None and abs(curv.d2) > RESOLVED_SE * curv.d2_se else None


def in_range(p: EntropyCheckPoint, name: str, s_star: float | None) -> bool:
    """Resolved at RESOLVED_SE with the predicted sign, and s ≤ s* (`s_star` None: no bound)."""
    value, se = p.realized[name], p.realized_se[name]
    first_order = (s_star is None or p.scale <= s_star) and name not in p.collapsed
    return first_order and abs(value) > RESOLVED_SE * se and value * p.predicted > 0


def entropy_check(
    model: FunctionalModel,
    lora: Mapping[str, Tensor],
    step: Mapping[str, Tensor],
    E: Batch,
    scales: Sequence[float],
    *,
    delta_h1: float | None = None,
    delta_h1_se: float | None = None,
    estimators: Sequence[str] = ("crn", "rb", "rb_is"),
    fraction: float = 0.1,
    temperature: float = 1.0,
    **sampling,
) -> EntropyCheck:
    """Predicted against realized entropy change along θ + s·`step` for each s in `scales` (> 0).

    `delta_h1`, `delta_h1_se`: the probe's δH₁ ± SE of this step (s = 1), e.g. `ProbeResult.delta_h1`
    and `.se_conditional` (E's sampling only: along a given step U's noise plays no part) when
    `step` is the probe's Δθ; default: dH/ds at s = 0 from E's responses
    (`curvature`'s d1 ± SE). δH₂ and s* come from `curvature` on E. `sampling`: passed to
    `realized_entropy_change` (samples_per_prompt, eos_token_id, max_new_tokens, seed, top_k, ...).
    """
    scales = [check_step_size(s, f"entropy_check: scale {s!r}") for s in scales]
    if (delta_h1 is None) != (delta_h1_se is None):
        raise ValueError("entropy_check: give both delta_h1 and delta_h1_se (the probe's δH₁ ± SE), or neither")
    if delta_h1 is not None:
        delta_h1 = check_finite(delta_h1, "delta_h1")
        delta_h1_se = check_finite(delta_h1_se, "delta_h1_se")
    estimators = list(estimators)
    if not estimators or any(e not in ESTIMATORS for e in estimators):
        raise ValueError(f"estimators={estimators!r}; expected a non-empty subset of {ESTIMATORS}")
    curv = curvature(model, lora, step, E, fraction=fraction, temperature=temperature)
    d1, d1_se = (curv.d1, curv.d1_se) if delta_h1 is None else (delta_h1, delta_h1_se)
    with warnings.catch_warnings():  # rb_is collapsing at the large scales is expected: marked, not fitted
        warnings.filterwarnings("ignore", "rb_is at scale", EntropyEstimateWarning)
        realized = realized_entropy_change(model, lora, step, E, scales, estimators=estimators,
                                           temperature=temperature, **sampling)  # fmt: skip
    floor = realized.settings["ess_warn_fraction"] * realized.samples_per_prompt
    points = []
    for s, rp in zip(scales, realized.points, strict=True):
        h2, h2_se = curv.delta_h2(s)
        points.append(EntropyCheckPoint(
            scale=s, relative_step=rp.relative_step, predicted=s * d1, predicted_se=s * d1_se,
            predicted_2=s * d1 + h2, predicted_2_se=math.hypot(s * d1_se, h2_se),
            realized={e: rp.estimates[e].value for e in estimators}, realized_se={e: rp.estimates[e].se for e in estimators},
            collapsed=collapsed(rp, floor),
        ))  # fmt: skip
    slope, r2, used = {}, {}, {}
    edge = fit_edge(curv)
    for e in estimators:
        good = [p for p in points if in_range(p, e, edge)]
        used[e] = [p.scale for p in good]
        fit = loglog_fit([p.predicted for p in good], [p.realized[e] for p in good]) if len(good) >= 3 else (None, None)
        slope[e], r2[e] = fit
    return EntropyCheck(points=points, estimators=estimators, delta_h1=d1, delta_h1_se=d1_se, s_star=curv.s_star,
                        s_star_se=curv.s_star_se, s_star_resolved=edge is not None, fraction=float(fraction), slope=slope,
                        r2=r2, fit_scales=used)  # fmt: skip


def collapsed(point: RealizedPoint, floor: float) -> list[str]:
    """rb_is when its smallest ESS at this scale is below `floor` responses (snis is E's: its own
    warning stands)."""
    est = point.estimates.get("rb_is")
    return ["rb_is"] if est is not None and est.diagnostics["ess_min"] < floor else []


def check_finite(x: float, name: str) -> float:
    if isinstance(x, bool) or not isinstance(x, int | float) or not math.isfinite(x):
        raise ValueError(f"entropy_check: {name}={x!r}; expected a finite number")
    return float(x)
