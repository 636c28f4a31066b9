"""fp.probe against the same quantities assembled from reference loops and numpy."""

import copy
import importlib
import os
import pickle
import time
from dataclasses import asdict
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import random_rollouts

import functional_probe as fp
from functional_probe.first_order import frozen_surrogate
from functional_probe.grads import dot, dot64
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
    assert r.dof == pytest.approx((V_X + V_Y) ** 2 / (V_X**2 / 4 + V_Y**2 / 3), rel=1e-5)  # Welch–Satterthwaite
    assert (r.B_E, r.B_U) == (5, 4)
    assert set(r.timings) == {"mu_x", "mu_y", "proj_s", "proj_t", "total"}


@pytest.mark.parametrize("method", ["jvp", "loop"])
def test_split_responses_give_the_unsplit_probe(setting, method, monkeypatch):
    model, lora, E, U, pre = setting
    whole = probe(model, lora, E, U, preconditioner=pre, eta=ETA, method=method)
    seen = []
    mean_grad = importlib.import_module("functional_probe.probe").mean_grad

    def recording(*a, **k):  # μX and g_U must take the split reverse path
        seen.append(k["response_microbatch"])
        return mean_grad(*a, **k)

    monkeypatch.setattr(importlib.import_module("functional_probe.probe"), "mean_grad", recording)
    split = probe(model, lora, E, U, preconditioner=pre, eta=ETA, method=method, response_microbatch=1)
    assert seen == [1, 1]
    mu_x, mu_y = mean_grad(model, lora, E, loss="x"), pre(mean_grad(model, lora, U, loss="y"))
    scale = (dot64(mu_x, mu_x) * dot64(mu_y, mu_y)) ** 0.5  # <μX, μY> cancels: errors scale with this
    assert abs(split.bars_dot - whole.bars_dot) <= 1e-5 * scale
    assert np.max(np.abs(np.array(split.s) - whole.s)) <= 1e-5 * np.max(np.abs(whole.s))
    assert np.max(np.abs(np.array(split.t) - whole.t)) <= 1e-5 * np.max(np.abs(whole.t))


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


# ------------------------------------------------------------ the optimizer's exact step


@pytest.fixture(scope="module")
def model64():
    return fp.tiny_model(seed=0, quantize=None, dtype=torch.float64)


@pytest.fixture(scope="module")
def batches64(model64):
    pe, re_, ae = random_rollouts(5, 3, model64.vocab_size, seed=11)
    pu, ru, au = random_rollouts(6, 3, model64.vocab_size, seed=12)
    return fp.make_batch(pe, re_, advantages=ae), fp.make_batch(pu, ru, advantages=au)


def trained(model, U, *, lr: float, steps: int, zero_b: bool = False, weight_decay: float = 0.01):
    """AdamW after `steps` policy-gradient steps on U (p.grad = −mean ∇Ly, as cli_demo.adamw_state) plus
    noise so that m is not parallel to this step's gradient; zero_b: PEFT's B = 0 start."""
    params = {k: torch.nn.Parameter(torch.zeros_like(v) if zero_b and "lora_B" in k else v.clone())
              for k, v in model.lora.items()}  # fmt: skip
    opt = torch.optim.AdamW(params.values(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        g = fp.mean_grad(model, {k: p.detach() for k, p in params.items()}, U, loss="y")
        for k, p in params.items():
            p.grad = -g[k] + 0.3 * g[k].abs().mean() * torch.randn(p.shape, generator=gen, dtype=p.dtype)
        opt.step()
    return opt, params


def real_displacement(model, opt, params, U, max_grad_norm):
    """θ_new − θ_old of a real optimizer.step() on a deep copy, p.grad = −mean ∇Ly over U."""
    opt2, params2 = copy.deepcopy((opt, params))
    lora = {k: p.detach().clone() for k, p in params.items()}
    g = fp.mean_grad(model, lora, U, loss="y")
    for k, p in params2.items():
        p.grad = -g[k].clone()
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(list(params2.values()), max_grad_norm)
    opt2.step()
    return {k: params2[k].detach() - lora[k] for k in lora}


STATES = {"stepped": dict(steps=3), "first_step_b_zero": dict(steps=0, zero_b=True)}


@pytest.mark.parametrize("state", sorted(STATES))
@pytest.mark.parametrize("max_grad_norm", [None, 0.05])
def test_delta_h1_is_the_finite_difference_along_the_real_step(model64, batches64, state, max_grad_norm):
    """δH₁ = <μX, Δθ> against (f(θ + d) − f(θ − d))/2, f the mean X surrogate with frozen
    coefficients and d the displacement of a real AdamW step (float64, lr 1e-5)."""
    E, U = batches64
    opt, params = trained(model64, U, lr=1e-5, **STATES[state])
    lora = {k: p.detach().clone() for k, p in params.items()}
    r = probe(model64, lora, E, U, optimizer=opt, named_params=params, max_grad_norm=max_grad_norm)
    d = real_displacement(model64, opt, params, U, max_grad_norm)
    f, _ = frozen_surrogate(model64, E, lora, "dr_grpo")
    fd = (f({k: lora[k] + d[k] for k in lora}) - f({k: lora[k] - d[k] for k in lora})) / 2
    print(f"{state}, clip {max_grad_norm}: δH₁ {r.delta_h1:.6e}, finite difference {fd:.6e}")
    assert abs(r.delta_h1 - fd) <= 1e-6 * abs(fd)
    assert r.step == "optimizer" and r.eta == 1e-5 and r.optimizer.startswith("optimizer AdamW")
    split = r.delta_h1_gradient + r.delta_h1_momentum + r.delta_h1_decay
    assert split == pytest.approx(r.delta_h1, rel=1e-12)
    assert (r.clip_coef < 1.0) == (max_grad_norm is not None)
    if state == "stepped":  # momentum carries a real share of the step
        assert abs(r.delta_h1_momentum) > 0.1 * abs(r.delta_h1)
    else:  # first step: no momentum, no history
        assert r.delta_h1_momentum == 0.0


def test_s_and_t_are_the_loop_projections_on_the_step(model64, batches64):
    """s_n = <X_n, Δθ>/η and t_p = <∇Ly[p], −Jᵀ μX>/η with X_n, ∇Ly[p] from one gradient per prompt."""
    E, U = batches64
    opt, params = trained(model64, U, lr=1e-3, steps=3)
    lora = {k: p.detach().clone() for k, p in params.items()}
    r = probe(model64, lora, E, U, optimizer=opt, named_params=params, max_grad_norm=0.05)
    g = fp.mean_grad(model64, lora, U, loss="y")
    nxt = fp.AdamState.from_optimizer(opt, params).step({k: -v for k, v in g.items()}, lora, max_grad_norm=0.05)
    mu_x = fp.mean_grad(model64, lora, E, loss="x")
    back = nxt.pullback(mu_x)
    s = [dot64(fp.mean_grad(model64, lora, E[n], loss="x"), nxt.delta) / r.eta for n in range(len(E))]
    t = [-dot64(fp.mean_grad(model64, lora, U[p], loss="y"), back) / r.eta for p in range(len(U))]
    assert np.max(np.abs(np.array(r.s) - s)) <= 1e-10 * np.max(np.abs(s))
    assert np.max(np.abs(np.array(r.t) - t)) <= 1e-10 * np.max(np.abs(t))
    assert r.delta_h1 == pytest.approx(dot64(mu_x, nxt.delta), rel=1e-12)


def loop_jackknife(model, lora, E, U, opt, params, max_grad_norm, h: float = 1.0) -> float:
    """(B−1)/B·Σ(θ̂₋ₚ − mean)²/h² with θ̂₋ₚ = <μX, Δθ(g_U − h·(∇Ly[p] − g_U)/(B−1))>/η: one gradient
    per prompt (mean_grad on U[p]), the step from AdamState. h = 1 is the jackknife; h → 0 its
    linearisation, which must be the linearised V_Y."""
    state = fp.AdamState.from_optimizer(opt, params)
    mu_x = fp.mean_grad(model, lora, E, loss="x")
    g = fp.mean_grad(model, lora, U, loss="y")
    per = [fp.mean_grad(model, lora, U[p], loss="y") for p in range(len(U))]
    B, eta = len(U), state.lr
    vals = []
    for gp in per:
        minus = {k: -(g[k] - h * (gp[k] - g[k]) / (B - 1)) for k in g}
        vals.append(dot64(mu_x, state.step(minus, lora, max_grad_norm=max_grad_norm).delta) / eta)
    vals = np.array(vals)
    return (B - 1) / B * float(np.sum((vals - vals.mean()) ** 2)) / h**2


# jackknife V_Y / linearised V_Y, measured on this setting (float64 tiny model, B_U = 6, lr 1e-5)
MEASURED_GAP = {("stepped", None): 0.884, ("stepped", 0.05): 0.764,
                ("first_step_b_zero", None): 1.064, ("first_step_b_zero", 0.05): 0.0217}  # fmt: skip


def test_probe_with_a_saved_state_equals_the_live_optimizer(model64, batches64):
    E, U = batches64
    opt, params = trained(model64, U, lr=1e-3, steps=2)
    lora = {k: p.detach().clone() for k, p in params.items()}
    live = probe(model64, lora, E, U, optimizer=opt, named_params=params, max_grad_norm=1.0)
    names = [next(k for k, q in params.items() if q is p) for g in opt.param_groups for p in g["params"]]
    saved = fp.AdamState.from_state_dict(copy.deepcopy(opt.state_dict()), names)
    r = probe(model64, lora, E, U, optimizer=saved, max_grad_norm=1.0)
    assert r.delta_h1 == live.delta_h1 and r.V_Y == live.V_Y and r.s == live.s and r.t == live.t
    assert ProbeResult.from_json(r.to_json()) == r


def test_mismatched_optimizer_is_refused_before_any_gradient(model64, batches64, monkeypatch):
    E, U = batches64
    opt, params = trained(model64, U, lr=1e-3, steps=1)
    lora = {k: p.detach().clone() for k, p in params.items()}

    def no_gradients(*a, **k):
        raise AssertionError("a gradient was computed before the optimizer state was checked")

    monkeypatch.setattr(importlib.import_module("functional_probe.probe"), "mean_grad", no_gradients)
    names = list(params)
    swapped = fp.AdamState.from_state_dict(opt.state_dict(), [names[1], names[0], *names[2:]])
    with pytest.raises(ValueError, match="the optimizer state has shape .*, the LoRA dict has"):
        probe(model64, lora, E, U, optimizer=swapped)
    fewer = {k: v for k, v in lora.items() if k != names[3]}
    with pytest.raises(ValueError, match=f"optimizer parameter '{names[3]}' is not in the LoRA dict"):
        probe(model64, fewer, E, U, optimizer=opt, named_params=params)
    with pytest.raises(ValueError, match="needs named_params"):
        probe(model64, lora, E, U, optimizer=opt)
    with pytest.raises(ValueError, match="no preconditioner=/eta="):
        probe(model64, lora, E, U, optimizer=opt, named_params=params, eta=1e-3)
    with pytest.raises(ValueError, match="max_grad_norm"):
        probe(model64, lora, E, U, optimizer=opt, named_params=params, max_grad_norm=-1.0)
    with pytest.raises(ValueError, match=r"optimizer SGD \(torch.optim.sgd.SGD\) is not supported"):
        probe(model64, lora, E, U, optimizer=torch.optim.SGD(params.values(), lr=0.1), named_params=params)
    with pytest.raises(ValueError, match="v_y='jackknife' is for step='optimizer'"):
        probe(model64, lora, E, U, preconditioner=lambda g: g, eta=1e-3, v_y="jackknife")
    with pytest.raises(ValueError, match="v_y='bogus'"):
        probe(model64, lora, E, U, optimizer=opt, named_params=params, v_y="bogus")


def test_preconditioned_step_reports_no_split(setting):
    model, lora, E, U, pre = setting
    r = probe(model, lora, E, U, preconditioner=pre, eta=ETA, step="preconditioned")
    assert r.step == "preconditioned" and r.optimizer is None
    assert r.delta_h1_gradient is None and r.delta_h1_momentum is None and r.clip_coef is None


# ------------------------------------------------- the exact step under torch.distributed


def distributed_setting():
    """Float64 model, E (5 prompts), U (6), AdamW after 2 steps: built alike in parent and ranks."""
    model = fp.tiny_model(seed=0, quantize=None, dtype=torch.float64)
    pe, re_, ae = random_rollouts(5, 3, model.vocab_size, seed=11)
    pu, ru, au = random_rollouts(6, 3, model.vocab_size, seed=12)
    E, U = fp.make_batch(pe, re_, advantages=ae), fp.make_batch(pu, ru, advantages=au)
    opt, params = trained(model, U, lr=1e-5, steps=2)
    return model, {k: p.detach().clone() for k, p in params.items()}, E, U, opt, params


def sharded_results(rank: int, world: int, root: str) -> None:
    """One rank: the optimizer-step probe on its shards of E and U, linear and jackknife V_Y."""
    torch.set_num_threads(1)
    model, lora, E, U, opt, params = distributed_setting()  # before the group: local training
    dist.init_process_group("gloo", init_method=f"file://{root}/store", rank=rank, world_size=world,
                            timeout=timedelta(seconds=300))  # fmt: skip
    try:
        kw = dict(optimizer=opt, named_params=params, max_grad_norm=0.05, distributed=True)
        out = {v: asdict(probe(model, lora, fp.shard_batch(E), fp.shard_batch(U), v_y=v, **kw))
               for v in ("linear", "jackknife")}  # fmt: skip
    finally:
        dist.destroy_process_group()
    Path(root, f"rank{rank}.pkl").write_bytes(pickle.dumps(out))


def test_exact_step_sharded_over_two_ranks_equals_one_process(tmp_path):
    """2 gloo ranks (E 3|2, U 3|3): every number of the optimizer-step probe equals the
    single-process one to 1e-10 (float64), the jackknife included."""
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        ctx = mp.start_processes(sharded_results, args=(2, str(tmp_path)), nprocs=2, join=False,
                                 start_method="spawn")  # fmt: skip
    finally:
        os.environ.pop("OMP_NUM_THREADS") if old is None else os.environ.update(OMP_NUM_THREADS=old)
    deadline = time.monotonic() + 400
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("2 ranks did not finish in 400 s (a hang?)")
    ranks = [pickle.loads(Path(tmp_path, f"rank{r}.pkl").read_bytes()) for r in range(2)]
    model, lora, E, U, opt, params = distributed_setting()
    for v in ("linear", "jackknife"):
        ref = asdict(probe(model, lora, E, U, optimizer=opt, named_params=params, max_grad_norm=0.05, v_y=v))
        for got in (r[v] for r in ranks):
            for key in ("delta_h1", "V_X", "V_Y", "se", "se_jackknife", "delta_h1_gradient", "delta_h1_momentum", "clip_coef"):
                assert got[key] == pytest.approx(ref[key], rel=1e-10), (v, key)
            assert np.allclose(got["s"], ref["s"], rtol=1e-10, atol=0) and np.allclose(got["t"], ref["t"], rtol=1e-10, atol=0)
            assert (got["B_E"], got["B_U"], got["v_y"]) == (5, 6, v)


