"""Is a reported SE honest? Replicate spread against reported SEs, with heavy tails in mind; and
the Student-t arithmetic for intervals from few prompts.

The plain check χ² = Σ_r (d_r − d̄)² / mean_r(SE_r²) on R − 1 degrees of freedom assumes normal
d_r. With excess kurtosis k of d_r, Var(s²)/σ⁴ = 2/(R − 1) + k/R, so χ²/(R − 1) is matched in
mean and variance by χ²_d/d with d_eff = 2 / (2/(R − 1) + k/R) (Satterthwaite): at R = 8 and
k = 5, d_eff ≈ 2, not 7. :func:`calibrate` reports both p-values, a bootstrap interval of SD/RMS SE
over the replicates, the z-scores' coverage and whether SE_r tracks |d_r − d̄|.

:func:`welch_dof` is the Welch–Satterthwaite degrees of freedom of a sum of independent variance
estimates; :func:`t_multiplier` turns "k SE" (normal) into the Student-t multiplier with the same
two-sided tail, for that many degrees of freedom. The distributions are scipy.stats'.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from scipy import stats as st
from torch import Tensor

from .stats import as_float64_vector

__all__ = ["Calibration", "calibrate", "excess_kurtosis", "chi2_sf", "t_multiplier", "welch_dof"]


def _vector(v: Tensor | Sequence[float], name: str, least: int) -> Tensor:
    t = as_float64_vector(v, name)
    if t.numel() < least:
        raise ValueError(f"{name} must hold at least {least} values, got {t.numel()}")
    return t


def excess_kurtosis(x: Tensor | Sequence[float]) -> float:
    """Sample excess kurtosis G₂ = ((n+1)·g₂ + 6)·(n−1)/((n−2)(n−3)), g₂ = m₄/m₂² − 3 with central
    moments m_j = mean (x − x̄)^j (the adjusted estimator, unbiased for normal samples; scipy's
    ``kurtosis(bias=False)``). Needs n ≥ 4 and x not all equal (ValueError)."""
    t = _vector(x, "x", 4)
    if float((t - t.mean()).abs().max()) == 0.0:
        raise ValueError("excess_kurtosis: all values are equal (zero variance)")
    return float(st.kurtosis(t.numpy(), bias=False))


def chi2_sf(x: float, dof: float) -> float:
    """P(χ²_dof ≥ x). dof > 0 (real)."""
    if not dof > 0:
        raise ValueError(f"chi2_sf: dof must be > 0, got {dof}")
    return float(st.chi2.sf(x, dof))


def t_multiplier(k: float, dof: float) -> float:
    """The t quantile q with P(|T_dof| ≥ q) = P(|Z| ≥ k): "k SE" at `dof` degrees of freedom
    (k = 2 at dof = 7 gives 2.42; dof = inf gives k)."""
    if not k > 0:
        raise ValueError(f"t_multiplier: k must be > 0, got {k}")
    if not dof > 0:
        raise ValueError(f"t_multiplier: dof must be > 0, got {dof}")
    return k if math.isinf(dof) else float(st.t.isf(st.norm.sf(k), dof))


def welch_dof(variances: Sequence[float], dofs: Sequence[float]) -> float:
    """Welch–Satterthwaite degrees of freedom of V = Σ_i V_i, V_i independent with dofs d_i:
    ν = (Σ V_i)² / Σ (V_i² / d_i); inf when V = 0 (nothing to estimate). Needs d_i > 0, V_i ≥ 0."""
    if len(variances) != len(dofs) or not variances:
        raise ValueError(f"welch_dof: {len(variances)} variances for {len(dofs)} dofs; expected equal, ≥ 1")
    for i, (v, d) in enumerate(zip(variances, dofs, strict=True)):
        if not d > 0:
            raise ValueError(f"welch_dof: dofs[{i}] must be > 0, got {d}")
        if not v >= 0:
            raise ValueError(f"welch_dof: variances[{i}] must be >= 0, got {v}")
    den = sum(v * v / d for v, d in zip(variances, dofs, strict=True))
    return math.inf if den == 0 else sum(variances) ** 2 / den


@dataclass(frozen=True)
class Calibration:
    """Replicates d_r with reported SE_r, r < R. `chi2` = Σ (d_r − d̄)² / mean(SE_r²) on `dof` = R − 1,
    `p_chi2` its upper tail (normal d_r); `p_robust` the upper tail of χ²_d/d at d = `d_eff`
    (Satterthwaite with `kurtosis`, the excess kurtosis of d_r floored at its bound −2).
    `ratio` = SD/RMS SE, `ratio_interval` its percentile bootstrap over replicates at `level`.
    `z` = (d_r − d̄)/SE_r·sqrt(R/(R−1)) (the scale makes Var = 1 for an honest SE), `coverage`
    {1: share |z| ≤ 1, 2: share |z| ≤ 2} (normal: 0.683, 0.954); `spearman` = rank correlation of
    SE_r with |d_r − d̄| (an SE that is small exactly when d_r is far off shows up negative)."""

    R: int
    mean: float
    sd: float
    rms_se: float
    ratio: float
    chi2: float
    dof: int
    p_chi2: float
    kurtosis: float
    d_eff: float
    p_robust: float
    ratio_interval: tuple[float, float]
    level: float
    z: list[float]
    coverage: dict[int, float]
    spearman: float


def _spearman(a: Tensor, b: Tensor) -> float:
    # scipy warns and returns nan for a constant input; nan without the warning
    if float(a.max() - a.min()) == 0.0 or float(b.max() - b.min()) == 0.0:
        return math.nan
    return float(st.spearmanr(a.numpy(), b.numpy()).statistic)


def calibrate(values: Tensor | Sequence[float], ses: Tensor | Sequence[float], *, level: float = 0.9,
              bootstrap: int = 4000, seed: int = 0) -> Calibration:  # fmt: skip
    """The heavy-tail-aware calibration of `ses` [R] against the spread of `values` [R] (see
    `Calibration`); `bootstrap` resamples of the R replicates with a seeded generator. Needs R ≥ 4
    (the kurtosis), SE_r > 0, 0 < level < 1, bootstrap ≥ 100 (ValueError)."""
    d, se = _vector(values, "values", 4), _vector(ses, "ses", 4)
    R = d.numel()
    if se.numel() != R:
        raise ValueError(f"values and ses must have the same length, got {R} and {se.numel()}")
    if bool((se <= 0).any()):
        raise ValueError(f"ses[{int((se <= 0).nonzero()[0, 0])}] must be > 0")
    if not 0 < level < 1 or bootstrap < 100:
        raise ValueError(f"level must be in (0, 1) and bootstrap >= 100, got {level}, {bootstrap}")
    dev = d - d.mean()
    sd, ms = float(dev.square().sum() / (R - 1)) ** 0.5, float(se.square().mean())
    chi2, k = float(dev.square().sum()) / ms, max(excess_kurtosis(d), -2.0)
    d_eff = 2.0 / (2.0 / (R - 1) + k / R)
    idx = torch.randint(0, R, (bootstrap, R), generator=torch.Generator().manual_seed(seed))
    boot = (d[idx].var(dim=1) / se[idx].square().mean(dim=1)).sqrt()
    q = torch.quantile(boot, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64))
    z = dev / se * math.sqrt(R / (R - 1))
    return Calibration(
        R=R, mean=float(d.mean()), sd=sd, rms_se=math.sqrt(ms), ratio=sd / math.sqrt(ms), chi2=chi2, dof=R - 1,
        p_chi2=chi2_sf(chi2, R - 1), kurtosis=k, d_eff=d_eff, p_robust=chi2_sf(d_eff * chi2 / (R - 1), d_eff),
        ratio_interval=(float(q[0]), float(q[1])), level=level, z=z.tolist(),
        coverage={m: float((z.abs() <= m).double().mean()) for m in (1, 2)},
        spearman=_spearman(se, dev.abs()),
    )  # fmt: skip
