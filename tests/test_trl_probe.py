"""trainer_probe: δH₁ ± SE of the trainer's next step on TRL rows, held against independent pieces:
the optimizer's own step on a copy (p.grad = TRL's loss gradient, then clip_grad_norm_), central
finite differences of the frozen X surrogate along that step, and per-prompt loops for s and t
(float64, tiny model; TRL's loss itself is held against TRL in test_trl_loss)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from helpers import dict_rel_err, random_rollouts
from test_trl_loss import random_rows

import functional_probe as fp
from functional_probe.first_order import frozen_surrogate
from functional_probe.grads import dot64
from functional_probe.trl_loss import trainer_grad, trainer_prompt_losses
from functional_probe.trl_probe import trainer_probe


@pytest.fixture(scope="module")
def setup():
    model = fp.tiny_model(seed=0, quantize=None, dtype=torch.float64)
    loss = fp.TrainerLoss(loss_type="dr_grpo", max_completion_length=8, gradient_accumulation_steps=2)
    rows = random_rows(loss, model, seed=3)
    pe, re_, _ = random_rollouts(5, 3, model.vocab_size, seed=11)
    E = fp.make_batch(pe, re_)
    params = {k: torch.nn.Parameter(v.clone()) for k, v in model.lora.items()}
    opt = torch.optim.AdamW(params.values(), lr=1e-5, weight_decay=0.01)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):  # momentum from earlier steps
        for p in params.values():
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype) * 1e-3
        opt.step()
    return model, loss, rows.split(5), E, opt, params


@pytest.mark.parametrize("max_grad_norm", [None, 1e-3])
def test_step_is_the_optimizers_and_delta_h1_its_finite_difference(setup, max_grad_norm):
    model, loss, mbs, E, opt, params = setup
    lora = {k: p.detach().clone() for k, p in params.items()}
    got = trainer_probe(model, lora, mbs, loss, E, optimizer=opt, named_params=params, max_grad_norm=max_grad_norm)
    opt2, params2 = copy.deepcopy((opt, params))
    g = trainer_grad(model, lora, mbs, loss)
    for k, p in params2.items():
        p.grad = g[k].clone()
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(list(params2.values()), max_grad_norm)
    opt2.step()
    taken = {k: params2[k].detach() - lora[k] for k in lora}
    assert dict_rel_err(got.delta, taken) < 1e-9
    assert dict_rel_err(got.grad, g) == 0.0
    assert (got.result.clip_coef < 1) == (max_grad_norm is not None)
    f, _ = frozen_surrogate(model, E, lora, "dr_grpo")
    fd = (f({k: lora[k] + taken[k] for k in lora}) - f({k: lora[k] - taken[k] for k in lora})) / 2
    assert fd != 0 and got.result.delta_h1 == pytest.approx(fd, rel=1e-6)


def test_s_and_t_are_per_prompt_loops(setup):
    """s_n = <∇X_n, Δθ/η> per prompt of E, t_p = <−N·∇L_trl[p], b> with b the step's pullback of μX,
    each by a plain per-prompt loop (mean_grad of one prompt; grad of one prompt's TRL loss term)."""
    model, loss, mbs, E, opt, params = setup
    lora = {k: p.detach().clone() for k, p in params.items()}
    got = trainer_probe(model, lora, mbs, loss, E, optimizer=opt, named_params=params)
    r, eta = got.result, got.result.eta
    s = [dot64(fp.mean_grad(model, lora, E[n], loss="x", temperature=loss.temperature),
               {k: v / eta for k, v in got.delta.items()}) for n in range(len(E))]  # fmt: skip
    np.testing.assert_allclose(r.s, s, rtol=1e-8)
    n_u = len(r.t)
    state = fp.AdamState.from_optimizer(opt, params)
    mu_x = fp.mean_grad(model, lora, E, loss="x", temperature=loss.temperature)
    b = {k: -v / eta for k, v in state.step({k: v for k, v in got.grad.items()}, lora).pullback(mu_x).items()}
    for p in range(n_u):
        gp = torch.func.grad(lambda th, p=p: trainer_prompt_losses(model, th, mbs, loss)[p])(lora)
        assert r.t[p] == pytest.approx(-n_u * dot64(gp, b), rel=1e-8)


def test_fewer_than_two_prompts_in_E_are_refused(setup):
    model, loss, mbs, E, opt, params = setup
    with pytest.raises(ValueError, match="at least 2 prompts in E"):
        trainer_probe(model, model.lora, mbs, loss, E[:1], optimizer=opt, named_params=params)


def test_rb_estimator_and_the_jackknife_by_per_prompt_loops(setup):
    """x_estimator="rb": s_n = <∇Xrb_n, Δθ/η> per prompt of E. se_jackknife: E's part V_X, U's the
    delete-one jackknife of θ̂₋ₚ = <μX, Δθ(p.grad = N/(N−1)·(g − ∇L_trl[p]))>/η over TRL's prompts."""
    model, loss, mbs, E, opt, params = setup
    lora = {k: p.detach().clone() for k, p in params.items()}
    r = trainer_probe(model, lora, mbs, loss, E, optimizer=opt, named_params=params, x_estimator="rb").result
    eta, kw = r.eta, dict(loss="x", temperature=loss.temperature, x_estimator="rb")
    direction = {k: v / eta for k, v in trainer_probe(model, lora, mbs, loss, E, optimizer=opt,
                                                      named_params=params).delta.items()}  # fmt: skip
    s = [dot64(fp.mean_grad(model, lora, E[n], **kw), direction) for n in range(len(E))]
    np.testing.assert_allclose(r.s, s, rtol=1e-8)
    assert r.x_estimator == "rb"
    state, mu_x, n_u = fp.AdamState.from_optimizer(opt, params), fp.mean_grad(model, lora, E, **kw), len(r.t)
    g = trainer_grad(model, lora, mbs, loss)
    theta = []
    for p in range(n_u):
        gp = torch.func.grad(lambda th, p=p: trainer_prompt_losses(model, th, mbs, loss)[p])(lora)
        theta.append(dot64(mu_x, state.step({k: n_u / (n_u - 1) * (g[k] - gp[k]) for k in g}, lora).delta) / eta)
    theta = np.array(theta)
    j_u = (n_u - 1) / n_u * np.sum((theta - theta.mean()) ** 2)
    print(f"V_X {r.V_X:.4e}, V_Y {r.V_Y:.4e}, jackknife U part {j_u:.4e}")
    assert r.se_jackknife == pytest.approx(eta * np.sqrt(r.V_X + j_u), rel=1e-8)
    with pytest.raises(ValueError, match="x_estimator='rbb'"):
        trainer_probe(model, lora, mbs, loss, E, optimizer=opt, named_params=params, x_estimator="rbb")
