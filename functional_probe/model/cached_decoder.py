"""`CachedDecoder`: the decoder of a `FunctionalModel`, one token at a time with a key/value cache.

What the sampler runs (sampling.py). Each layer's projections are `group_linear.GroupLinear`s built
once per θ: NF4 dequantized once, LoRA merged in fp32/fp64 and kept low-rank in bf16/fp16.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from .functional import FunctionalModel, positions_from_mask
from .group_linear import layer_groups
from .layers import apply_rotary, rotary_cos_sin


class CachedDecoder:
    """The decoder of `model` at LoRA dict `lora`, decoding incrementally with a KV cache.

    `start(ids, mask, capacity)` runs the (left-padded) prompts [R, P] and returns the last
    hidden state [R, D]; each `step(tokens [R])` appends one token per row and returns its
    hidden state [R, D]. Positions are cumsum(mask) − 1, as in the full forward, so padding
    shifts nothing; attention is the decoder's (plain ops, finite fill, softmax in ≥ fp32).
    """

    def __init__(self, model: FunctionalModel, lora: Mapping[str, Tensor]) -> None:
        model.check_lora(lora)
        self.decoder = model.decoder
        with torch.no_grad():
            self.weights = [layer_groups(model, i, lora) for i in range(len(self.decoder.layers))]

    def start(self, input_ids: Tensor, attention_mask: Tensor, capacity: int) -> Tensor:
        """Prompts [R, P] (mask True on real tokens), cache room for `capacity` ≥ P tokens -> [R, D]."""
        cfg, rows = self.decoder.cfg, input_ids.shape[0]
        dtype, device = self.decoder.embed_tokens.dtype, input_ids.device
        shape = (rows, cfg.num_kv_heads, capacity, cfg.head_dim)
        empty = lambda: torch.empty(shape, dtype=dtype, device=device)  # noqa: E731
        self.cache = [(empty(), empty()) for _ in self.weights]  # (keys, values) per layer
        self.key_valid = torch.zeros(rows, capacity, dtype=torch.bool, device=device)
        self.length = 0
        self.next_position = attention_mask.long().sum(-1)  # [R]
        return self._forward(input_ids, positions_from_mask(attention_mask), attention_mask)[:, -1]

    def step(self, tokens: Tensor) -> Tensor:
        """Append tokens [R] at each row's next position -> hidden states [R, D]."""
        ones = torch.ones_like(tokens, dtype=torch.bool)[:, None]
        hidden = self._forward(tokens[:, None], self.next_position[:, None], ones)[:, -1]
        self.next_position = self.next_position + 1
        return hidden

    @torch.no_grad()
    def _forward(self, ids: Tensor, positions: Tensor, mask: Tensor) -> Tensor:
        """ids, positions, mask [R, t] appended after the cached tokens -> hidden [R, t, D]."""
        dec, t = self.decoder, ids.shape[1]
        start, stop = self.length, self.length + t
        if stop > self.key_valid.shape[1]:
            raise ValueError(f"the KV cache holds {self.key_valid.shape[1]} tokens; {stop} requested")
        self.key_valid[:, start:stop] = mask
        causal = torch.ones(t, stop, dtype=torch.bool, device=ids.device).tril(diagonal=start)
        allowed = (causal & self.key_valid[:, None, :stop])[:, None, None]  # [R, 1, 1, t, stop]
        x = F.embedding(ids, dec.embed_tokens)
        cos, sin = rotary_cos_sin(positions, dec.inv_freq, dec.attention_scaling, x.dtype)
        for block, weights, (k_cache, v_cache) in zip(dec.layers, self.weights, self.cache, strict=True):
            a = self._attention(block.self_attn, weights, block.input_layernorm(x), cos, sin, allowed,
                                k_cache, v_cache, start, stop)  # fmt: skip
            x = x + weights["o"](a)
            gate, up = weights["gate_up"](block.post_attention_layernorm(x)).chunk(2, dim=-1)
            x = x + weights["down"](F.silu(gate) * up)
        self.length = stop
        return dec.norm(x)

    @staticmethod
    def _attention(attn, weights, h, cos, sin, allowed, k_cache, v_cache, start, stop) -> Tensor:
        """decoder.Attention on the new rows h [R, t, D] against the cached keys 0..stop."""
        d, kh = attn.head_dim, attn.num_kv_heads
        q, k, v = weights["qkv"](h).split([kh * attn.group * d, kh * d, kh * d], dim=-1)
        q, k, v = (rearrange(p, "b t (h d) -> b h t d", d=d) for p in (q, k, v))
        if attn.q_norm is not None:
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        k_cache[:, :, start:stop], v_cache[:, :, start:stop] = k, v
        q = rearrange(q, "b (k r) t d -> b k r t d", k=kh)
        scores = torch.einsum("bkrtd,bksd->bkrts", q, k_cache[:, :, :stop]) * d**-0.5
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        probs = scores.softmax(-1, dtype=torch.promote_types(h.dtype, torch.float32)).to(h.dtype)
        out = torch.einsum("bkrts,bksd->bkrtd", probs, v_cache[:, :, :stop])
        return rearrange(out, "b k r t d -> b t (k r d)")
