"""The no-grad primal fast path: S without autograd, LoRA merged, attention block-causal (DESIGN §3).

For passes that need no derivative (realized-ΔH sweeps, first-order checks, `sequence_logprobs`
under no_grad) the LoRA path is merged into the frozen weight once per pass,
W' = W + s·B A in fp32/fp64 (group_linear.py, NF4 dequantized there), q/k/v and gate/up run as one
matmul each, attention is the dual's block-causal online softmax without the tangent
(`dual_attention.attention_primal`), and the head runs only on response positions, streamed over rows and
vocabulary chunks (head_stream.py). It equals `FunctionalModel.hidden_states` + a log-softmax head (1e-5, fp32).
It builds no graph: the caller chooses it (`sequence_logprobs(..., derivatives=False)`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from ..validation import check_positive_ints
from .decoder import Attention, Block
from .dual_attention import BLOCK_K, BLOCK_Q, attention_primal
from .functional import FunctionalModel
from .group_linear import GroupLinear, layer_groups
from .head_stream import head_logprobs
from .layers import rotary_cos_sin
from .packing import Packing, needed, row_sums


def rotate_into(out: Tensor, x: Tensor, cos: Tensor, sin: Tensor) -> None:
    """RoPE in the rotate-half convention, written into `out` (any strides, x's shape [..., d]):
    out = [x₁ c − x₂ s, x₂ c + x₁ s] with halves x₁, x₂ and cos/sin halves c, s broadcasting."""
    f = x.shape[-1] // 2
    x1, x2, o1, o2 = x[..., :f], x[..., f:], out[..., :f], out[..., f:]
    torch.mul(x1, cos, out=o1)
    o1.addcmul_(x2, sin, value=-1)
    torch.mul(x2, cos, out=o2)
    o2.addcmul_(x1, sin)


def rotary_halves(cos: Tensor, sin: Tensor, head_dim: int) -> tuple[Tensor, ...]:
    """From layers.rotary_cos_sin's cos/sin [B, T, d] (= [c, c] and [s, s]):
    (c, s, c_q, s_q), each [B, T, d/2], with c_q, s_q = (c, s)·d^-½ (the score scale folded into q)."""
    half = cos.shape[-1] // 2
    cos, sin = cos[..., :half], sin[..., :half]
    return cos, sin, cos * head_dim**-0.5, sin * head_dim**-0.5


def attention_fast(
    attn: Attention, qkv: Tensor, rotary: tuple[Tensor, ...], key_mask: Tensor, blocks: tuple[int, int]
) -> Tensor:
    """Causal GQA attention, qkv [B, T, (H + 2K)·d] -> [B, T, H·d]; rotary from `rotary_halves`."""
    d, kh, r = attn.head_dim, attn.num_kv_heads, attn.group
    b, t, _ = qkv.shape
    q, k, v = qkv.split([kh * r * d, kh * d, kh * d], dim=-1)
    q = rearrange(q, "b t (h d) -> b t h d", d=d)
    k = rearrange(k, "b t (h d) -> b t h d", d=d)
    if attn.q_norm is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    cos, sin, cos_q, sin_q = rotary
    qs, ks = q.new_empty(b, kh, t, r, d), k.new_empty(b, kh, t, d)
    q = rearrange(q, "b t (k r) d -> b k t r d", k=kh)
    rotate_into(qs, q, cos_q[:, None, :, None], sin_q[:, None, :, None])
    rotate_into(ks, rearrange(k, "b t k d -> b k t d"), cos[:, None], sin[:, None])
    out = qkv.new_empty(b, t, kh, r, d)
    attention_primal(
        qs, ks.view(b * kh, t, d), rearrange(v, "b t (k d) -> (b k) t d", k=kh), key_mask, out, *blocks
    )
    return out.view(b, t, kh * r * d)


def block_fast(
    block: Block, linears: dict[str, GroupLinear], x: Tensor, rotary: tuple[Tensor, ...],
    packing: Packing, blocks: tuple[int, int], keep: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """One pre-norm block, x [N, D] packed tokens ([B, T, D] unpacked) -> [N, D], updated in place;
    with `keep` [M] only those tokens go past attention (-> [M, D])."""
    qkv = packing.to_slots(linears["qkv"](block.input_layernorm(x))[None])[0]
    attn = packing.from_slots(attention_fast(block.self_attn, qkv, rotary, packing.key_mask, blocks)[None])[0]
    if keep is not None:  # the last layer: the rest feeds nothing
        attn, x = attn[keep], x[keep]
    x += linears["o"](attn)
    gate, up = linears["gate_up"](block.post_attention_layernorm(x)).chunk(2, dim=-1)
    x += linears["down"](F.silu(gate).mul_(up))
    return x


def layer_pass(
    model: FunctionalModel, input_ids: Tensor, packing: Packing, layer, last: Tensor | None
) -> Tensor:
    """The layer loop of the no-graph passes (this primal and the dual): x = embedding of `packing`'s
    tokens of input_ids [B, T], then x = layer(i, block, x, rotary, keep) per block, rotary from
    `rotary_halves` at the tokens' positions, keep = `last` at the last block (else None)."""
    dec = model.decoder
    x = F.embedding(packing.pack(input_ids), dec.embed_tokens)
    cos, sin = rotary_cos_sin(packing.positions, dec.inv_freq, dec.attention_scaling, x.dtype)
    rotary = rotary_halves(cos, sin, dec.cfg.head_dim)
    for i, block in enumerate(dec.layers):
        x = layer(i, block, x, rotary, last if i == len(dec.layers) - 1 else None)
    return x


def fast_tokens(
    model: FunctionalModel, lora: Mapping[str, Tensor], input_ids: Tensor, packing: Packing,
    *, last: Tensor | None = None, block_q: int = BLOCK_Q, block_k: int = BLOCK_K,
) -> Tensor:  # fmt: skip
    """The last block's output (before the final norm) at `packing`'s tokens of input_ids [B, T]:
    [N, D] ([B, T, D] unpacked; [M, D] for the tokens `last` [M], indices into the N), no grad."""
    model.check_lora(lora)
    check_positive_ints(block_q=block_q, block_k=block_k)
    with torch.no_grad():

        def layer(i: int, block: Block, x: Tensor, rotary: tuple[Tensor, ...], keep: Tensor | None) -> Tensor:
            return block_fast(
                block, layer_groups(model, i, lora), x, rotary, packing, (block_q, block_k), keep
            )

        return layer_pass(model, input_ids, packing, layer, last)


def fast_sequence_logprobs(
    model: FunctionalModel, lora: Mapping[str, Tensor], input_ids: Tensor, attention_mask: Tensor,
    position_ids: Tensor, response_mask: Tensor, *, prompt_end: int, temperature: float = 1.0,
    chunk_tokens: int = 1024, block_q: int = BLOCK_Q, block_k: int = BLOCK_K,
) -> Tensor:  # fmt: skip
    """S [...] from a Batch's tensors [..., T] (as `logprobs.grouped_logprobs`), no grad:
    Σ over response tokens y_t of log softmax(z_{t−1}/τ)[y_t], computed on the needed tokens only
    (packing.py) and the head on the positions predicting response tokens only."""
    lead, flat = input_ids.shape[:-1], lambda t: t.reshape(-1, t.shape[-1])  # noqa: E731
    ids = flat(input_ids)
    keep, head_rows, rows, cols = needed(flat(attention_mask), flat(response_mask), prompt_end)
    packing = Packing.of(keep, flat(position_ids))
    x = fast_tokens(model, lora, ids, packing, last=head_rows, block_q=block_q, block_k=block_k)
    with torch.no_grad():
        logp = head_logprobs(model.decoder.norm(x), model.head_weight, ids[rows, cols + 1],
                             temperature=temperature, chunk_size=chunk_tokens)  # fmt: skip
        return row_sums(logp, rows, cols, ids.shape).reshape(lead)
