"""The no-grad primal fast path: S without autograd, LoRA merged, attention block-causal (DESIGN §3).

For passes that need no derivative (realized-ΔH sweeps, first-order checks, `sequence_logprobs`
under no_grad) the LoRA path is merged into the frozen weight once per pass,
W' = W + s·B A in fp32/fp64 (group_linear.py, NF4 dequantized there), q/k/v and gate/up run as one
matmul each, attention is the dual's block-causal online softmax without the tangent
(`dual_attention.attention_primal`), and the head runs only on response positions, a chunk of
rows at a time. It equals `FunctionalModel.hidden_states` + a log-softmax head (1e-5, fp32).
It builds no graph: the caller chooses it (`sequence_logprobs(..., derivatives=False)`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from .decoder import Attention, Block
from .dual import rotary_halves, rotate_into
from .dual_attention import BLOCK_K, BLOCK_Q, attention_primal, check_blocks
from .functional import FunctionalModel
from .group_linear import GroupLinear, layer_groups
from .layers import rotary_cos_sin


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
    block: Block, linears: dict[str, GroupLinear], x: Tensor,
    rotary: tuple[Tensor, ...], key_mask: Tensor, blocks: tuple[int, int],
) -> Tensor:  # fmt: skip
    """One pre-norm block, x [B, T, D] -> [B, T, D] (x is updated in place)."""
    qkv = linears["qkv"](block.input_layernorm(x))
    x += linears["o"](attention_fast(block.self_attn, qkv, rotary, key_mask, blocks))
    gate, up = linears["gate_up"](block.post_attention_layernorm(x)).chunk(2, dim=-1)
    x += linears["down"](F.silu(gate).mul_(up))
    return x


def fast_hidden_states(
    model: FunctionalModel, lora: Mapping[str, Tensor], input_ids: Tensor, attention_mask: Tensor,
    position_ids: Tensor, *, block_q: int = BLOCK_Q, block_k: int = BLOCK_K,
) -> Tensor:  # fmt: skip
    """The last block's output [B, T, D] (before the final norm) under no_grad; inputs [B, T]
    (mask bool, 1 = real token) as for `FunctionalModel.hidden_states`."""
    model.check_lora(lora)
    check_blocks(block_q, block_k)
    with torch.no_grad():
        dec = model.decoder
        x = F.embedding(input_ids, dec.embed_tokens)
        cos, sin = rotary_cos_sin(position_ids, dec.inv_freq, dec.attention_scaling, x.dtype)
        rotary = rotary_halves(cos, sin, dec.cfg.head_dim)
        for i, block in enumerate(dec.layers):
            x = block_fast(block, layer_groups(model, i, lora), x, rotary, attention_mask, (block_q, block_k))
        return x


def head_logprobs(
    hidden: Tensor, head_weight: Tensor, targets: Tensor, *, temperature: float = 1.0, chunk_size: int = 1024
) -> Tensor:
    """log softmax(h Wᵀ / τ)[y]: hidden [M, D] (normed rows), head_weight [V, D], targets [M] -> [M]
    in ≥ fp32, `chunk_size` rows at a time in one reused [chunk, V] buffer."""
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    weight, m = head_weight.to(dtype), hidden.shape[0]
    logp = hidden.new_empty(m, dtype=dtype)
    buf = hidden.new_empty(min(chunk_size, m), weight.shape[0], dtype=dtype)
    for start in range(0, m, chunk_size):
        rows = slice(start, min(start + chunk_size, m))
        h = hidden[rows].to(dtype)
        z = torch.matmul(h / temperature if temperature != 1.0 else h, weight.T, out=buf[: h.shape[0]])
        z.sub_(z.amax(-1, keepdim=True))
        logp[rows] = z.gather(-1, targets[rows, None])[:, 0] - z.exp_().sum(-1).log()
    return logp


def fast_sequence_logprobs(
    model: FunctionalModel, lora: Mapping[str, Tensor], input_ids: Tensor, attention_mask: Tensor,
    position_ids: Tensor, response_mask: Tensor, *, prompt_end: int, temperature: float = 1.0,
    chunk_tokens: int = 1024, block_q: int = BLOCK_Q, block_k: int = BLOCK_K,
) -> Tensor:  # fmt: skip
    """S [...] from a Batch's tensors [..., T] (as `logprobs.grouped_logprobs`), no grad:
    Σ over response tokens y_t of log softmax(z_{t−1}/τ)[y_t], the head on those rows only."""
    lead, flat = input_ids.shape[:-1], lambda t: t.reshape(-1, t.shape[-1])  # noqa: E731
    ids = flat(input_ids)
    mask, positions = flat(attention_mask).bool(), flat(position_ids)
    x = fast_hidden_states(model, lora, ids, mask, positions, block_q=block_q, block_k=block_k)
    with torch.no_grad():
        rows, cols = flat(response_mask)[:, prompt_end:].nonzero(as_tuple=True)
        hidden = model.decoder.norm(x[:, prompt_end - 1 : -1][rows, cols])
        logp = head_logprobs(
            hidden,
            model.head_weight,
            ids[:, prompt_end:][rows, cols],
            temperature=temperature,
            chunk_size=chunk_tokens,
        )
        return logp.new_zeros(ids.shape[0]).index_add_(0, rows, logp).reshape(lead)
