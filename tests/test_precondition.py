"""AdamPreconditioner against real torch.optim.AdamW/Adam steps and a by-hand formula."""

from __future__ import annotations

import io
import math

import pytest
import torch

from functional_probe.precondition import AdamPreconditioner

SHAPES = {"layer.lora_A": (3, 5), "layer.lora_B": (5, 3), "head.lora_A": (2, 4)}


def make_params(dtype: torch.dtype = torch.float32) -> dict[str, torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    return {k: torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype))
            for k, s in SHAPES.items()}


def run_steps(opt: torch.optim.Optimizer, params: dict[str, torch.nn.Parameter], k: int,
              seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(k):
        opt.zero_grad()
        for p in params.values():
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype) * (1 + p.detach().abs())
        opt.step()


def two_group_adamw(params: dict[str, torch.nn.Parameter], **kw) -> torch.optim.Optimizer:
    """LoRA+ style: B matrices get 16x the lr of the A matrices."""
    a = [p for k, p in params.items() if "lora_A" in k]
    b = [p for k, p in params.items() if "lora_B" in k]
    return torch.optim.AdamW([{"params": a, "lr": 1e-3}, {"params": b, "lr": 1.6e-2}],
                             betas=(0.9, 0.95), eps=1e-6, **kw)


def by_hand(opt: torch.optim.Optimizer, params: dict[str, torch.nn.Parameter],
            grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    lr0 = opt.param_groups[0]["lr"]
    out = {}
    for group in opt.param_groups:
        _, beta2 = group["betas"]
        for p in group["params"]:
            name = next(k for k, q in params.items() if q is p)
            st = opt.state[p]
            v = st["max_exp_avg_sq"] if group["amsgrad"] else st["exp_avg_sq"]
            t = int(st["step"])
            v_hat = v.double() / (1 - beta2**t)
            out[name] = (group["lr"] / lr0) * grads[name].double() / (v_hat.sqrt() + group["eps"])
    return out


def rand_grads(seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=g, dtype=dtype) for k, s in SHAPES.items()}


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        err = (a[k].double() - b[k].double()).norm() / b[k].double().norm()
        assert err <= tol, (k, float(err))


@pytest.mark.parametrize("amsgrad", [False, True])
def test_matches_by_hand_two_groups(amsgrad: bool) -> None:
    params = make_params()
    opt = two_group_adamw(params, amsgrad=amsgrad)
    run_steps(opt, params, 4)
    pre = AdamPreconditioner.from_optimizer(opt, params)
    assert pre.lr == 1e-3
    assert pre.scale == {"layer.lora_A": 1.0, "layer.lora_B": 16.0, "head.lora_A": 1.0}
    assert set(pre.names) == set(SHAPES)
    grads = rand_grads(7)
    copies = {k: v.clone() for k, v in grads.items()}
    got = pre(grads)
    for k in got:
        assert got[k].dtype == torch.float32 and got[k].shape == grads[k].shape
    assert_close(got, by_hand(opt, params, grads), 1e-6)
    assert got is not grads and grads.keys() == copies.keys()  # pure: inputs untouched
    assert all(torch.equal(grads[k], copies[k]) for k in grads)


def test_dtypes_follow_the_grad() -> None:
    params = make_params()
    opt = torch.optim.AdamW(params.values(), lr=1e-3)
    run_steps(opt, params, 2)
    pre = AdamPreconditioner.from_optimizer(opt, params.items())
    for dtype in (torch.bfloat16, torch.float64):
        grads = rand_grads(3, dtype)
        got = pre(grads)
        assert all(v.dtype == dtype for v in got.values())
        assert_close(got, by_hand(opt, params, grads), 1e-2 if dtype == torch.bfloat16 else 1e-6)


def test_bf16_state_denominator_is_float32() -> None:
    params = make_params(torch.bfloat16)
    opt = torch.optim.AdamW(params.values(), lr=1e-3)
    run_steps(opt, params, 2)
    pre = AdamPreconditioner.from_optimizer(opt, params)
    assert all(d.dtype == torch.float32 for d in pre.denom.values())


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("foreach", [False, True])
def test_eta_times_p_is_the_real_adam_step(amsgrad: bool, foreach: bool) -> None:
    """With β1 = 0 (exp_avg = grad exactly, no β1 bias correction) and no weight decay, the
    step AdamW takes for grad g is exactly -lr_0 · P(g), P read from the state after that step.
    Two groups with different lr: checks the lr_g / lr_0 scaling against real updates."""
    params = make_params(torch.float64)
    a = [params["layer.lora_A"], params["head.lora_A"]]
    opt = torch.optim.AdamW([{"params": a, "lr": 1e-2}, {"params": [params["layer.lora_B"]],
                                                         "lr": 5e-2}],
                            betas=(0.0, 0.99), eps=1e-8, weight_decay=0.0, amsgrad=amsgrad,
                            foreach=foreach)
    run_steps(opt, params, 3)
    before = {k: p.detach().clone() for k, p in params.items()}
    grads = rand_grads(11, torch.float64)
    opt.zero_grad()
    for k, p in params.items():
        p.grad = grads[k].clone()
    opt.step()
    update = {k: params[k].detach() - before[k] for k in params}
    pre = AdamPreconditioner.from_optimizer(opt, params)
    predicted = {k: -pre.lr * v for k, v in pre(grads).items()}
    assert_close(predicted, update, 1e-10)


def test_symmetry() -> None:
    params = make_params()
    opt = two_group_adamw(params)
    run_steps(opt, params, 3)
    pre = AdamPreconditioner.from_optimizer(opt, params)
    a, b = rand_grads(1, torch.float64), rand_grads(2, torch.float64)
    pa, pb = pre(a), pre(b)
    lhs = sum(float((pa[k] * b[k]).sum()) for k in a)
    rhs = sum(float((a[k] * pb[k]).sum()) for k in a)
    assert lhs == pytest.approx(rhs, rel=1e-12)
    assert sum(float((pa[k] * a[k]).sum()) for k in a) > 0  # positive definite


def test_from_state_dict_equals_from_optimizer() -> None:
    params = make_params()
    opt = two_group_adamw(params)
    run_steps(opt, params, 3)
    names = [next(k for k, q in params.items() if q is p)
             for g in opt.param_groups for p in g["params"]]
    live = AdamPreconditioner.from_optimizer(opt, params)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    for sd in (opt.state_dict(), loaded):
        pre = AdamPreconditioner.from_state_dict(sd, names)
        assert pre.names == live.names and pre.scale == live.scale and pre.lr == live.lr
        for k in live.denom:
            assert torch.equal(pre.denom[k], live.denom[k])


def test_int_step_and_plain_dict() -> None:
    v = torch.tensor([[0.04, 0.09]])
    sd = {"state": {0: {"step": 5, "exp_avg": torch.zeros(1, 2), "exp_avg_sq": v}},
          "param_groups": [{"params": [0], "lr": 0.1, "betas": (0.9, 0.999), "eps": 1e-8}]}
    pre = AdamPreconditioner.from_state_dict(sd, ["w"])
    g = torch.tensor([[1.0, -2.0]])
    want = g / ((v / (1 - 0.999**5)).sqrt() + 1e-8)
    torch.testing.assert_close(pre({"w": g})["w"], want, rtol=1e-6, atol=0)
    step_t = dict(sd)
    step_t["state"] = {0: {**sd["state"][0], "step": torch.tensor(5.0)}}
    torch.testing.assert_close(AdamPreconditioner.from_state_dict(step_t, ["w"]).denom["w"],
                               pre.denom["w"])


# ---------------------------------------------------------------- errors


def stepped() -> tuple[torch.optim.Optimizer, dict[str, torch.nn.Parameter]]:
    params = make_params()
    opt = two_group_adamw(params)
    run_steps(opt, params, 1)
    return opt, params


@pytest.mark.parametrize("cls", [torch.optim.SGD, torch.optim.Adamax, torch.optim.RAdam, torch.optim.NAdam])
def test_error_not_adam(cls) -> None:
    params = make_params()
    opt = cls(params.values(), lr=0.1)
    run_steps(opt, params, 1)
    with pytest.raises(ValueError, match=rf"optimizer {cls.__name__} \(torch.optim.*\) is not supported"):
        AdamPreconditioner.from_optimizer(opt, params)


def test_accelerate_wrapper_is_unwrapped_and_cannot_hide_radam() -> None:
    from accelerate import Accelerator

    params = make_params()
    inner = two_group_adamw(params)
    wrapped = Accelerator(cpu=True).prepare(inner)
    run_steps(wrapped, params, 3)
    pre = AdamPreconditioner.from_optimizer(wrapped, params)
    grads = rand_grads(4)
    assert_close(pre(grads), by_hand(inner, params, grads), 1e-6)
    radam = Accelerator(cpu=True).prepare(torch.optim.RAdam(params.values()))
    run_steps(radam, params, 1)
    with pytest.raises(ValueError, match=r"optimizer RAdam \(torch.optim.radam.RAdam\) inside AcceleratedOptimizer"):
        AdamPreconditioner.from_optimizer(radam, params)


@pytest.mark.parametrize("name", ["AdamW8bit", "PagedAdamW32bit"])
def test_bitsandbytes_state(name) -> None:
    """P from a bitsandbytes optimizer: v = state2 (8-bit: dequantized by bitsandbytes itself,
    `dequantize_blockwise` with qmap2/absmax2 in blocks of 256), step t, against the formula."""
    bnb = pytest.importorskip("bitsandbytes")
    import warnings

    g = torch.Generator().manual_seed(0)
    params = {"big": torch.nn.Parameter(torch.randn(64, 80, generator=g)), **make_params()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # paged optimizers fall back to plain buffers on CPU, warning
        opt = getattr(bnb.optim, name)(params.values(), lr=1e-3, betas=(0.9, 0.99), eps=1e-6)
        run_steps(opt, params, 3)
    pre = AdamPreconditioner.from_optimizer(opt, params)
    grads = {"big": torch.randn(64, 80, generator=g), **rand_grads(5)}
    for k, p in params.items():
        st = opt.state[p]
        v = st["state2"]
        if v.dtype == torch.uint8:
            v = bnb.functional.dequantize_blockwise(v, absmax=st["absmax2"], code=st["qmap2"], blocksize=256)
        want = grads[k] / ((v.double() / (1 - 0.99**3)).sqrt() + 1e-6)
        assert float((pre(grads)[k].double() - want).norm() / want.norm()) <= 1e-6
    assert opt.state[params["big"]]["state2"].dtype == (torch.uint8 if "8bit" in name else torch.float32)


def test_error_not_stepped() -> None:
    params = make_params()
    opt = torch.optim.AdamW(params.values())
    with pytest.raises(ValueError, match="parameter 'layer.lora_A' has no Adam state: "
                                         "has the optimizer stepped"):
        AdamPreconditioner.from_optimizer(opt, params)


def test_error_step_zero() -> None:
    opt, params = stepped()
    sd = opt.state_dict()
    sd["state"][1]["step"] = torch.tensor(0.0)
    names = ["layer.lora_A", "head.lora_A", "layer.lora_B"]
    with pytest.raises(ValueError, match="'head.lora_A' has Adam step 0"):
        AdamPreconditioner.from_state_dict(sd, names)


def test_error_names_count() -> None:
    opt, _ = stepped()
    with pytest.raises(ValueError, match="2 names for 3 parameters"):
        AdamPreconditioner.from_state_dict(opt.state_dict(), ["a", "b"])
    with pytest.raises(ValueError, match="'a' is given twice"):
        AdamPreconditioner.from_state_dict(opt.state_dict(), ["a", "b", "a"])
    with pytest.raises(ValueError, match="'param_groups'"):
        AdamPreconditioner.from_state_dict({"state": {}}, [])


def test_error_param_not_named() -> None:
    opt, params = stepped()
    partial = {k: v for k, v in params.items() if k != "layer.lora_B"}
    with pytest.raises(ValueError, match=r"param group 1, parameter 0 \(shape \(5, 3\)\) "
                                         "is not in named_params"):
        AdamPreconditioner.from_optimizer(opt, partial)
    # extra names (e.g. frozen weights from named_parameters()) are ignored
    extra = {**params, "frozen.weight": torch.nn.Parameter(torch.zeros(2))}
    assert set(AdamPreconditioner.from_optimizer(opt, extra).names) == set(SHAPES)
    with pytest.raises(ValueError, match="same tensor"):
        AdamPreconditioner.from_optimizer(opt, [*params.items(), ("alias", params["head.lora_A"])])


def test_error_call_keys_and_shapes() -> None:
    opt, params = stepped()
    pre = AdamPreconditioner.from_optimizer(opt, params)
    grads = rand_grads(0)
    with pytest.raises(ValueError, match="'head.lora_A' is missing"):
        pre({k: v for k, v in grads.items() if k != "head.lora_A"})
    with pytest.raises(ValueError, match="'bogus' has no Adam state"):
        pre({**grads, "bogus": torch.zeros(1)})
    with pytest.raises(ValueError, match=r"'layer.lora_B' has shape \(3, 5\).*\(5, 3\)"):
        pre({**grads, "layer.lora_B": torch.zeros(3, 5)})


def test_lr_tensor_and_zero() -> None:
    opt, params = stepped()
    sd = opt.state_dict()
    sd["param_groups"][0]["lr"] = torch.tensor(2e-3)
    names = ["layer.lora_A", "head.lora_A", "layer.lora_B"]
    pre = AdamPreconditioner.from_state_dict(sd, names)
    assert pre.lr == pytest.approx(2e-3) and pre.scale["layer.lora_B"] == pytest.approx(8.0)
    sd["param_groups"][0]["lr"] = 0.0
    with pytest.raises(ValueError, match="lr = 0"):
        AdamPreconditioner.from_state_dict(sd, names)
    assert math.isfinite(pre.lr)
