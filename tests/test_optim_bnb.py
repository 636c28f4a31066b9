"""bitsandbytes Adam-family optimizers (8-bit states dequantized with bitsandbytes' own functions):
next_step against the optimizer's own step on a copy, and a saved state against the live one."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import dict_rel_err
from test_optim_step import BIG, SHAPES, history, make_params, rand_grads, real_step

from functional_probe.optim_step import AdamState, next_step

BNB = ["AdamW8bit", "PagedAdamW", "PagedAdamW8bit", "PagedAdamW32bit", "Adam8bit"]


def bnb_optimizer(name: str, params):
    bnb = pytest.importorskip("bitsandbytes")
    with warnings.catch_warnings():  # paged optimizers warn once on CPU and fall back to plain buffers
        warnings.simplefilter("ignore")
        return getattr(bnb.optim, name)(params.values(), lr=0.05, weight_decay=0.1)


@pytest.mark.parametrize("steps", [0, 3])
@pytest.mark.parametrize("name", BNB)
def test_bitsandbytes_step_is_the_real_step(name, steps):
    """All five construct and step on this CPU (bitsandbytes 0.50.2; paged ones fall back to
    ordinary buffers). The step is float32 arithmetic on the dequantized state (the 8-bit
    rounding lands in the stored state, after the update), so the bar is float32's: 2e-6."""
    params = make_params({**SHAPES, **BIG})
    opt = bnb_optimizer(name, params)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        history(opt, params, steps)
        grads = rand_grads(params, 17)
        got = next_step(opt, params, grads, max_grad_norm=2.0)
        want = real_step(opt, params, grads, max_grad_norm=2.0, rebuild=lambda p: bnb_optimizer(name, p))
    err = dict_rel_err(got, want)
    print(f"{name} after {steps} steps: relative error {err:.2e}")
    assert err <= 2e-6
    if steps and "8bit" in name:
        assert opt.state[params["w.lora_A"]]["state1"].dtype == torch.uint8  # really 8-bit
        assert opt.state[params["q.lora_A"]]["state1"].dtype == torch.float32  # below min_8bit_size


@pytest.mark.parametrize("name", ["AdamW8bit", "PagedAdamW32bit"])
def test_bitsandbytes_saved_state_equals_live(name):
    params = make_params({**SHAPES, **BIG})
    opt = bnb_optimizer(name, params)
    history(opt, params, 2)
    grads = rand_grads(params, 18)
    names = list(params)
    saved = AdamState.from_state_dict(opt.state_dict(), names)
    theta = {k: p.detach() for k, p in params.items()}
    live = AdamState.from_optimizer(opt, params).step(grads)
    assert dict_rel_err(saved.step(grads, theta).delta, live.delta) == 0.0


@pytest.mark.parametrize("name", ["Lion8bit", "LAMB", "AdEMAMix8bit"])
def test_other_bitsandbytes_optimizers_are_refused(name):
    bnb = pytest.importorskip("bitsandbytes")
    params = make_params()
    with pytest.raises(ValueError, match=rf"optimizer {name} \(bitsandbytes.*\) is not supported"):
        next_step(getattr(bnb.optim, name)(params.values()), params, rand_grads(params, 0))
