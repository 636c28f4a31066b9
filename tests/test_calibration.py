"""functional_probe.calibration against closed forms, a scalar loop and simulation."""

import math

import pytest
import torch

from functional_probe.calibration import (
    calibrate,
    chi2_sf,
    excess_kurtosis,
    t_multiplier,
    welch_dof,
)


@pytest.mark.parametrize("k", [1.0, 2.0, 3.0])
def test_t_multiplier_closed_form_and_limits(k):
    phi = 0.5 * math.erfc(-k / math.sqrt(2))
    assert t_multiplier(k, 1) == pytest.approx(math.tan(math.pi * (phi - 0.5)), rel=1e-9)
    assert t_multiplier(k, math.inf) == k
    assert k < t_multiplier(k, 1e4) < k * 1.001  # → k as dof → ∞
    assert t_multiplier(k, 5) > t_multiplier(k, 20)


def test_chi2_sf_closed_form():
    for x in (0.1, 2.0, 16.0):
        assert chi2_sf(x, 2) == pytest.approx(math.exp(-x / 2), rel=1e-13)
    assert chi2_sf(0.0, 3) == 1.0


def test_excess_kurtosis_against_a_loop():
    x = [0.3, -1.2, 4.0, 0.0, 2.2, -0.7, 9.5]
    n, m = len(x), sum(x) / len(x)
    m2 = sum((v - m) ** 2 for v in x) / n
    m4 = sum((v - m) ** 4 for v in x) / n
    g2 = m4 / m2**2 - 3
    assert excess_kurtosis(x) == pytest.approx(((n + 1) * g2 + 6) * (n - 1) / ((n - 2) * (n - 3)), rel=1e-13)


def test_welch_dof():
    assert welch_dof([2.0, 2.0], [7, 7]) == pytest.approx(14.0)  # equal parts: the dofs add
    assert welch_dof([1.0, 0.0], [3, 9]) == pytest.approx(3.0)  # one part alone: its dof
    assert welch_dof([0.0], [4]) == math.inf


def test_bad_input_raises():
    with pytest.raises(ValueError, match="dofs\\[1\\]"):
        welch_dof([1.0, 1.0], [3, 0])
    with pytest.raises(ValueError, match="at least 4"):
        calibrate([1.0, 2.0, 3.0], [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="ses\\[2\\]"):
        calibrate([1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="dof"):
        t_multiplier(2.0, 0)
    with pytest.raises(ValueError, match="equal"):
        excess_kurtosis([1.0] * 5)


def test_calibrate_fields_against_direct_formulas():
    gen = torch.Generator().manual_seed(3)
    d, se = torch.randn(12, generator=gen, dtype=torch.float64), 0.5 + torch.rand(12, generator=gen, dtype=torch.float64)
    c = calibrate(d, se)
    dev = d - d.mean()
    assert c.chi2 == pytest.approx(float(dev.square().sum() / se.square().mean()), rel=1e-12)
    assert c.ratio == pytest.approx(float(d.std() / se.square().mean().sqrt()), rel=1e-12)
    assert c.ratio_interval[0] < c.ratio < c.ratio_interval[1]
    assert c.d_eff == pytest.approx(2 / (2 / 11 + c.kurtosis / 12), rel=1e-12)
    z = dev / se * math.sqrt(12 / 11)
    assert c.coverage[2] == pytest.approx(float((z.abs() <= 2).double().mean()))


def test_robust_p_holds_its_size_under_heavy_tails_where_chi2_does_not():
    """Honest SE (the true SD), replicates d_r ~ Laplace (excess kurtosis 3), R = 8: the plain χ²
    test at 5% rejects far too often; the Satterthwaite one stays near its size."""
    gen = torch.Generator().manual_seed(0)
    sims, R = 2000, 8
    u = torch.rand(sims, R, generator=gen, dtype=torch.float64) - 0.5
    d = -u.sign() * torch.log1p(-2 * u.abs()) / math.sqrt(2)  # Laplace with unit variance
    plain = robust = 0
    for row in d:
        c = calibrate(row, torch.ones(R, dtype=torch.float64), bootstrap=100)
        plain, robust = plain + (c.p_chi2 < 0.05), robust + (c.p_robust < 0.05)
    binomial = 3 * math.sqrt(0.05 * 0.95 / sims)
    assert plain / sims > 0.05 + binomial
    assert abs(robust / sims - 0.05) < abs(plain / sims - 0.05)


def test_bootstrap_interval_covers_an_honest_ratio():
    """Normal replicates, SE = the true SD, R = 100: the 90% interval of SD/RMS SE contains 1 in
    about 90% of simulations (3 binomial SEs, percentile bootstrap's small undercoverage allowed)."""
    gen = torch.Generator().manual_seed(1)
    sims = 200
    hits = sum(
        c.ratio_interval[0] <= 1.0 <= c.ratio_interval[1]
        for c in (calibrate(torch.randn(100, generator=gen, dtype=torch.float64), torch.ones(100), bootstrap=1000,
                            seed=s) for s in range(sims))  # fmt: skip
    )
    assert abs(hits / sims - 0.9) < 3 * math.sqrt(0.09 / sims) + 0.02
