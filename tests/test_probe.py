"""fp.probe against the same quantities assembled from reference loops and numpy."""

import numpy as np
import pytest
import torch
from helpers import random_rollouts

import functional_probe as fp
from functional_probe.grads import dot
from functional_probe.probe import ProbeResult, probe

ETA = 2e-3


@pytest.fixture(scope="module")
def setting(tiny_fp32):
    model = tiny_fp32
    pe, re_, ae = random_rollouts(5, 3, model.vocab_size, seed=11)
    pu, ru, au = random_rollouts(4, 3, model.vocab_size, seed=12)
    E = fp.make_batch(pe, re_, advantages=ae)
    U = fp.make_batch(pu, ru, advantages=au)
    params = {k: torch.nn.Parameter(v.clone()) for k, v in model.lora.items()}
    opt = torch.optim.AdamW(params.values(), lr=ETA)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        for p in params.values():
            p.grad = torch.randn(p.shape, generator=gen) * 0.01
        opt.step()
    pre = fp.AdamPreconditioner.from_optimizer(opt, params)
    return model, {k: p.detach() for k, p in params.items()}, E, U, pre


def loop_reference(model, lora, E, U, pre):
    """Per-prompt gradients by the loop method, assembled by hand (numpy float64)."""
    X = [fp.mean_grad(model, lora, E[n], loss="x") for n in range(len(E))]
    Y = [pre(fp.mean_grad(model, lora, U[p], loss="y")) for p in range(len(U))]
    mu_x = {k: torch.stack([x[k] for x in X]).mean(0) for k in lora}
    mu_y = {k: torch.stack([y[k] for y in Y]).mean(0) for k in lora}

    def d64(a, b):
        return float(dot({k: v.double() for k, v in a.items()}, {k: v.double() for k, v in b.items()}))

    s = np.array([d64(x, mu_y) for x in X])
    t = np.array([d64(y, mu_x) for y in Y])
    scale = (d64(mu_x, mu_x) * d64(mu_y, mu_y)) ** 0.5  # ‖μX‖·‖μY‖, the natural size of errors in <μX, μY>
    return d64(mu_x, mu_y), s, t, scale


def test_probe_equals_loop_assembled_quantities(setting):
    model, lora, E, U, pre = setting
    r = probe(model, lora, E, U, preconditioner=pre, eta=ETA)
    bars_dot, s, t, scale = loop_reference(model, lora, E, U, pre)
    V_X = np.var(s, ddof=1) / len(s)
    V_Y = np.var(t, ddof=1) / len(t)
    assert abs(bars_dot) > 1e-3
    # <μX, μY> cancels (|bars_dot| ≪ ‖μX‖‖μY‖): a 1e-6 error in either vector moves it by
    # 1e-6·‖μX‖‖μY‖, so that is the scale the 1e-5 bar is measured on.
    print(f"cancellation factor ‖μX‖‖μY‖/|<μX, μY>| = {scale / abs(bars_dot):.1f}")
    assert abs(r.bars_dot - bars_dot) <= 1e-5 * scale
    assert r.delta_h1 == pytest.approx(ETA * r.bars_dot, rel=1e-12)
    assert np.max(np.abs(np.array(r.s) - s)) / np.max(np.abs(s)) <= 1e-5
    assert np.max(np.abs(np.array(r.t) - t)) / np.max(np.abs(t)) <= 1e-5
    assert r.V_X == pytest.approx(V_X, rel=1e-5)
    assert r.V_Y == pytest.approx(V_Y, rel=1e-5)
    assert r.C_XY == 0.0 and r.shared_prompts == 0
    assert r.se == pytest.approx(ETA * np.sqrt(V_X + V_Y), rel=1e-5)
    assert r.se_conditional == pytest.approx(ETA * np.sqrt(V_X), rel=1e-5)
    assert (r.B_E, r.B_U) == (5, 4)
    assert set(r.timings) == {"mu_x", "mu_y", "proj_s", "proj_t", "total"}


def test_V_X_equals_alpha_variance_var_over_eta_squared(setting):
    model, lora, E, U, pre = setting
    r = probe(model, lora, E, U, preconditioner=pre, eta=ETA, method="vjp")
    mu_y = fp.mean_grad(model, lora, U, loss="y", preconditioner=pre)
    av = fp.alpha_variance(lora, E, model=model, direction=mu_y, eta=ETA)
    assert r.V_X == pytest.approx(av.var / ETA**2, rel=1e-5)


def test_same_batch_twice_includes_the_cross_term(setting):
    model, lora, E, _, pre = setting
    r = probe(model, lora, E, E, preconditioner=pre, eta=ETA)
    s, t = np.array(r.s), np.array(r.t)
    B = len(s)
    C = np.sum((s - s.mean()) * (t - t.mean())) / (B * (B - 1))
    assert r.shared_prompts == B
    assert r.C_XY == pytest.approx(C, rel=1e-10)
    assert r.se == pytest.approx(ETA * np.sqrt(r.V_X + r.V_Y + 2 * C), rel=1e-10)


def test_result_round_trips_through_json(setting):
    model, lora, E, U, pre = setting
    r = probe(model, lora, E, U, preconditioner=pre, eta=ETA)
    assert ProbeResult.from_json(r.to_json()) == r


def test_fewer_than_two_prompts_raise(setting):
    model, lora, E, U, pre = setting
    with pytest.raises(ValueError, match="at least 2 prompts in U"):
        probe(model, lora, E, U[:1], preconditioner=pre, eta=ETA)
