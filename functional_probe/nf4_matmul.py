"""Transform-safe y = x Wᵀ with W stored as NF4 bytes: the autograd Functions under `NF4Linear`.

W is stored as bitsandbytes stores it (``quantize_4bit``, ``blocksize=64``, ``quant_type="nf4"``,
``compress_statistics=True``): packed uint8 bytes, two 4-bit codes per byte, plus a
double-quantized per-block absmax. :func:`nf4_linear` runs through :class:`_NF4Matmul`, a
``torch.autograd.Function`` with ``setup_context``, ``generate_vmap_rule = True`` and a ``jvp``.
It dequantizes this one layer (``bitsandbytes.functional.dequantize_4bit``) inside its forward and
saves only the packed bytes and the small quant statistics for backward, never a dequantized
copy. Its backward is ``grad_x = grad_y W`` through a second Function, :class:`_NF4MatmulT`,
whose own backward is the first: the backward is itself differentiable, so ``grad``, ``vjp``,
``jvp``, ``vmap(grad)`` and vjp-of-vjp all work (bitsandbytes' own ``Linear4bit`` works under
none of them; see DESIGN.md §2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from bitsandbytes import functional as bnbF
from torch import Tensor

__all__ = ["dequantize_nf4", "nf4_linear"]

BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256


def dequantize_nf4(
    packed: Tensor,
    absmax: Tensor,
    nested_absmax: Tensor,
    nested_code: Tensor,
    offset: Tensor,
    code: Tensor,
    shape: tuple[int, int],
    quant_dtype: torch.dtype,
) -> Tensor:
    """Dequantize packed NF4 bytes [ceil(out·in/2), 1] to W [out, in] in ``quant_dtype``.

    W[i] = code[nibble_i] · absmax_block(i), absmax = dequantize_blockwise(absmax_u8) + offset.
    """
    state2 = bnbF.QuantState(
        absmax=nested_absmax, code=nested_code, blocksize=NESTED_BLOCKSIZE, dtype=torch.float32
    )
    state = bnbF.QuantState(
        absmax=absmax,
        shape=torch.Size(shape),
        code=code,
        blocksize=BLOCKSIZE,
        quant_type="nf4",
        dtype=quant_dtype,
        offset=offset,
        state2=state2,
    )
    # reshape undoes bnb's transpose shim for a [1, 1] packed tensor (a 2-element weight).
    return bnbF.dequantize_4bit(packed, state).reshape(shape)


class _NF4Matmul(torch.autograd.Function):
    """y = x Wᵀ: x [..., in] -> y [..., out], W dequantized in x's dtype, never saved."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, packed, absmax, nested_absmax, nested_code, offset, code, shape, quant_dtype):
        w = dequantize_nf4(
            packed, absmax, nested_absmax, nested_code, offset, code, shape, quant_dtype
        )
        return F.linear(x, w.to(x.dtype))

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, *quant, shape, quant_dtype = inputs
        ctx.save_for_backward(*quant)
        ctx.save_for_forward(*quant)
        ctx.meta = (shape, quant_dtype)

    @staticmethod
    def backward(ctx, grad_y):
        # grad_x = grad_y W, itself a Function whose backward is this one's forward.
        grad_x = _NF4MatmulT.apply(grad_y, *ctx.saved_tensors, *ctx.meta)
        return (grad_x,) + (None,) * 8

    @staticmethod
    def jvp(ctx, x_dot, *_):
        # Linear in x; the frozen buffers carry no tangent.
        return _NF4Matmul.apply(x_dot, *ctx.saved_tensors, *ctx.meta)


class _NF4MatmulT(torch.autograd.Function):
    """g W: g [..., out] -> [..., in] (the transposed product), W never saved."""

    generate_vmap_rule = True

    @staticmethod
    def forward(g, packed, absmax, nested_absmax, nested_code, offset, code, shape, quant_dtype):
        w = dequantize_nf4(
            packed, absmax, nested_absmax, nested_code, offset, code, shape, quant_dtype
        )
        return torch.matmul(g, w.to(g.dtype))

    setup_context = staticmethod(_NF4Matmul.setup_context)

    @staticmethod
    def backward(ctx, grad_out):
        grad_g = _NF4Matmul.apply(grad_out, *ctx.saved_tensors, *ctx.meta)
        return (grad_g,) + (None,) * 8

    @staticmethod
    def jvp(ctx, g_dot, *_):
        return _NF4MatmulT.apply(g_dot, *ctx.saved_tensors, *ctx.meta)


def nf4_linear(
    x: Tensor,
    packed: Tensor,
    absmax: Tensor,
    nested_absmax: Tensor,
    nested_code: Tensor,
    offset: Tensor,
    code: Tensor,
    *,
    shape: tuple[int, int],
    quant_dtype: torch.dtype = torch.float32,
) -> Tensor:
    """y = x Wᵀ with W [out, in] = shape stored as NF4; x [..., in] -> y [..., out] in x's dtype.

    W is dequantized in ``quant_dtype`` (what the quant state records) and cast to x's dtype.
    Differentiable in x to any order under autograd and every torch.func transform; the
    quant buffers get no gradient. Backward saves the packed bytes, not W.
    """
    return _NF4Matmul.apply(
        x, packed, absmax, nested_absmax, nested_code, offset, code, tuple(shape), quant_dtype
    )
