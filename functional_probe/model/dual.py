"""The dual forward: hidden states and their directional derivative in one pass (DESIGN §3).

For a LoRA dict θ and a direction v shaped like it, `dual_hidden_states` returns h(θ) and
ḣ = d/dε h(θ + ε·v) without torch.func: every activation travels as a stacked pair
[x; ẋ] of shape [2, ...] (index 0 primal, 1 tangent), so each frozen matmul runs once on both.

Per linear (group_linear.py: LoRA merged, W' = W + s·B A, in fp32/fp64, else kept low-rank;
NF4 dequantized once per pass):
    y = x W'ᵀ + b,    ẏ = ẋ W'ᵀ + s·(x Ȧᵀ Bᵀ + x Aᵀ Ḃᵀ)
q/k/v are one matmul (gate/up one call each, so that their outputs are contiguous); a group's
low-rank tangent terms share one u = x [Ȧ; A]ᵀ product. The embedding has no tangent, so
layer 0's first norm and q/k/v run on the primal only. Analytic rules:
    RMSNorm  y = w·x̂, x̂ = x·ρ, ρ = (mean x² + eps)^-½:   ẏ = w·ρ(ẋ − x̂·mean(x̂ ẋ))
    RoPE     linear: the same rotation on the tangent
    softmax  ṗ = p ⊙ (ṡ − Σ p ṡ), block-causal with an online softmax (dual_attention.py)
    SwiGLU   ȧ = silu'(g)·ġ·u + silu(g)·u̇  (ATen's silu backward; dual_mlp.py)
`head_stream.head_logprobs_tangent` turns gathered (h, ḣ) rows into log-probs and their tangents.
A no-grad fast path; the reference it equals is `torch.func.jvp` over `FunctionalModel.hidden_states`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from itertools import pairwise

import torch
from einops import rearrange
from torch import Tensor

from ..validation import check_positive_ints
from .decoder import Attention, Block
from .dual_attention import BLOCK_K, BLOCK_Q, attention_pair
from .dual_mlp import swiglu_dual
from .fast_primal import layer_pass, rotate_into
from .functional import FunctionalModel, default_mask, positions_from_mask
from .group_linear import GroupLinear, layer_groups
from .layers import RMSNorm
from .packing import Packing
from .scratch import scratch


@dataclass
class DualLinear:
    """A layer's `GroupLinear` acting on stacked pairs [x; ẋ] (0 primal, 1 tangent).

    y = x Wᵀ + b, ẏ = ẋ Wᵀ + s·(x Ȧᵀ Bᵀ + x Aᵀ Ḃᵀ) per LoRA projection (W merged, or W frozen and
    s·(x Aᵀ) Bᵀ added to both halves when the group keeps LoRA low-rank). down [k, in] stacks the
    rows [Ȧ_p; A_p] of every LoRA projection, so one u = x downᵀ serves them all; ups[p] = (its
    columns of u, its output columns, s_p·[B_p, Ḃ_p] [out_p, 2r]).
    split: one matmul per projection -> [P, 2, ..., out] (gate/up: contiguous halves); else one
    matmul on the group's rows -> [2, ..., Σ out].
    """

    group: GroupLinear
    down: Tensor | None
    ups: list[tuple[slice, slice, Tensor]]
    split: bool

    def columns(self, y: Tensor, cols: slice) -> Tensor:
        """The [2, rows, width] view of y's output columns `cols` (group numbering)."""
        if not self.split:
            return y.view(2, -1, y.shape[-1])[:, :, cols]
        p = self.group.bounds.index(cols.start)
        return y[p].view(2, -1, y.shape[-1])

    def out_shape(self, lead: tuple[int, ...]) -> tuple[int, ...]:
        """The output's shape for inputs [2, *lead, in] (see `split`)."""
        g = self.group
        return (len(g.sizes), 2, *lead, g.sizes[0]) if self.split else (2, *lead, g.bounds[-1])

    def __call__(self, x: Tensor, stacked: bool, out: Tensor | None = None) -> Tensor:
        """x [2, ..., in] (stacked) or primal-only [..., in] (zero tangent) -> see `split`; written
        into `out` (shape `out_shape`) when given."""
        g = self.group
        primal = x[0] if stacked else x
        lead = primal.shape[:-1]
        y = primal.new_empty(self.out_shape(lead)) if out is None else out
        if self.split:
            parts = list(zip(y, g.weight.split(list(g.sizes)), strict=True))
        else:
            parts = [(y, g.weight)]
        for out, weight in parts:
            if stacked:
                torch.matmul(x, weight.T, out=out)
            else:
                torch.matmul(primal, weight.T, out=out[0])
                out[1].zero_()
        halves = x.view(2, -1, x.shape[-1]) if stacked else primal.reshape(1, -1, primal.shape[-1])
        for t in () if g.merged else g.loras:  # the frozen-weight LoRA term, linear in [x; ẋ]
            low_rank = (halves.to(t.a.dtype) @ t.a.T @ t.b.T) * t.scaling
            view = self.columns(y, t.columns)[: len(halves)]
            view.copy_(view + low_rank)
        if self.down is not None:
            u = primal.reshape(-1, primal.shape[-1]) @ self.down.T
            for u_cols, cols, up in self.ups:
                self.columns(y, cols)[1].addmm_(u[:, u_cols], up.T)
        if g.bias is not None:
            if self.split:
                for p, (i, j) in enumerate(pairwise(g.bounds)):
                    y[p, 0].add_(g.bias[i:j])
            else:
                y[0].add_(g.bias)
        return y


def dual_linear(group: GroupLinear, direction: Mapping[str, Tensor], split: bool = False) -> DualLinear:
    """The DualLinear of `group` along `direction` (PEFT keys, shaped like the LoRA dict).

    Mixed precision (fp32 LoRA on a bf16 base): the direction is cast to the LoRA factor's dtype
    and device, the low-rank tangent factors to the frozen weight's dtype, which is the compute
    dtype of the pairs [x; ẋ]."""
    if split and len(set(group.sizes)) > 1:
        raise ValueError(f"split projections must have equal out_features; got {group.sizes}")
    dtype, downs, ups, k = group.weight.dtype, [], [], 0
    for t in group.loras:
        a_dot, b_dot = direction[t.keys[0]].to(t.a), direction[t.keys[1]].to(t.b)
        downs.append(torch.cat([a_dot, t.a]).to(dtype))  # [2r, in]
        up = torch.cat([t.scaling * t.b, t.scaling * b_dot], dim=1).to(dtype)  # [out, 2r]
        ups.append((slice(k, k + up.shape[1]), t.columns, up))
        k += up.shape[1]
    return DualLinear(group, torch.cat(downs) if downs else None, ups, split)


def rms_norm_dual(norm: RMSNorm, x: Tensor, stacked: bool, out: Tensor | None = None) -> Tensor:
    """RMSNorm on pairs [2, ..., D] -> [2, ..., D] (into `out` when given); on a primal-only
    x [..., D] (not stacked) -> [..., D].

    Normalised in at least fp32 like `layers.RMSNorm`: ẏ = w·(ρ(ẋ − x̂·mean(x̂ ẋ))).to(dtype).
    """
    dtype = x.dtype
    primal = (x[0] if stacked else x).to(torch.promote_types(dtype, torch.float32))
    rho = torch.rsqrt(primal.pow(2).mean(-1, keepdim=True) + norm.eps)
    x_hat = primal * rho
    if not stacked:
        return norm.weight * x_hat.to(dtype)
    out = torch.empty_like(x) if out is None else out
    torch.mul(norm.weight, x_hat.to(dtype), out=out[0])
    # Two passes over out[1] instead of four fresh [..., D] temporaries (fp32; bf16 via one fp32 one).
    tangent = out[1] if dtype == x_hat.dtype else torch.empty_like(x_hat)
    torch.mul(x_hat, x[1], out=tangent)
    mean = tangent.mean(-1, keepdim=True)
    torch.addcmul(x[1].to(x_hat.dtype), x_hat, mean, value=-1.0, out=tangent)
    tangent.mul_(rho).mul_(norm.weight.to(x_hat.dtype))
    if tangent is not out[1]:
        out[1].copy_(tangent)
    return out


def attention_dual(
    attn: Attention, qkv: Tensor, rotary: tuple[Tensor, ...], key_mask: Tensor, blocks: tuple[int, int],
    out: Tensor | None = None, buffers: dict[str, Tensor] | None = None,
) -> Tensor:  # fmt: skip
    """Causal GQA attention on the stacked pair qkv [2, B, T, (H + 2K)·d] -> [2, B, T, H·d]
    (into `out` when given; the rotated q and k in `buffers`, see `scratch`).

    rotary = (cos, sin, cos_q, sin_q), each [B, T, d/2] (see `rotary_halves`); key_mask [B, T]
    bool; blocks = (block_q, block_k). With r = H/K: s = q kᵀ/√d, ṡ = (q̇ kᵀ + q k̇ᵀ)/√d,
    p = softmax(s), o = p v, ȯ = ṗ v + p v̇, block-causal with an online softmax
    (`dual_attention.attention_pair`), as decoder.Attention on padded rows too.
    """
    d, kh, r = attn.head_dim, attn.num_kv_heads, attn.group
    _, b, t, _ = qkv.shape
    q, k, v = qkv.split([kh * r * d, kh * d, kh * d], dim=-1)
    q = rearrange(q, "n b t (h d) -> n b t h d", d=d)
    k = rearrange(k, "n b t (h d) -> n b t h d", d=d)
    if attn.q_norm is not None:
        q, k = rms_norm_dual(attn.q_norm, q, True), rms_norm_dual(attn.k_norm, k, True)
    cos, sin, cos_q, sin_q = rotary
    buffers = {} if buffers is None else buffers
    qs, ks = scratch(buffers, "q_rot", (2, b, kh, t, r, d), q), scratch(buffers, "k_rot", (2, b, kh, t, d), k)
    rotate_into(
        qs,
        rearrange(q, "n b t (k r) d -> n b k t r d", k=kh),
        cos_q[:, None, :, None],
        sin_q[:, None, :, None],
    )
    rotate_into(ks, rearrange(k, "n b t k d -> n b k t d"), cos[:, None], sin[:, None])
    vv = rearrange(v, "n b t (k d) -> (b k) t (n d)", k=kh)  # [v, v̇]: [B·K, T, 2d]
    out = qkv.new_empty(2, b, t, kh, r, d) if out is None else out.view(2, b, t, kh, r, d)
    attention_pair(qs, ks.view(2, b * kh, t, d), vv, key_mask, out, *blocks)
    return out.view(2, b, t, kh * r * d)


def block_dual(
    block: Block, linears: dict[str, DualLinear], x: Tensor, stacked: bool, rotary: tuple[Tensor, ...],
    packing: Packing, blocks: tuple[int, int], keep: Tensor | None = None,
    buffers: dict[str, Tensor] | None = None,
) -> Tensor:  # fmt: skip
    """One pre-norm block on the pair x [2, N, D] (packed tokens; [2, B, T, D] unpacked; primal-only
    [N, D] when not stacked) -> [2, N, D]; with `keep` [M] only those tokens go past attention.
    Every pair lives in `buffers` (see `scratch`; fresh when None): the residual alternates between
    "mid" (x + attention) and "out" (mid + MLP), which holds this block's input x until it is spent."""
    buffers = {} if buffers is None else buffers
    lead = (x if stacked else x[None]).shape[1:-1]
    pair = partial(scratch, buffers, like=x)  # pair(key, shape): a scratch tensor like x
    d = x.shape[-1]
    h = rms_norm_dual(block.input_layernorm, x, stacked, out=pair("norm", (2, *lead, d)) if stacked else None)
    qkv_linear = linears["qkv"]
    qkv = packing.to_slots(qkv_linear(h, stacked, out=pair("qkv", qkv_linear.out_shape(lead))))
    sa = block.self_attn
    heads = pair("attn", (*qkv.shape[:-1], sa.num_kv_heads * sa.group * sa.head_dim))
    attn = attention_dual(sa, qkv, rotary, packing.key_mask, blocks, out=heads, buffers=buffers)
    if packing.slots is not None:
        attn = packing.from_slots(attn, out=pair("heads", (2, *lead, attn.shape[-1])))
    if keep is not None:  # the last layer: the rest feeds nothing
        attn, x = attn.index_select(1, keep), x.index_select(-2, keep)
    o = linears["o"]
    a = o(attn, True, out=pair("mid", o.out_shape(attn.shape[1:-1])))
    if stacked:
        a += x
    else:
        a[0] += x
    gate_up, down = linears["gate_up"], linears["down"]
    gate, up = gate_up(
        rms_norm_dual(block.post_attention_layernorm, a, True, out=pair("norm", a.shape)),
        True, out=pair("gate_up", gate_up.out_shape(a.shape[1:-1])),
    )  # fmt: skip
    act = swiglu_dual(gate, up, pair("act", gate.shape))
    return down(act, True, out=pair("out", down.out_shape(a.shape[1:-1]))).add_(a)


def layer_linears(
    model: FunctionalModel, index: int, lora: Mapping[str, Tensor], direction: Mapping[str, Tensor]
) -> dict[str, DualLinear]:
    """The DualLinears of layer `index` ('qkv', 'o', 'gate_up' split, 'down')."""
    groups = layer_groups(model, index, lora)
    return {name: dual_linear(g, direction, split=name == "gate_up") for name, g in groups.items()}


def dual_tokens(
    model: FunctionalModel, lora: Mapping[str, Tensor], direction: Mapping[str, Tensor], input_ids: Tensor,
    packing: Packing, *, last: Tensor | None = None, block_q: int = BLOCK_Q, block_k: int = BLOCK_K,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(h, ḣ): the final normed hidden states of `packing`'s tokens of input_ids [B, T] and their
    derivative along `direction`, [N, D] each ([B, T, D] unpacked; [M, D] for the tokens `last`
    [M], indices into the N). No grad, in the model dtype; pure in lora/direction."""
    check_positive_ints(block_q=block_q, block_k=block_k)
    model.check_lora(lora)
    model.check_lora(direction)
    buffers: dict[str, Tensor] = {}  # every pair's storage, shared by the layers of this pass (scratch.py)
    with torch.no_grad():

        def layer(i: int, block: Block, x: Tensor, rotary: tuple[Tensor, ...], keep: Tensor | None) -> Tensor:
            linears = layer_linears(model, i, lora, direction)
            return block_dual(block, linears, x, i > 0, rotary, packing, (block_q, block_k), keep, buffers)

        out = rms_norm_dual(model.decoder.norm, layer_pass(model, input_ids, packing, layer, last), True)
        return out[0], out[1]


def dual_hidden_states(
    model: FunctionalModel, lora: Mapping[str, Tensor], direction: Mapping[str, Tensor],
    input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
    *, block_q: int = BLOCK_Q, block_k: int = BLOCK_K,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """(h, ḣ), both [B, T, D]: final normed hidden states and their derivative d/dε h(lora + ε·direction),
    at every position (pads included, as the plain forward computes them).

    Same inputs and defaults as `FunctionalModel.hidden_states` (mask [B, T], 1 = real token;
    positions cumsum(mask) − 1). Runs under no_grad in the model dtype; pure in lora/direction.
    Equals `torch.func.jvp(lambda l: model.hidden_states(l, ...), (lora,), (direction,))`.
    Attention goes in query blocks of `block_q` and key blocks of `block_k` positions.
    """
    mask = default_mask(input_ids, attention_mask)
    if position_ids is None:
        position_ids = positions_from_mask(mask)
    packing = Packing.full(mask, position_ids)
    return dual_tokens(model, lora, direction, input_ids, packing, block_q=block_q, block_k=block_k)
