"""optim_update.py: the update rule's clipping factor, its split into gradient / momentum / decay
(against real optimizer.step()s with a part switched off) and its Jacobian D and pullback
(against central finite differences of the step), through AdamState.step."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import dict_rel_err
from test_optim_step import TOL, history, make_params, rand_grads, real_step, two_groups

from functional_probe.optim_step import AdamState


@pytest.mark.parametrize("max_norm", [0.5, 1e3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_clipping_active_and_inactive(max_norm, dtype):
    params = make_params(dtype=dtype)
    opt = two_groups(params, weight_decay=0.01)
    history(opt, params, 2)
    grads = rand_grads(params, 7)
    step = AdamState.from_optimizer(opt, params).step(grads, max_grad_norm=max_norm)
    norm = torch.nn.utils.get_total_norm(list(grads.values())).item()
    assert step.grad_norm == pytest.approx(norm, rel=1e-6)
    assert step.clipping == (max_norm < norm)
    assert step.clip_coef == pytest.approx(min(1.0, max_norm / (norm + 1e-6)), rel=1e-6)  # torch: fp32 norm
    assert dict_rel_err(step.delta, real_step(opt, params, grads, max_grad_norm=max_norm)) <= TOL[dtype]
    if step.clipping:  # clipping changes the step (v sees c²g²): not the unclipped one
        assert dict_rel_err(step.delta, real_step(opt, params, grads)) > 1e-3


def test_parts_are_what_the_real_step_does():
    """momentum = real step − real step with exp_avg zeroed; decay = real step − real step with
    weight_decay 0 (AdamW: decoupled, m and v untouched); the parts sum to Δθ."""
    params = make_params(dtype=torch.float64)
    opt = torch.optim.AdamW(params.values(), lr=0.05, weight_decay=0.2)
    history(opt, params, 3)
    grads = rand_grads(params, 9)
    step = AdamState.from_optimizer(opt, params).step(grads)
    full = real_step(opt, params, grads)
    no_m, pm = copy.deepcopy((opt, params))
    for st in no_m.state.values():
        st["exp_avg"].zero_()
    no_wd, pw = copy.deepcopy((opt, params))
    no_wd.param_groups[0]["weight_decay"] = 0.0
    r_m, r_w = real_step(no_m, pm, grads), real_step(no_wd, pw, grads)
    assert dict_rel_err(step.momentum, {k: full[k] - r_m[k] for k in full}) <= 1e-9
    assert dict_rel_err(step.decay, {k: full[k] - r_w[k] for k in full}) <= 1e-9
    total = {k: step.gradient[k] + step.momentum[k] + step.decay[k] for k in full}
    assert dict_rel_err(total, step.delta) <= 1e-14
    assert min(step.momentum[k].norm() / step.gradient[k].norm() for k in full) > 0.1  # all parts live


def fd_state(amsgrad: bool, maximize: bool = False, steps: int = 3):
    """Adam with L2 decay (which enters v) after `steps` steps; no decay for the first step,
    whose gradients are of size ε (L2's λθ would swamp them)."""
    params = make_params(dtype=torch.float64)
    opt = torch.optim.Adam(params.values(), lr=0.05, weight_decay=0.1 if steps else 0.0, amsgrad=amsgrad,
                           maximize=maximize)  # fmt: skip
    history(opt, params, steps)
    return opt, params


@pytest.mark.parametrize("amsgrad,maximize,steps,scale", [
    (False, False, 3, 3.0), (True, False, 3, 3.0), (False, True, 3, 3.0), (False, False, 0, 1e-7)])  # fmt: skip
def test_jacobian_is_the_finite_difference(amsgrad, maximize, steps, scale):
    """The step is elementwise in g (no clipping), so the central difference along a random
    direction r gives D·r elementwise; D's v-term (g in the denominator) must matter. g² is
    comparable to v after 3 steps; at the first step (v = 0) D = lr·ε/(|g| + ε)², vanishing
    unless |g| ~ ε, so the first-step case uses gradients of size 1e-7 (and no decay)."""
    opt, params = fd_state(amsgrad, maximize, steps)
    state = AdamState.from_optimizer(opt, params)
    grads = rand_grads(params, 10, scale=scale)
    r = rand_grads(params, 11, scale=scale)
    h = 1e-6  # relative to g: the first step has a kink at g = 0, keep clear of it
    plus = state.step({k: grads[k] + h * r[k] for k in grads}).delta
    minus = state.step({k: grads[k] - h * r[k] for k in grads}).delta
    fd = {k: (plus[k] - minus[k]) / (2 * h) for k in grads}
    step = state.step(grads)
    assert dict_rel_err({k: step.jacobian[k] * r[k] for k in r}, fd) <= 1e-6
    without_v = {k: -step.gradient[k] / grads[k] * r[k] * (-1 if maximize else 1) for k in r}  # (1−β1)k/denom
    assert dict_rel_err(without_v, fd) > 1e-2


def test_pullback_with_clipping_is_the_finite_difference():
    """<Jᵀv, r> = d/dh <v, Δθ(g + h·r)> with the clipping factor's dependence on g included."""
    opt, params = fd_state(amsgrad=False)
    state = AdamState.from_optimizer(opt, params)
    grads, r, v = rand_grads(params, 12), rand_grads(params, 13), rand_grads(params, 14)
    h = 1e-6

    def f(x: float) -> float:
        d = state.step({k: grads[k] + x * r[k] for k in grads}, max_grad_norm=1.0).delta
        return float(sum((v[k] * d[k]).sum() for k in d))

    step = state.step(grads, max_grad_norm=1.0)
    assert step.clipping
    fd = (f(h) - f(-h)) / (2 * h)
    back = step.pullback(v)
    got = float(sum((back[k] * r[k]).sum() for k in r))
    assert got == pytest.approx(fd, rel=1e-6)
    diag_only = float(sum((step.jacobian[k] * v[k] * r[k]).sum() for k in r))
    assert abs(diag_only - fd) > 1e-3 * abs(fd)  # the rank-one term is not negligible
