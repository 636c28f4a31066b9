"""The pure primal forward of a Llama-family decoder (Llama, Mistral, Qwen2, Qwen3).

A compact re-implementation in the style of gpt-fast: every frozen tensor is a buffer, the
LoRA factors are the only parameters. How it computes is the caller's `Kernels` (kernels.py):
by default attention in plain differentiable ops (forward-mode AD works on every device; SDPA
has no forward-mode rule on CPU); for first-order reverse SDPA and per-layer checkpointing.
Module names mirror transformers' (`layers.0.self_attn.q_proj`), so checkpoint keys map one to one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from .attention import attention_allowed, plain_attention, sdpa_attention, sdpa_bias
from .checkpoint import checkpointed
from .kernels import PLAIN, Kernels
from .layers import RMSNorm, apply_rotary, rotary_cos_sin

__all__ = ["MLP", "PROJECTIONS", "SUPPORTED_ARCHITECTURES", "Attention", "Block", "Decoder",
           "DecoderConfig", "attention_allowed"]  # fmt: skip

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class DecoderConfig:
    """Shapes and constants of a Llama-family decoder, read from a transformers config."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    qk_norm: bool
    attention_bias: bool
    mlp_bias: bool
    tie_word_embeddings: bool

    @classmethod
    def from_hf(cls, config) -> DecoderConfig:
        """Read a transformers `PretrainedConfig`; other architectures raise ValueError."""
        model_type = getattr(config, "model_type", type(config).__name__)
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"architecture {model_type!r} is not supported; supported: "
                f"{', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {config.hidden_act!r} is not supported; expected 'silu'")
        if getattr(config, "use_sliding_window", False) or (
            model_type == "mistral" and getattr(config, "sliding_window", None)
        ):
            raise ValueError(
                f"{model_type} with sliding-window attention is not supported (sliding_window="
                f"{config.sliding_window}); set it to null for sequences shorter than the window"
            )
        num_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        return cls(
            model_type=model_type,
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            rms_norm_eps=config.rms_norm_eps,
            qk_norm=model_type == "qwen3",
            attention_bias=model_type == "qwen2" or bool(getattr(config, "attention_bias", False)),
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        )


class Attention(nn.Module):
    """Causal grouped-query attention (plain ops or SDPA, see attention.py)."""

    def __init__(self, cfg: DecoderConfig, linears: dict[str, nn.Module], norms: dict) -> None:
        super().__init__()
        self.q_proj, self.k_proj = linears["q_proj"], linears["k_proj"]
        self.v_proj, self.o_proj = linears["v_proj"], linears["o_proj"]
        self.q_norm, self.k_norm = norms.get("q_norm"), norms.get("k_norm")
        self.num_kv_heads = cfg.num_kv_heads
        self.group = cfg.num_heads // cfg.num_kv_heads
        self.head_dim = cfg.head_dim

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, kernels: Kernels = PLAIN) -> Tensor:
        """x [B, T, D], cos/sin [B, T, d] -> [B, T, D]. mask: `attention_allowed` [B, 1, 1, T, T]
        bool for plain attention; for SDPA `sdpa_bias` [B, 1, T, T], or None (causal only)."""
        d = self.head_dim
        q = rearrange(self.q_proj(x), "b t (h d) -> b h t d", d=d)
        k = rearrange(self.k_proj(x), "b t (h d) -> b h t d", d=d)
        v = rearrange(self.v_proj(x), "b t (h d) -> b h t d", d=d)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kernels.attention == "plain":
            out = plain_attention(q, k, v, mask)
        else:
            out = sdpa_attention(q, k, v, mask)
        return self.o_proj(rearrange(out, "b h t d -> b t (h d)"))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) · up(x))."""

    def __init__(self, linears: dict[str, nn.Module]) -> None:
        super().__init__()
        self.gate_proj, self.up_proj = linears["gate_proj"], linears["up_proj"]
        self.down_proj = linears["down_proj"]

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, self_attn: Attention, mlp: MLP, input_norm: RMSNorm, post_norm: RMSNorm):
        super().__init__()
        self.self_attn, self.mlp = self_attn, mlp
        self.input_layernorm, self.post_attention_layernorm = input_norm, post_norm

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, kernels: Kernels = PLAIN) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kernels)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """Token ids -> final normed hidden states; the output head is a separate buffer.

    Buffers: `embed_tokens` [V, D], `lm_head` [V, D] (the same tensor when tied), `inv_freq`
    [head_dim/2]. Parameters: only the `lora_A`/`lora_B` of the LoRA linears inside `layers`.
    """

    def __init__(
        self,
        cfg: DecoderConfig,
        embed_tokens: Tensor,
        layers: list[Block],
        norm: RMSNorm,
        lm_head: Tensor,
        inv_freq: Tensor,
        attention_scaling: float,
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.register_buffer("embed_tokens", embed_tokens)
        self.layers = nn.ModuleList(layers)
        self.norm = norm
        self.register_buffer("lm_head", lm_head)
        self.register_buffer("inv_freq", inv_freq)
        self.attention_scaling = float(attention_scaling)

    def forward(
        self, input_ids: Tensor, position_ids: Tensor, attention_mask: Tensor, kernels: Kernels = PLAIN
    ) -> Tensor:
        """input_ids, position_ids [B, T] int64, attention_mask [B, T] bool -> hidden [B, T, D].

        With `kernels.checkpoint` each layer keeps only its input for backward and recomputes
        the rest (checkpoint.py), so reverse mode holds [B, T, D] per layer plus one layer's
        activations at a time.
        """
        x = F.embedding(input_ids, self.embed_tokens)
        cos, sin = rotary_cos_sin(position_ids, self.inv_freq, self.attention_scaling, x.dtype)
        if kernels.attention == "plain":
            mask = attention_allowed(attention_mask)
        else:
            mask = None if kernels.causal_only else sdpa_bias(attention_mask, x.dtype)
        for layer in self.layers:
            if kernels.checkpoint:
                x = checkpointed(layer, x, (cos, sin, mask, kernels.layer))
            else:
                x = layer(x, cos, sin, mask, kernels)
        return self.norm(x)
