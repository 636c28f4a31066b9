"""Is a reported SE honest? Replicate spread against reported SEs, with heavy tails in mind; and
the Student-t arithmetic for intervals from few prompts.

The plain check χ² = Σ_r (d_r − d̄)² / mean_r(SE_r²) on R − 1 degrees of freedom assumes normal
d_r. With excess kurtosis k of d_r, Var(s²)/σ⁴ = 2/(R − 1) + k/R, so χ²/(R − 1) is matched in
mean and variance by χ²_d/d with d_eff = 2 / (2/(R − 1) + k/R) (Satterthwaite): at R = 8 and
k = 5, d_eff ≈ 2, not 7. :func:`calibrate` reports both p-values, a bootstrap interval of SD/RMS SE
over the replicates, the z-scores' coverage and whether SE_r tracks |d_r − d̄|.

:func:`welch_dof` is the Welch–Satterthwaite degrees of freedom of a sum of independent variance
estimates; :func:`t_multiplier` turns "k SE" (normal) into the Student-t multiplier with the same
two-sided tail, for that many degrees of freedom. No scipy: the t CDF is the regularized
incomplete beta by its continued fraction, the χ² tail torch's ``gammaincc``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Calibration", "calibrate", "excess_kurtosis", "chi2_sf", "student_t_cdf", "t_multiplier",
           "welch_dof"]  # fmt: skip


def _vector(v: Tensor | Sequence[float], name: str, least: int) -> Tensor:
    # a list must not pass through float32 (torch's default dtype for Python floats)
    t = v.detach() if isinstance(v, Tensor) else torch.as_tensor(v, dtype=torch.float64)
    t = t.to(device="cpu", dtype=torch.float64)
    if t.ndim != 1 or t.numel() < least:
        raise ValueError(f"{name} must be 1-D with at least {least} values, got shape {tuple(t.shape)}")
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name}[{i}] is not finite ({t[i].item()})")
    return t


def excess_kurtosis(x: Tensor | Sequence[float]) -> float:
    """Sample excess kurtosis G₂ = ((n+1)·g₂ + 6)·(n−1)/((n−2)(n−3)), g₂ = m₄/m₂² − 3 with central
    moments m_j = mean (x − x̄)^j (the adjusted estimator, unbiased for normal samples; scipy's
    ``kurtosis(bias=False)``). Needs n ≥ 4 and x not all equal (ValueError)."""
    t = _vector(x, "x", 4)
    n, d = t.numel(), t - t.mean()
    m2 = float(d.square().mean())
    if m2 == 0.0:
        raise ValueError("excess_kurtosis: all values are equal (zero variance)")
    g2 = float(d.pow(4).mean()) / m2**2 - 3.0
    return ((n + 1) * g2 + 6.0) * (n - 1) / ((n - 2) * (n - 3))


def chi2_sf(x: float, dof: float) -> float:
    """P(χ²_dof ≥ x) = Q(dof/2, x/2), the regularized upper incomplete gamma. dof > 0 (real)."""
    if not dof > 0:
        raise ValueError(f"chi2_sf: dof must be > 0, got {dof}")
    if x <= 0:
        return 1.0
    a = torch.tensor(dof / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(a, torch.tensor(x / 2, dtype=torch.float64)))


def _beta_fraction(a: float, b: float, x: float) -> float:
    """Continued fraction of I_x(a, b) (modified Lentz; converges fast for x < (a+1)/(a+b+2))."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 500):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):  # fmt: skip
            d, c = 1.0 + num * d, 1.0 + num / c
            d, c = 1.0 / (d if abs(d) > tiny else tiny), (c if abs(c) > tiny else tiny)
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _beta_inc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b), 0 ≤ x ≤ 1."""
    if x <= 0.0 or x >= 1.0:
        return max(0.0, min(1.0, x))
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * _beta_fraction(a, b, x) / a
    return 1.0 - front * _beta_fraction(b, a, 1.0 - x) / b


def student_t_cdf(t: float, dof: float) -> float:
    """P(T ≤ t) for Student's t with `dof` > 0 (real) degrees of freedom; dof = inf is the normal.
    P(|T| ≥ |t|) = I_{ν/(ν+t²)}(ν/2, 1/2)."""
    if not dof > 0:
        raise ValueError(f"student_t_cdf: dof must be > 0, got {dof}")
    if math.isinf(dof):
        return 0.5 * math.erfc(-t / math.sqrt(2))
    tail = 0.5 * _beta_inc(dof / 2, 0.5, dof / (dof + t * t))
    return 1.0 - tail if t > 0 else tail


def t_multiplier(k: float, dof: float) -> float:
    """The t quantile q with P(|T_dof| ≥ q) = P(|Z| ≥ k): "k SE" at `dof` degrees of freedom
    (k = 2 at dof = 7 gives 2.42; dof = inf gives k). Bisection to 1e-12 relative."""
    if not k > 0:
        raise ValueError(f"t_multiplier: k must be > 0, got {k}")
    p = 0.5 * math.erfc(-k / math.sqrt(2))  # Φ(k)
    if math.isinf(dof) or p >= 1.0:
        return k
    lo, hi = k, 2 * k
    while student_t_cdf(hi, dof) < p:  # the t tail is heavier: q ≥ k
        lo, hi = hi, 2 * hi
    while hi - lo > 1e-12 * hi:
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if student_t_cdf(mid, dof) < p else (lo, mid)
    return 0.5 * (lo + hi)


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


def _ranks(x: Tensor) -> Tensor:
    return x.argsort().argsort().to(torch.float64)


def _pearson(a: Tensor, b: Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    den = float(a.norm() * b.norm())
    return float((a * b).sum()) / den if den > 0 else math.nan


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
        spearman=_pearson(_ranks(se), _ranks(dev.abs())),
    )  # fmt: skip
