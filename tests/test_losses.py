"""X and Y losses against loop transcriptions of DESIGN §1, closed-form gradients and
finite differences."""

from __future__ import annotations

import pytest
import torch
from torch.func import grad, jvp, vjp, vmap

from functional_probe.batch import Batch, make_batch
from functional_probe.losses import WEIGHTINGS, x_losses, y_losses


def _batch(group: int = 3, seed: int = 0, max_lengths=None) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    n_prompts = 4
    prompts = [[1] * (n + 1) for n in range(n_prompts)]
    responses = [
        [[2] * int(torch.randint(1, 9, (), generator=gen)) for _ in range(group)]
        for _ in range(n_prompts)
    ]
    adv = torch.randn(n_prompts, group, generator=gen, dtype=torch.float64).tolist()
    return make_batch(prompts, responses, advantages=adv, max_lengths=max_lengths)


def _S(batch: Batch, seed: int = 1, dtype=torch.float64) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    shape = (batch.num_prompts, batch.group_size)
    return (-20 * torch.rand(shape, generator=gen, dtype=torch.float64)).to(dtype)


# ------------------------------------------------------------- loop transcriptions


def _coeffs_loop(S: list[list[float]], batch: Batch, weighting: str) -> list[list[float]]:
    """c[n][g] = w - b, written element by element from DESIGN §1."""
    lmax = batch.max_lengths.tolist()
    lens = batch.response_lengths.tolist()
    out = []
    for n, row in enumerate(S):
        group = len(row)
        if weighting == "dr_grpo":
            w = [row[g] / lmax[n] for g in range(group)]
        else:
            w = [row[g] / lens[n][g] for g in range(group)]
        cs = []
        for g in range(group):
            others = 0.0
            for h in range(group):
                if h != g:
                    others += w[h]
            b = others / max(group - 1, 1)
            cs.append(w[g] - b)
        out.append(cs)
    return out


def _x_loop(S: list[list[float]], batch: Batch, weighting: str) -> list[float]:
    c = _coeffs_loop(S, batch, weighting)
    out = []
    for n, row in enumerate(S):
        total = 0.0
        for g in range(len(row)):
            total += c[n][g] * row[g]
        out.append(-total / len(row))
    return out


def _y_loop(S: list[list[float]], batch: Batch) -> list[float]:
    adv = batch.advantages.tolist()
    lmax = batch.max_lengths.tolist()
    out = []
    for n, row in enumerate(S):
        total = 0.0
        for g in range(len(row)):
            total += adv[n][g] / lmax[n] * row[g]
        out.append(total / len(row))
    return out


# ------------------------------------------------------------------------ values


@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("group", [1, 2, 5])
@pytest.mark.parametrize("max_lengths", [None, [9, 10, 11, 12]])
def test_x_losses_match_loop(weighting, group, max_lengths):
    batch = _batch(group, max_lengths=max_lengths)
    S = _S(batch)
    got = x_losses(S, batch, weighting=weighting)
    assert got.shape == (batch.num_prompts,)
    assert got.dtype == torch.float64
    ref = torch.tensor(_x_loop(S.tolist(), batch, weighting), dtype=torch.float64)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=0)


@pytest.mark.parametrize("group", [1, 2, 5])
def test_y_losses_match_loop(group):
    batch = _batch(group, max_lengths=[9, 10, 11, 12])
    S = _S(batch)
    got = y_losses(S, batch)
    assert got.shape == (batch.num_prompts,)
    ref = torch.tensor(_y_loop(S.tolist(), batch), dtype=torch.float64)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=0)


def test_default_weighting_is_dr_grpo_and_differs_from_per_token_avg():
    batch = _batch(3)
    S = _S(batch)
    torch.testing.assert_close(x_losses(S, batch), x_losses(S, batch, weighting="dr_grpo"))
    assert not torch.allclose(x_losses(S, batch), x_losses(S, batch, weighting="per_token_avg"))


def test_g1_zero_baseline_closed_form():
    """G = 1: b = 0, so c = w and Lx[n] = -S[n, 0]^2 / Lmax[n] (dr_grpo)."""
    batch = _batch(1, max_lengths=[9, 10, 11, 12])
    S = _S(batch)
    expected = -(S[:, 0] ** 2) / batch.max_lengths.double()
    torch.testing.assert_close(x_losses(S, batch), expected, rtol=1e-12, atol=0)
    expected_pta = -(S[:, 0] ** 2) / batch.response_lengths[:, 0].double()
    torch.testing.assert_close(
        x_losses(S, batch, weighting="per_token_avg"), expected_pta, rtol=1e-12, atol=0
    )


def test_equal_sequences_give_zero_x_loss():
    """Identical normalised log-probs in a group: w = b, c = 0, Lx = 0."""
    batch = make_batch([[1], [2]], [[[3, 4]] * 3, [[5]] * 3])
    S = torch.tensor([[-2.0, -2.0, -2.0], [-0.5, -0.5, -0.5]])
    assert torch.equal(x_losses(S, batch), torch.zeros(2))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_promoted_to_float32(dtype):
    batch = _batch(3)
    S = _S(batch, dtype=dtype)
    for out in (x_losses(S, batch), y_losses(S, batch)):
        assert out.dtype == torch.float32
    ref_x = torch.tensor(_x_loop(S.double().tolist(), batch, "dr_grpo"), dtype=torch.float32)
    torch.testing.assert_close(x_losses(S, batch), ref_x, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------- gradients


@pytest.mark.parametrize("weighting", WEIGHTINGS)
@pytest.mark.parametrize("group", [1, 4])
def test_grad_x_equals_closed_form_minus_c_over_g(weighting, group):
    batch = _batch(group, seed=3)
    S = _S(batch, seed=4)
    c = torch.tensor(_coeffs_loop(S.tolist(), batch, weighting), dtype=torch.float64)
    closed = -c / group  # dLx[n]/dS[n,g]; other prompts' entries are zero
    for n in range(batch.num_prompts):
        g_n = grad(lambda s, n=n: x_losses(s, batch, weighting=weighting)[n])(S)
        expected = torch.zeros_like(S)
        expected[n] = closed[n]
        torch.testing.assert_close(g_n, expected, rtol=1e-12, atol=1e-15)
    # gradient of the sum: every entry at once, and autograd agrees with torch.func
    g_all = grad(lambda s: x_losses(s, batch, weighting=weighting).sum())(S)
    torch.testing.assert_close(g_all, closed, rtol=1e-12, atol=1e-15)
    S_req = S.clone().requires_grad_(True)
    x_losses(S_req, batch, weighting=weighting).sum().backward()
    torch.testing.assert_close(S_req.grad, closed, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_grad_x_equals_finite_differences_of_frozen_surrogate(weighting):
    """Central differences of -mean_g(c0 * S) with c0 frozen at S0 (a linear function,
    so the difference quotient is exact up to rounding)."""
    batch = _batch(3, seed=5)
    S0 = _S(batch, seed=6)
    c0 = _coeffs_loop(S0.tolist(), batch, weighting)

    def frozen(s: torch.Tensor) -> float:
        rows = s.tolist()
        return sum(
            -sum(c0[n][g] * rows[n][g] for g in range(len(rows[n]))) / len(rows[n])
            for n in range(len(rows))
        )

    eps = 1e-4
    fd = torch.zeros_like(S0)
    for n in range(S0.shape[0]):
        for g in range(S0.shape[1]):
            e = torch.zeros_like(S0)
            e[n, g] = eps
            fd[n, g] = (frozen(S0 + e) - frozen(S0 - e)) / (2 * eps)
    got = grad(lambda s: x_losses(s, batch, weighting=weighting).sum())(S0)
    torch.testing.assert_close(got, fd, rtol=1e-8, atol=1e-10)
    # and the coefficient really is frozen: differences of the *unfrozen* loss differ
    full_fd = torch.zeros_like(S0)
    for n in range(S0.shape[0]):
        for g in range(S0.shape[1]):
            e = torch.zeros_like(S0)
            e[n, g] = eps
            full_fd[n, g] = (
                x_losses(S0 + e, batch, weighting=weighting).sum()
                - x_losses(S0 - e, batch, weighting=weighting).sum()
            ) / (2 * eps)
    assert not torch.allclose(got, full_fd, rtol=1e-3)


def test_grad_y_closed_form():
    batch = _batch(3, seed=7, max_lengths=[9, 10, 11, 12])
    S = _S(batch, seed=8)
    got = grad(lambda s: y_losses(s, batch).sum())(S)
    expected = batch.advantages.double() / batch.max_lengths.double()[:, None] / 3
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_jvp_x_equals_closed_form(weighting):
    batch = _batch(3, seed=9)
    S = _S(batch, seed=10)
    tangent = torch.randn(S.shape, generator=torch.Generator().manual_seed(11), dtype=S.dtype)
    c = torch.tensor(_coeffs_loop(S.tolist(), batch, weighting), dtype=torch.float64)
    primal, dual = jvp(lambda s: x_losses(s, batch, weighting=weighting), (S,), (tangent,))
    torch.testing.assert_close(primal, x_losses(S, batch, weighting=weighting))
    torch.testing.assert_close(dual, (-c / 3 * tangent).sum(dim=1), rtol=1e-12, atol=1e-15)


def test_jvp_y_equals_closed_form():
    batch = _batch(2, seed=12)
    S = _S(batch, seed=13)
    tangent = torch.ones_like(S)
    _, dual = jvp(lambda s: y_losses(s, batch), (S,), (tangent,))
    expected = (batch.advantages.double() / batch.max_lengths.double()[:, None]).mean(dim=1)
    torch.testing.assert_close(dual, expected, rtol=1e-12, atol=1e-15)


def test_vmap_grad_and_vjp_of_x_losses():
    """Per-prompt gradients via vmap over the output cotangent, and vmap over S copies."""
    batch = _batch(3, seed=14)
    S = _S(batch, seed=15)
    c = torch.tensor(_coeffs_loop(S.tolist(), batch, "dr_grpo"), dtype=torch.float64)
    _, pullback = vjp(lambda s: x_losses(s, batch), S)
    eye = torch.eye(batch.num_prompts, dtype=S.dtype)
    (jac,) = vmap(pullback)(eye)  # [N, N, G]: d Lx[n] / d S[m, g]
    expected = torch.zeros_like(jac)
    for n in range(batch.num_prompts):
        expected[n, n] = -c[n] / 3
    torch.testing.assert_close(jac, expected, rtol=1e-12, atol=1e-15)
    stacked = torch.stack([S, 2 * S])
    grads = vmap(grad(lambda s: x_losses(s, batch).sum()))(stacked)
    torch.testing.assert_close(grads[0], -c / 3, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(grads[1], -2 * c / 3, rtol=1e-12, atol=1e-15)


# --------------------------------------------------------------------- bad input


@pytest.mark.parametrize("weighting", ["grpo", "DR_GRPO", "", None])
def test_unknown_weighting_raises(weighting):
    batch = _batch(2)
    with pytest.raises(
        ValueError, match=r"unknown weighting .*expected one of 'dr_grpo', 'per_token_avg'"
    ):
        x_losses(_S(batch), batch, weighting=weighting)


def test_unknown_weighting_message_names_it():
    batch = _batch(2)
    with pytest.raises(ValueError, match="'grpo'"):
        x_losses(_S(batch), batch, weighting="grpo")


@pytest.mark.parametrize("fn", [x_losses, y_losses])
@pytest.mark.parametrize("shape", [(4,), (4, 3), (3, 2), (4, 2, 1)])
def test_wrong_shape_raises(fn, shape):
    batch = _batch(2)
    with pytest.raises(ValueError, match=r"S has shape .*expected \[N, G\] = \[4, 2\]"):
        fn(torch.zeros(shape), batch)


@pytest.mark.parametrize("fn", [x_losses, y_losses])
def test_integer_S_raises(fn):
    batch = _batch(2)
    with pytest.raises(ValueError, match="floating-point"):
        fn(torch.zeros(4, 2, dtype=torch.int64), batch)
