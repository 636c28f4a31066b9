"""stats.py against numpy float64 formulas, an ill-conditioned case, and Chan's combination."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from functional_probe.stats import (
    Moments,
    as_tensor,
    combine,
    combine_all,
    from_tensor,
    jackknife_se,
    moments,
    standard_error,
    variance_of_mean,
)


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


@pytest.mark.parametrize("n", [2, 3, 17, 1000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_numpy(n: int, dtype: torch.dtype) -> None:
    rng = np.random.default_rng(n)
    x = torch.from_numpy(rng.normal(3.0, 2.0, n)).to(dtype)
    y = torch.from_numpy(0.5 * x.double().numpy() + rng.normal(-1.0, 0.7, n)).to(dtype)
    xn, yn = x.double().numpy(), y.double().numpy()
    m = moments(x, y)
    cov = np.cov(xn, yn)  # ddof=1
    assert m.n == n
    assert rel(m.mean_x, xn.mean()) < 1e-12
    assert rel(m.mean_y, yn.mean()) < 1e-12
    assert rel(m.sample_var_x(), np.var(xn, ddof=1)) < 1e-12
    assert rel(m.sample_var_y(), np.var(yn, ddof=1)) < 1e-12
    assert rel(m.sample_cov(), cov[0, 1]) < 1e-10
    assert rel(m.var_of_mean_x(), np.var(xn, ddof=1) / n) < 1e-12
    assert rel(m.var_of_mean_y(), np.var(yn, ddof=1) / n) < 1e-12
    assert rel(m.cov_of_means(), cov[0, 1] / n) < 1e-10
    assert rel(m.var_of_mean_sum(), np.var(xn + yn, ddof=1) / n) < 1e-10
    # x-only moments are the moments of (x, 0)
    mx = moments(x)
    assert mx == Moments(n, m.mean_x, m.m2_x)
    assert mx == moments(x, torch.zeros(n))


def test_ill_conditioned_float32() -> None:
    """Mean 1e4, spread 1e-3, float32 values: naive Σs² − n·s̄² is garbage, two-pass is not."""
    n = 4096
    rng = np.random.default_rng(0)
    x32 = torch.from_numpy(1e4 + 1e-3 * rng.standard_normal(n)).to(torch.float32)
    x64 = x32.double().numpy()  # exactly the same values
    truth = np.var(x64, ddof=1)
    assert truth > 0  # the float32 values do carry spread

    naive = float((x32.square().sum() - n * x32.mean().square()) / (n - 1))
    assert rel(naive, truth) >= 0.5  # not one correct digit (here: exactly 0 or the wrong sign)

    ours = moments(x32).sample_var_x()
    assert rel(ours, truth) <= 1e-10
    assert rel(moments(x32).mean_x, x64.mean()) <= 1e-12


def test_empty_and_small() -> None:
    assert moments(torch.empty(0)) == Moments(0)
    assert moments(torch.empty(0), torch.empty(0)) == Moments(0)
    one = moments(torch.tensor([2.5]), torch.tensor([1.0]))
    assert one == Moments(1, 2.5, 0.0, 1.0, 0.0, 0.0)
    for m in (Moments(0), one):
        for f in (m.sample_var_x, m.sample_var_y, m.sample_cov, m.var_of_mean_x,
                  m.var_of_mean_y, m.cov_of_means, m.var_of_mean_sum):
            with pytest.raises(ValueError, match=f"n = {m.n}"):
                f()


def test_a_python_list_keeps_float64_digits() -> None:
    # 1 + 1e-9 is 1.0 in float32: a list routed through torch's default dtype would lose it
    xs = [1.0 + 1e-9, 1.0, 1.0 - 3e-9, 1.0 + 5e-9]
    assert moments(xs).mean_x == pytest.approx(math.fsum(xs) / len(xs), rel=1e-15, abs=0)
    assert moments(xs).sample_var_x() == pytest.approx(float(np.var(xs, ddof=1)), rel=1e-9)


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="same length"):
        moments(torch.ones(3), torch.ones(4))
    with pytest.raises(ValueError, match="1-D"):
        moments(torch.ones(2, 2))
    with pytest.raises(ValueError, match=r"x\[1\] is not finite"):
        moments(torch.tensor([1.0, float("nan"), 2.0]))
    with pytest.raises(ValueError, match=r"y\[0\] is not finite"):
        moments(torch.ones(2), torch.tensor([float("inf"), 1.0]))
    with pytest.raises(ValueError, match="non-negative int"):
        Moments(-1)


finite = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, allow_infinity=False)


@st.composite
def split_data(draw: st.DrawFn) -> tuple[list[float], list[float], list[int]]:
    n = draw(st.integers(min_value=0, max_value=40))
    xs = draw(st.lists(finite, min_size=n, max_size=n))
    ys = draw(st.lists(finite, min_size=n, max_size=n))
    cuts = sorted(draw(st.lists(st.integers(0, n), max_size=6)))
    return xs, ys, cuts


def close(a: float, b: float, scale: float) -> bool:
    return abs(a - b) <= 1e-10 * max(abs(b), scale)


@settings(max_examples=200, deadline=None)
@given(split_data(), st.booleans())
def test_combine_any_split_equals_whole(data: tuple, tree: bool) -> None:
    xs, ys, cuts = data
    x, y = torch.tensor(xs, dtype=torch.float64), torch.tensor(ys, dtype=torch.float64)
    bounds = [0, *cuts, len(xs)]  # repeated cuts give empty parts
    parts = [moments(x[a:b], y[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    if tree:
        got = combine_all(parts)
    else:
        got = Moments(0)
        for p in parts:
            got = combine(got, p)
    want = moments(x, y)
    assert got.n == want.n
    # absolute floor: the centred sums are rounding-level when the data are (near-)constant
    sx = sum(v * v for v in xs) + 1.0
    sy = sum(v * v for v in ys) + 1.0
    assert close(got.mean_x, want.mean_x, math.sqrt(sx))
    assert close(got.mean_y, want.mean_y, math.sqrt(sy))
    assert close(got.m2_x, want.m2_x, 1e-6 * sx)
    assert close(got.m2_y, want.m2_y, 1e-6 * sy)
    assert close(got.c_xy, want.c_xy, 1e-6 * math.sqrt(sx * sy))


def test_combine_identity_and_single() -> None:
    m = moments(torch.tensor([1.0, 2.0, 4.0]), torch.tensor([0.0, 1.0, 5.0]))
    assert combine(Moments(0), m) is m
    assert combine(m, Moments(0)) is m
    singles = [moments(torch.tensor([v]), torch.tensor([w]))
               for v, w in [(1.0, 0.0), (2.0, 1.0), (4.0, 5.0)]]
    got = combine_all(singles)
    assert got.n == 3
    for f in ("mean_x", "m2_x", "mean_y", "m2_y", "c_xy"):
        assert getattr(got, f) == pytest.approx(getattr(m, f), rel=1e-14)
    assert combine_all([]) == Moments(0)


def test_tensor_round_trip() -> None:
    m = moments(torch.randn(11, dtype=torch.float64), torch.randn(11, dtype=torch.float64))
    t = as_tensor(m)
    assert t.dtype == torch.float64 and t.shape == (6,)
    assert from_tensor(t) == m
    stacked = torch.stack([t, as_tensor(Moments(0))])
    assert from_tensor(stacked) == [m, Moments(0)]
    with pytest.raises(ValueError, match="shape"):
        from_tensor(torch.zeros(5))
    with pytest.raises(ValueError, match="n = 2.5"):
        from_tensor(torch.tensor([2.5, 0, 0, 0, 0, 0], dtype=torch.float64))


def test_standard_errors() -> None:
    s = torch.tensor([0.3, -1.2, 2.2, 0.9, 0.1], dtype=torch.float64)
    eta = 1e-2
    sv = float(np.var(s.numpy(), ddof=1))
    m = moments(s)
    assert variance_of_mean(m.sample_var_x(), m.n, eta) == pytest.approx(eta**2 * sv / 5, rel=1e-14)
    assert standard_error(m.var_of_mean_x(), eta) == pytest.approx(eta * math.sqrt(sv / 5),
                                                                   rel=1e-14)
    assert standard_error(4.0, -0.5) == 1.0
    with pytest.raises(ValueError, match="variance"):
        standard_error(-1.0)
    with pytest.raises(ValueError, match="n = 0"):
        variance_of_mean(1.0, 0)


def direct_jackknife(x: np.ndarray, statistic) -> float:
    """The textbook delete-one jackknife by an explicit loop over rows (float64 numpy)."""
    n = x.shape[0]
    theta = np.array([statistic(np.delete(x, i, axis=0).mean(0)[None])[0] for i in range(n)])
    return math.sqrt((n - 1) / n * ((theta - theta.mean()) ** 2).sum())


def test_jackknife_equals_a_leave_one_out_loop_and_the_plain_se_for_a_mean() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(37, 3, generator=gen, dtype=torch.float64) + torch.tensor([1.0, 2.0, -0.5], dtype=torch.float64)
    ratio = lambda m: m[:, 0] * m[:, 1] / m[:, 2]  # noqa: E731  a smooth non-linear statistic
    got = jackknife_se(x, ratio)
    assert got > 0.1 and rel(got, direct_jackknife(x.numpy(), ratio)) < 1e-12
    s = x[:, 0].float()  # float32 in, float64 out
    assert rel(jackknife_se(s, lambda m: m[:, 0]), math.sqrt(moments(s).var_of_mean_x())) < 1e-12


def test_jackknife_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="at least 2 rows"):
        jackknife_se([1.0], lambda m: m[:, 0])
    with pytest.raises(ValueError, match=r"columns\[1, 0\] is not finite"):
        jackknife_se([1.0, math.inf], lambda m: m[:, 0])
    with pytest.raises(ValueError, match="statistic returned shape"):
        jackknife_se([1.0, 2.0, 3.0], lambda m: m.sum())
