"""The dual forward's MLP pieces: the SwiGLU pair rule and the per-pass buffers its pairs live in.

SwiGLU on the stacked pairs [g; ġ], [u; u̇] (index 0 primal, 1 tangent):
    a = silu(g)·u,   ȧ = silu'(g)·ġ·u + silu(g)·u̇   (silu'(g)·ġ is ATen's silu backward)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def scratch(buffers: dict[str, Tensor], key: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """An uninitialised [shape] tensor (like's dtype and device) on storage that every layer of one
    pass reuses (`buffers` lives for one pass). Why: the MLP's pair buffers are the largest
    temporaries (gate/up 40 MB at 16 x 128 tokens, above glibc's 32 MB mmap ceiling), and a fresh one
    per layer is fresh pages, page-faulted on the first write (measured 82 vs 70 ms per layer)."""
    numel = math.prod(shape)
    buf = buffers.get(key)
    if buf is None or buf.numel() < numel or buf.dtype != like.dtype or buf.device != like.device:
        buf = buffers[key] = like.new_empty(numel)
    return buf[:numel].view(shape)


def swiglu_dual(gate: Tensor, up: Tensor, out: Tensor) -> Tensor:
    """SwiGLU on pairs gate, up [2, ..., F] into out [2, ..., F]: a = silu(g)·u,
    ȧ = silu'(g)·ġ·u + silu(g)·u̇ (silu'(g)·ġ is ATen's silu backward), without temporaries."""
    torch.ops.aten.silu_backward.grad_input(gate[1], gate[0], grad_input=out[1])
    out[1].mul_(up[0])
    torch.ops.aten.silu.out(gate[0], out=out[0])
    out[1].addcmul_(out[0], up[1])
    out[0].mul_(up[0])
    return out
