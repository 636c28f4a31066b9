"""Causal grouped-query attention: plain ops (every transform) or SDPA (first-order reverse).

Both take q [B, H, T, d] (rotary applied) and k, v [B, K, T, d] with H = r·K, and return
[B, H, T, d]. They agree on every query that sees at least one key; a query that sees none
(a left-pad position) gets a finite, meaningless output in both (never NaN), which no real
token reads, because pad keys are masked for every query.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor


def attention_allowed(attention_mask: Tensor) -> Tensor:
    """Causal ∧ key-is-real: [B, T] bool -> [B, 1, 1, T, T] bool (query t may see key s)."""
    t = attention_mask.shape[-1]
    causal = torch.ones(t, t, dtype=torch.bool, device=attention_mask.device).tril()
    return (causal & attention_mask[:, None, :])[:, None, None]


def sdpa_bias(attention_mask: Tensor, dtype: torch.dtype) -> Tensor:
    """Additive SDPA mask [B, 1, T, T]: 0 where `attention_allowed`, −inf elsewhere, except that
    each query always sees itself, so no row is fully masked on any kernel (math kernels turn a
    fully masked row into NaN). The diagonal only changes pad queries, which no real token reads."""
    t = attention_mask.shape[-1]
    eye = torch.eye(t, dtype=torch.bool, device=attention_mask.device)
    allowed = attention_allowed(attention_mask)[:, :, 0] | eye  # [B, 1, T, T]
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(~allowed, -torch.inf)


def plain_attention(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor) -> Tensor:
    """softmax(q kᵀ/√d + mask) v in plain ops, softmax in ≥ fp32; allowed [B, 1, 1, T, T] bool.

    Keeps [B, H, T, T] scores for reverse mode: use it where forward mode or double reverse
    is needed. Fully masked rows get a finite fill, hence uniform weights instead of NaN.
    """
    q = rearrange(q, "b (k r) t d -> b k r t d", k=k.shape[1])  # r query heads per kv head
    scores = torch.einsum("bkrtd,bksd->bkrts", q, k) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    probs = scores.softmax(-1, dtype=torch.promote_types(q.dtype, torch.float32)).to(q.dtype)
    return rearrange(torch.einsum("bkrts,bksd->bkrtd", probs, v), "b k r t d -> b (k r) t d")


def sdpa_attention(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None) -> Tensor:
    """The same through `F.scaled_dot_product_attention` (CPU: its flash kernel): nothing of
    size [T, T] is saved for backward. bias: `sdpa_bias` [B, 1, T, T], or None for causal only."""
    with warnings.catch_warnings():
        # Under vmap (per-sample gradients) torch 2.13 has no batching rule for the CPU flash
        # kernel and loops over the batch with a performance warning: exact, and a per-prompt
        # loop is what a per-sample pass costs anyway, so the warning says nothing actionable.
        warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet "
                                "implemented the batching rule for aten::_scaled_dot_product")  # fmt: skip
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=bias is None, enable_gqa=True)
