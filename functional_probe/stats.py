"""The one place for variance arithmetic: float64 moments, standard errors, Chan's combination.

Every variance in the project (``alpha_variance``, the probe, the ``torch.distributed``
reduction) goes through this module, so that one rule holds everywhere:

* statistics are accumulated in float64, whatever the dtype of the samples;
* centred sums are computed two-pass (mean first, then ``Σ (x − x̄)²``), never as
  ``Σ x² − n·x̄²``, which loses every digit when the mean is large against the spread;
* partial statistics (microbatches, ranks) are merged with the exact pairwise update of
  Chan, Golub & LeVeque (1979), including the co-moment ``Σ (x − x̄)(y − ȳ)`` needed for
  the probe's cross term.

A :class:`Moments` is the sufficient statistic of ``n`` paired samples ``(x_i, y_i)``.
Without ``y`` the ``y`` fields are zero, which is exactly the statistic of ``y ≡ 0``, so
x-only and paired moments combine consistently.

This module knows no model, batch or loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "Moments",
    "moments",
    "combine",
    "combine_all",
    "as_tensor",
    "from_tensor",
    "variance_of_mean",
    "standard_error",
    "MOMENTS_FIELDS",
    "jackknife_se",
]

#: Order of the fields in :func:`as_tensor` / :func:`from_tensor`.
MOMENTS_FIELDS: tuple[str, ...] = ("n", "mean_x", "m2_x", "mean_y", "m2_y", "c_xy")


@dataclass(frozen=True)
class Moments:
    """Sufficient statistics of ``n`` paired samples ``(x_i, y_i)``, in float64.

    Attributes:
        n: number of samples (``0`` is the identity of :func:`combine`).
        mean_x: ``x̄ = Σ x_i / n`` (``0.0`` when ``n == 0``).
        m2_x: centred sum of squares ``Σ (x_i − x̄)²``.
        mean_y: ``ȳ`` (``0.0`` when no ``y`` was given).
        m2_y: ``Σ (y_i − ȳ)²``.
        c_xy: centred co-moment ``Σ (x_i − x̄)(y_i − ȳ)``.
    """

    n: int
    mean_x: float = 0.0
    m2_x: float = 0.0
    mean_y: float = 0.0
    m2_y: float = 0.0
    c_xy: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.n, bool) or not isinstance(self.n, int) or self.n < 0:
            raise ValueError(f"Moments.n must be a non-negative int, got {self.n!r}")

    def _need_two(self, what: str) -> None:
        if self.n < 2:
            raise ValueError(f"{what} needs at least 2 samples, got n = {self.n}")

    def sample_var_x(self) -> float:
        """Unbiased sample variance of x: ``m2_x / (n − 1)``. Raises ValueError if n < 2."""
        self._need_two("sample_var_x")
        return self.m2_x / (self.n - 1)

    def sample_var_y(self) -> float:
        """Unbiased sample variance of y: ``m2_y / (n − 1)``. Raises ValueError if n < 2."""
        self._need_two("sample_var_y")
        return self.m2_y / (self.n - 1)

    def sample_cov(self) -> float:
        """Unbiased sample covariance: ``c_xy / (n − 1)``. Raises ValueError if n < 2."""
        self._need_two("sample_cov")
        return self.c_xy / (self.n - 1)

    def var_of_mean_x(self) -> float:
        """Estimated variance of the mean of x: ``sample_var_x / n = m2_x / (n (n − 1))``.

        This is the probe's ``V_X = Σ (s_n − s̄)² / (B_E (B_E − 1))``.
        """
        return self.sample_var_x() / self.n

    def var_of_mean_y(self) -> float:
        """Estimated variance of the mean of y: ``m2_y / (n (n − 1))`` (the probe's ``V_Y``)."""
        return self.sample_var_y() / self.n

    def cov_of_means(self) -> float:
        """Estimated covariance of the two means: ``c_xy / (n (n − 1))``.

        The probe's cross term for shared prompts is ``2 · cov_of_means()``.
        """
        return self.sample_cov() / self.n

    def var_of_mean_sum(self) -> float:
        """Estimated variance of ``x̄ + ȳ``: ``(m2_x + m2_y + 2 c_xy) / (n (n − 1))``.

        The numerator is ``Σ ((x_i − x̄) + (y_i − ȳ))² ≥ 0``; a value below zero can only be
        rounding, so it is clamped to 0.
        """
        self._need_two("var_of_mean_sum")
        m2 = self.m2_x + self.m2_y + 2.0 * self.c_xy
        return max(m2, 0.0) / (self.n * (self.n - 1))


def as_float64_vector(v: Tensor | Sequence[float], name: str) -> Tensor:
    """v as a 1-D float64 CPU tensor; ValueError naming `name` when not 1-D, complex or not finite."""
    # a Python list straight to float64: through torch's default float32 it would lose digits
    t = v.detach() if isinstance(v, Tensor) else torch.as_tensor(v, dtype=torch.float64)
    if t.ndim != 1:
        raise ValueError(f"{name} must be 1-D [n], got shape {tuple(t.shape)}")
    if t.is_complex():
        raise ValueError(f"{name} must be real, got dtype {t.dtype}")
    t = t.to(device="cpu", dtype=torch.float64)
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise ValueError(f"{name}[{i}] is not finite ({t[i].item()})")
    return t


def moments(x: Tensor | Sequence[float], y: Tensor | Sequence[float] | None = None) -> Moments:
    """Two-pass float64 moments of the samples ``x`` (and paired ``y``).

    Args:
        x: ``[n]`` samples, any real dtype/device; cast to float64 before any arithmetic.
            ``n == 0`` is allowed and gives the identity ``Moments(0)``.
        y: optional ``[n]`` samples paired with ``x``; ``None`` means ``y ≡ 0``.

    Returns:
        ``Moments`` with ``mean = Σ x / n`` and centred sums ``Σ (x − x̄)²``,
        ``Σ (x − x̄)(y − ȳ)`` from a second pass over the centred values.

    Raises:
        ValueError: ``x``/``y`` not 1-D, different lengths, or a non-finite value.
    """
    xs = as_float64_vector(x, "x")
    n = xs.numel()
    ys = None
    if y is not None:
        ys = as_float64_vector(y, "y")
        if ys.numel() != n:
            raise ValueError(f"x and y must have the same length, got {n} and {ys.numel()}")
    if n == 0:
        return Moments(0)
    mean_x = xs.sum() / n
    dx = xs - mean_x
    if ys is None:
        return Moments(n, float(mean_x), float(dx.square().sum()))
    mean_y = ys.sum() / n
    dy = ys - mean_y
    return Moments(
        n,
        float(mean_x),
        float(dx.square().sum()),
        float(mean_y),
        float(dy.square().sum()),
        float((dx * dy).sum()),
    )


def combine(a: Moments, b: Moments) -> Moments:
    """Moments of the union of two disjoint sample sets (Chan et al. pairwise update).

    With ``n = n_a + n_b``, ``δx = x̄_b − x̄_a``, ``δy = ȳ_b − ȳ_a``:
    ``x̄ = x̄_a + δx · n_b / n``, ``m2_x = m2_x,a + m2_x,b + δx² · n_a n_b / n``,
    ``c_xy = c_a + c_b + δx δy · n_a n_b / n`` (likewise for y). Exact in exact arithmetic;
    a side with ``n = 0`` is the identity (returned unchanged).
    """
    if a.n == 0:
        return b
    if b.n == 0:
        return a
    n = a.n + b.n
    dx = b.mean_x - a.mean_x
    dy = b.mean_y - a.mean_y
    w = a.n * b.n / n
    return Moments(
        n,
        a.mean_x + dx * (b.n / n),
        a.m2_x + b.m2_x + dx * dx * w,
        a.mean_y + dy * (b.n / n),
        a.m2_y + b.m2_y + dy * dy * w,
        a.c_xy + b.c_xy + dx * dy * w,
    )


def combine_all(parts: Iterable[Moments]) -> Moments:
    """Combine partial moments as a balanced pairwise tree; ``Moments(0)`` if there are none."""
    level = list(parts)
    if not level:
        return Moments(0)
    while len(level) > 1:
        nxt = [combine(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


def as_tensor(m: Moments, device: torch.device | str | None = None) -> Tensor:
    """Pack ``m`` as a float64 tensor ``[6]`` in :data:`MOMENTS_FIELDS` order.

    Meant for ``torch.distributed.all_gather``; ``n`` is exact up to 2**53.
    """
    return torch.tensor([float(getattr(m, f)) for f in MOMENTS_FIELDS], dtype=torch.float64,
                        device=device)


def from_tensor(t: Tensor) -> Moments | list[Moments]:
    """Inverse of :func:`as_tensor`: a ``[6]`` tensor gives one ``Moments``, ``[k, 6]`` a list.

    Raises ValueError if the last dimension is not 6 or ``n`` is not a non-negative integer.
    """
    if t.ndim not in (1, 2) or t.shape[-1] != len(MOMENTS_FIELDS):
        raise ValueError(f"expected a tensor of shape [6] or [k, 6], got {tuple(t.shape)}")
    rows = t.detach().to(device="cpu", dtype=torch.float64)
    if rows.ndim == 1:
        return _row_to_moments(rows.tolist())
    return [_row_to_moments(r) for r in rows.tolist()]


def _row_to_moments(row: list[float]) -> Moments:
    n = row[0]
    if not math.isfinite(n) or n < 0 or n != int(n):
        raise ValueError(f"moments tensor has n = {n}, expected a non-negative integer")
    return Moments(int(n), *row[1:])


def variance_of_mean(sample_var: float, n: int, eta: float = 1.0) -> float:
    """Variance of ``η · mean`` of ``n`` samples: ``η² · sample_var / n``.

    Units: (units of the samples · units of η)². Raises ValueError if ``n < 1`` or
    ``sample_var < 0``.
    """
    if n < 1:
        raise ValueError(f"variance_of_mean needs n >= 1, got n = {n}")
    if not sample_var >= 0.0:  # also rejects NaN
        raise ValueError(f"sample_var must be >= 0, got {sample_var}")
    return eta * eta * sample_var / n


def standard_error(variance: float, eta: float = 1.0) -> float:
    """``|η| · sqrt(variance)``: e.g. ``SE(δH₁) = η · sqrt(V_X + V_Y)``.

    For ``SE_E = η · sqrt(sample_var(s) / B_E)`` pass ``variance = sample_var / B_E``
    (or use ``math.sqrt(variance_of_mean(sample_var, B_E, eta))``).
    Raises ValueError on a negative or NaN variance.
    """
    if not variance >= 0.0:
        raise ValueError(f"variance must be >= 0, got {variance}")
    return abs(eta) * math.sqrt(variance)


def jackknife_se(columns: Tensor | Sequence, statistic: Callable[[Tensor], Tensor]) -> float:
    """Delete-one jackknife SE of ``statistic(column means)`` over the ``n`` rows (e.g. prompts).

    Args:
        columns: ``[n]`` or ``[n, k]`` real samples, cast to float64; row ``i`` is left out in turn.
        statistic: maps a ``[m, k]`` float64 tensor of mean vectors, row-wise, to ``[m]``
            (e.g. ``lambda m: m[:, 0] * m[:, 1]``); a ``[n]`` input is seen as ``[n, 1]``.

    The leave-one-out means are ``x̄₍ᵢ₎ = x̄ + (x̄ − xᵢ)/(n − 1)`` (no loop), ``θᵢ = statistic(x̄₍ᵢ₎)``
    and ``SE = sqrt((n − 1)/n · Σᵢ (θᵢ − θ̄)²)``, centred two-pass. For the plain mean this is
    exactly ``sqrt(sample_var / n)``; for a smooth function of means it needs no delta method.

    Raises:
        ValueError: fewer than 2 rows, a non-finite sample, or a statistic of the wrong shape.
    """
    x = torch.as_tensor(columns).detach().to(device="cpu", dtype=torch.float64)
    x = x[:, None] if x.ndim == 1 else x
    if x.ndim != 2:
        raise ValueError(f"columns must be [n] or [n, k], got shape {tuple(x.shape)}")
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"jackknife_se needs at least 2 rows, got n = {n}")
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        i, j = (int(v) for v in bad.nonzero()[0])
        raise ValueError(f"columns[{i}, {j}] is not finite ({x[i, j].item()})")
    mean = x.mean(0)
    theta = torch.as_tensor(statistic(mean + (mean - x) / (n - 1)), dtype=torch.float64)
    if theta.shape != (n,):
        raise ValueError(f"statistic returned shape {tuple(theta.shape)} for {n} leave-one-out means; expected [{n}]")
    return math.sqrt((n - 1) / n * float((theta - theta.mean()).square().sum()))
