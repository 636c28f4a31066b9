"""The functorch-safe per-layer checkpoint against the same layer run without it."""

import torch
from helpers import assert_not_trivial, dict_rel_err, rel_err
from torch import nn

from functional_probe.model.attention import attention_allowed
from functional_probe.model.checkpoint import checkpointed
from functional_probe.model.kernels import PLAIN
from functional_probe.model.layers import rotary_cos_sin


class Run(nn.Module):
    """The block called directly or through `checkpointed` (the way Decoder.forward calls it)."""

    def __init__(self, block, use_checkpoint):
        super().__init__()
        self.block, self.use_checkpoint = block, use_checkpoint

    def forward(self, x, cos, sin, allowed):
        if self.use_checkpoint:
            return checkpointed(self.block, x, (cos, sin, allowed, PLAIN))
        return self.block(x, cos, sin, allowed, PLAIN)


def layer_inputs(model, rows=2, T=12):
    dec = model.decoder
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, T, dec.cfg.hidden_size, generator=gen)
    mask = torch.ones(rows, T, dtype=torch.bool)
    mask[1, :3] = False
    pos = (mask.long().cumsum(-1) - 1).clamp(min=0)
    cos, sin = rotary_cos_sin(pos, dec.inv_freq, dec.attention_scaling, x.dtype)
    return x, cos, sin, attention_allowed(mask), torch.randn(x.shape, generator=gen)


def test_checkpointed_layer_gives_the_same_gradients_under_grad_and_vmap(tiny_fp32):
    block = tiny_fp32.decoder.layers[1]
    x, cos, sin, allowed, w = layer_inputs(tiny_fp32)
    params = {f"block.{k}": v.detach() for k, v in block.named_parameters()}

    def loss(use_checkpoint):
        run = Run(block, use_checkpoint)
        return lambda p, x, w, cos, sin, allowed: (
            w * torch.func.functional_call(run, p, (x, cos, sin, allowed))
        ).sum()

    args = (x, w, cos, sin, allowed)
    got = torch.func.grad(loss(True), argnums=(0, 1))(params, *args)
    want = torch.func.grad(loss(False), argnums=(0, 1))(params, *args)
    assert_not_trivial(want[0])
    # recomputation runs the same ops outside autograd: equal up to fp32 rounding, not bitwise
    assert dict_rel_err(got[0], want[0]) <= 1e-6 and rel_err(got[1], want[1]) <= 1e-6

    def per_row(use_checkpoint):  # vmap(grad) over rows, each a batch of one
        return torch.func.vmap(torch.func.grad(loss(use_checkpoint), argnums=(0, 1)), in_dims=(None,) + (0,) * 5)(
            params, *(a[:, None] for a in args)
        )

    (p_got, x_got), (p_want, x_want) = per_row(True), per_row(False)
    assert dict_rel_err(p_got, p_want) <= 1e-6 and rel_err(x_got, x_want) <= 1e-6


def test_checkpointed_layer_keeps_only_its_inputs(tiny_fp32):
    """Under plain autograd the saved tensors are x, the mask/rotary inputs and the parameters."""
    block = tiny_fp32.decoder.layers[0]
    x, cos, sin, allowed, _ = layer_inputs(tiny_fp32)
    shapes = {"plain": [], "checkpoint": []}
    for name, use in (("plain", False), ("checkpoint", True)):
        x_ = x.clone().requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(lambda t, n=name: shapes[n].append(t.shape) or t, lambda t: t):
            Run(block, use)(x_, cos, sin, allowed)
    inputs = {x.shape, cos.shape, allowed.shape} | {p.shape for p in block.parameters()}
    assert set(shapes["checkpoint"]) <= inputs
    assert len(shapes["plain"]) > 3 * len(shapes["checkpoint"])
