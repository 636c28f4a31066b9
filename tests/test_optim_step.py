"""next_step / AdamState against a real optimizer.step() on a deep copy, and D against finite differences.

The reference is always the optimizer's own step: (optimizer, params) deep-copied together, p.grad
set, torch.nn.utils.clip_grad_norm_ when clipping, step(), displacement θ_new − θ_old. fp32 runs use
lr 0.05 on parameters of size ~0.1, so the fp32 rounding of θ_new − θ_old stays near 1e-7.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from helpers import dict_rel_err

import functional_probe as fp
from functional_probe.optim_step import AdamState, next_step

SHAPES = {"q.lora_A": (4, 16), "q.lora_B": (16, 4), "v.lora_A": (4, 16), "v.lora_B": (16, 4)}
BIG = {"w.lora_A": (64, 80), "w.lora_B": (80, 8)}  # 5120 >= bitsandbytes' min_8bit_size: 8-bit state


def make_params(shapes=SHAPES, dtype=torch.float32, zero_b=False, seed=0) -> dict[str, torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k, s in shapes.items():
        v = torch.randn(s, generator=gen, dtype=dtype) * 0.1
        out[k] = torch.nn.Parameter(torch.zeros_like(v) if zero_b and "lora_B" in k else v)
    return out


def rand_grads(params, seed: int, scale: float = 1.0, zero_a: bool = False) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {k: torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale for k, p in params.items()}
    return {k: torch.zeros_like(v) if zero_a and "lora_A" in k else v for k, v in out.items()}


def history(opt, params, steps: int, seed: int = 1, sched=None) -> None:
    for i in range(steps):
        for k, g in rand_grads(params, seed + i).items():
            params[k].grad = g
        opt.step()
        if sched is not None:
            sched.step()


def real_step(opt, params, grads, max_grad_norm=None, rebuild=None) -> dict[str, torch.Tensor]:
    """θ_new − θ_old of the optimizer's own step on a deep copy (optimizer and params together;
    `rebuild(params)`: a fresh optimizer on copied params loaded with opt.state_dict() instead,
    for bitsandbytes, whose optimizers lose attributes under deepcopy)."""
    if rebuild is None:
        opt2, params2 = copy.deepcopy((opt, params))
    else:
        params2 = copy.deepcopy(params)
        opt2 = rebuild(params2)
        opt2.load_state_dict(opt.state_dict())
    before = {k: p.detach().clone() for k, p in params2.items()}
    for k, p in params2.items():
        p.grad = grads[k].clone()
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(list(params2.values()), max_grad_norm)
    opt2.step()
    return {k: params2[k].detach() - before[k] for k in params2}


def two_groups(params, cls=torch.optim.AdamW, **kw):
    """LoRA+ style: B factors get 16x the lr and other betas."""
    a = [p for k, p in params.items() if "lora_A" in k]
    b = [p for k, p in params.items() if "lora_B" in k]
    return cls([{"params": a, "lr": 0.01}, {"params": b, "lr": 0.16, "betas": (0.8, 0.99)}], **kw)


CASES = {
    "adamw": (lambda p: torch.optim.AdamW(p.values(), lr=0.05, weight_decay=0.1, foreach=False), torch.float32),
    "adamw_foreach": (lambda p: torch.optim.AdamW(p.values(), lr=0.05, weight_decay=0.1, foreach=True), torch.float32),
    "adamw_fused": (lambda p: torch.optim.AdamW(p.values(), lr=0.05, weight_decay=0.1, fused=True), torch.float32),
    "adamw_fp64": (lambda p: torch.optim.AdamW(p.values(), lr=0.05, weight_decay=0.1), torch.float64),
    "adamw_fp64_foreach": (lambda p: torch.optim.AdamW(p.values(), lr=0.05, weight_decay=0.1, foreach=True),
                           torch.float64),
    "adamw_fused_fp64": (lambda p: torch.optim.AdamW(p.values(), lr=0.05, weight_decay=0.1, fused=True),
                         torch.float64),
    "adam_fused_amsgrad_l2_maximize": (lambda p: torch.optim.Adam(p.values(), lr=0.05, weight_decay=0.1, fused=True,
                                                                  amsgrad=True, maximize=True), torch.float64),
    "adam_l2": (lambda p: torch.optim.Adam(p.values(), lr=0.05, weight_decay=0.1), torch.float64),
    "adam_l2_fp32": (lambda p: torch.optim.Adam(p.values(), lr=0.05, weight_decay=0.1), torch.float32),
    "amsgrad": (lambda p: torch.optim.AdamW(p.values(), lr=0.05, amsgrad=True), torch.float64),
    "amsgrad_l2_foreach": (lambda p: torch.optim.Adam(p.values(), lr=0.05, amsgrad=True, weight_decay=0.1,
                                                      foreach=True), torch.float64),
    "maximize": (lambda p: torch.optim.AdamW(p.values(), lr=0.05, maximize=True), torch.float64),
    "two_groups": (lambda p: two_groups(p, weight_decay=0.05), torch.float64),
    "two_groups_fp32": (lambda p: two_groups(p, weight_decay=0.05), torch.float32),
}  # fmt: skip
TOL = {torch.float32: 1e-6, torch.float64: 1e-12}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("steps", [0, 3])
def test_next_step_is_the_real_step(case, steps):
    make, dtype = CASES[case]
    params = make_params(dtype=dtype)
    opt = make(params)
    history(opt, params, steps)
    grads = rand_grads(params, 99)
    got = next_step(opt, params, grads)
    want = real_step(opt, params, grads)
    err = dict_rel_err(got, want)
    print(f"{case} after {steps} steps: relative error {err:.2e}")
    assert err <= TOL[dtype]
    assert all(got[k].dtype == dtype for k in got)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_first_step_with_b_zero_lora(dtype):
    """PEFT starts B = 0, so lora_A's gradient is exactly 0 at step 1: its step is 0 (v = 0,
    denominator ε) and B's is lr·sign-like; both equal the real first step."""
    params = make_params(dtype=dtype, zero_b=True)
    opt = torch.optim.AdamW(params.values(), lr=0.05)
    grads = rand_grads(params, 5, zero_a=True)
    step = AdamState.from_optimizer(opt, params).step(grads)
    want = real_step(opt, params, grads)
    for k in params:
        if "lora_A" in k:  # decay of the nonzero A only: −lr·λ·θ, rounded in θ's dtype by the real step
            ulp = torch.finfo(dtype).eps * float(params[k].detach().abs().max())
            torch.testing.assert_close(step.delta[k], want[k], rtol=1e-6, atol=ulp)
            torch.testing.assert_close(step.gradient[k], torch.zeros_like(want[k]))
        else:
            assert dict_rel_err({k: step.delta[k]}, {k: want[k]}) <= TOL[dtype]
            assert want[k].abs().max() > 0.04  # ≈ lr: the first Adam step is ±lr per element


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


def test_scheduler_lr_and_explicit_lr():
    """After scheduler.step() the groups hold the next step's lr, so lr=None follows the
    scheduler; lr=get_last_lr() is the same; an explicit per-group lr equals a real step at it."""
    params = make_params(dtype=torch.float64)
    opt = two_groups(params)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 / (1 + i))
    history(opt, params, 3, sched=sched)
    grads = rand_grads(params, 8)
    want = real_step(opt, params, grads)
    assert dict_rel_err(next_step(opt, params, grads), want) <= 1e-12
    assert dict_rel_err(next_step(opt, params, grads, lr=sched.get_last_lr()), want) <= 1e-12
    lrs = [0.003, 0.07]
    opt2, params2 = copy.deepcopy((opt, params))
    for g, lr in zip(opt2.param_groups, lrs, strict=True):
        g["lr"] = lr
    assert dict_rel_err(next_step(opt, params, grads, lr=lrs), real_step(opt2, params2, grads)) <= 1e-12


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


def test_from_state_dict_equals_from_optimizer():
    params = make_params(dtype=torch.float64)
    opt = two_groups(params, weight_decay=0.05, amsgrad=True)
    history(opt, params, 2)
    names = [next(k for k, q in params.items() if q is p) for g in opt.param_groups for p in g["params"]]
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    saved = AdamState.from_state_dict(torch.load(buf, weights_only=True), names)
    grads = rand_grads(params, 15)
    theta = {k: p.detach() for k, p in params.items()}
    assert dict_rel_err(saved.step(grads, theta).delta, real_step(opt, params, grads)) <= 1e-12
    with pytest.raises(ValueError, match="needs theta"):
        saved.step(grads)


# ------------------------------------------------------------------------------ refusals


def test_bad_input_is_refused():
    params = make_params()
    opt = torch.optim.AdamW(params.values(), lr=0.05)
    history(opt, params, 1)
    state = AdamState.from_optimizer(opt, params)
    grads = rand_grads(params, 0)
    with pytest.raises(ValueError, match="'q.lora_B' is not in grads"):
        state.step({k: v for k, v in grads.items() if k != "q.lora_B"})
    with pytest.raises(ValueError, match="grads: 'bogus' has no optimizer state"):
        state.step({**grads, "bogus": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"'v.lora_A': the optimizer state has shape \(4, 16\), grads has \(16, 4\)"):
        state.step({**grads, "v.lora_A": torch.zeros(16, 4)})
    with pytest.raises(ValueError, match="'q.lora_A' has non-finite"):
        state.step({**grads, "q.lora_A": torch.full((4, 16), float("nan"))})
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="max_grad_norm"):
            state.step(grads, max_grad_norm=bad)
    with pytest.raises(ValueError, match="lr has 2 values for 1 param groups"):
        state.step(grads, lr=[1e-3, 1e-3])
    with pytest.raises(ValueError, match=r"parameter 0 \(shape \(4, 16\)\) is not in named_params"):
        AdamState.from_optimizer(opt, {k: v for k, v in params.items() if k != "q.lora_A"})
    with pytest.raises(ValueError, match="same tensor"):
        AdamState.from_optimizer(opt, [*params.items(), ("alias", params["q.lora_A"])])


def test_saved_state_refusals():
    params = make_params()
    opt = torch.optim.AdamW(params.values(), lr=0.05)
    history(opt, params, 1)
    sd = opt.state_dict()
    names = list(params)
    with pytest.raises(ValueError, match="3 names for 4 parameters"):
        AdamState.from_state_dict(sd, names[:3])
    with pytest.raises(ValueError, match="'q.lora_A' is given twice"):
        AdamState.from_state_dict(sd, names[:3] + names[:1])
    old = copy.deepcopy(sd)
    del old["param_groups"][0]["decoupled_weight_decay"]
    with pytest.raises(ValueError, match="cannot tell Adam .L2. from AdamW"):
        AdamState.from_state_dict(old, names)
    swapped = AdamState.from_state_dict(sd, [names[1], names[0], *names[2:]])
    with pytest.raises(ValueError, match=r"'q.lora_B': the optimizer state has shape \(4, 16\), the LoRA dict has"):
        swapped.check_shapes({k: p.shape for k, p in params.items()})


def test_exported():
    assert fp.next_step is next_step and fp.AdamState is AdamState


