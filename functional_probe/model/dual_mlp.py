"""The dual forward's MLP piece: the SwiGLU pair rule on stacked pairs.

SwiGLU on the stacked pairs [g; ġ], [u; u̇] (index 0 primal, 1 tangent):
    a = silu(g)·u,   ȧ = silu'(g)·ġ·u + silu(g)·u̇   (silu'(g)·ġ is ATen's silu backward)
"""

from __future__ import annotations

import torch
from torch import Tensor


def swiglu_dual(gate: Tensor, up: Tensor, out: Tensor) -> Tensor:
    """SwiGLU on pairs gate, up [2, ..., F] into out [2, ..., F]: a = silu(g)·u,
    ȧ = silu'(g)·ġ·u + silu(g)·u̇ (silu'(g)·ġ is ATen's silu backward), without temporaries."""
    torch.ops.aten.silu_backward.grad_input(gate[1], gate[0], grad_input=out[1])
    out[1].mul_(up[0])
    torch.ops.aten.silu.out(gate[0], out=out[0])
    out[1].addcmul_(out[0], up[1])
    out[0].mul_(up[0])
    return out
