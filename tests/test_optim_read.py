"""Reading an optimizer: accelerate's wrapper unwrapped, unsupported optimizers refused by their real
class name, the state read as a snapshot (later steps do not change it)."""

from __future__ import annotations

import pytest
import torch
from helpers import dict_rel_err
from test_optim_step import history, make_params, rand_grads, real_step

from functional_probe.optim_step import AdamState, next_step


def test_accelerate_wrapper_is_unwrapped():
    from accelerate import Accelerator

    params = make_params(dtype=torch.float64)
    wrapped = Accelerator(cpu=True).prepare(torch.optim.AdamW(params.values(), lr=0.05))
    history(wrapped, params, 2)
    grads = rand_grads(params, 16)
    assert dict_rel_err(next_step(wrapped, params, grads), real_step(wrapped.optimizer, params, grads)) <= 1e-12
    radam = Accelerator(cpu=True).prepare(torch.optim.RAdam(params.values()))
    with pytest.raises(ValueError, match=r"optimizer RAdam \(torch.optim.radam.RAdam\) inside "
                                         "AcceleratedOptimizer is not supported"):
        next_step(radam, params, grads)


@pytest.mark.parametrize("make,cls", [
    (lambda p: torch.optim.RAdam(p), "RAdam"), (lambda p: torch.optim.NAdam(p), "NAdam"),
    (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), "SGD"), (lambda p: torch.optim.Adamax(p), "Adamax"),
    (lambda p: torch.optim.Adagrad(p), "Adagrad"),
    (lambda p: type("MyAdamW", (torch.optim.AdamW,), {})(p), "MyAdamW"),
])  # fmt: skip
def test_other_optimizers_are_refused_by_name(make, cls):
    params = make_params()
    with pytest.raises(ValueError, match=rf"optimizer {cls} \(.*\) is not supported"):
        next_step(make(params.values()), params, rand_grads(params, 0))


def test_adafactor_is_refused_by_name():
    from transformers.optimization import Adafactor

    params = make_params()
    opt = Adafactor(params.values(), lr=1e-3, relative_step=False, scale_parameter=False)
    with pytest.raises(ValueError, match=r"optimizer Adafactor \(transformers.optimization.Adafactor\) is not"):
        next_step(opt, params, rand_grads(params, 0))


def test_state_is_a_snapshot():
    """An AdamState read before a step still gives that step after the optimizer moved on."""
    params = make_params(dtype=torch.float64)
    opt = torch.optim.AdamW(params.values(), lr=0.05)
    history(opt, params, 2)
    grads = rand_grads(params, 19)
    theta = {k: p.detach().clone() for k, p in params.items()}
    state = AdamState.from_optimizer(opt, params)
    want = real_step(opt, params, grads)
    history(opt, params, 1, seed=50)
    assert dict_rel_err(state.step(grads, theta).delta, want) <= 1e-12
