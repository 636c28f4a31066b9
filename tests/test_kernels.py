"""Kernels: the first-order reverse kernels (SDPA attention, recompute head, checkpointing) give the
plain forward's hidden states, and bad kernel choices are refused."""

from __future__ import annotations

import pytest
import torch


def test_first_order_kernels_hidden_states_equal_plain_on_real_tokens(tiny_nf4):
    from helpers import teacher_forcing_inputs

    from functional_probe.model.kernels import PLAIN, first_order_kernels

    ids, mask, _ = teacher_forcing_inputs(tiny_nf4.vocab_size)  # row 1 left-padded
    lora = tiny_nf4.lora
    want = tiny_nf4.hidden_states(lora, ids, mask, kernels=PLAIN)
    for checkpoint in (False, True):
        fast = first_order_kernels(3, 24, left_padded=True, checkpoint=checkpoint)
        got = tiny_nf4.hidden_states(lora, ids, mask, kernels=fast)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got[mask], want[mask], rtol=1e-5, atol=1e-5)


def test_bad_kernels_raise():
    from functional_probe.model.kernels import Kernels

    with pytest.raises(ValueError, match="attention='flash'"):
        Kernels(attention="flash")
    with pytest.raises(ValueError, match="causal_only applies to attention='sdpa'"):
        Kernels(causal_only=True)


def test_transform_active_sees_torch_func_transforms_and_forward_ad_only():
    from functional_probe.model.kernels import transform_active

    x = {"x": torch.ones(3)}
    assert not transform_active(x)
    with torch.enable_grad():
        assert not transform_active({"x": torch.ones(3, requires_grad=True)})  # autograd: no transform
    seen = []
    torch.func.vmap(lambda t: seen.append(transform_active({"t": t})) or t)(torch.ones(2, 3))
    torch.func.grad(lambda t: seen.append(transform_active({"t": t})) or t.sum())(torch.ones(3))
    torch.func.jvp(lambda t: seen.append(transform_active({"t": t})) or t, (torch.ones(3),), (torch.ones(3),))
    with torch.autograd.forward_ad.dual_level():
        seen.append(transform_active({"x": torch.autograd.forward_ad.make_dual(torch.ones(3), torch.ones(3))}))
    assert seen == [True, True, True, True]
