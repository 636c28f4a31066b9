"""Building blocks of the decoder: frozen linears, LoRA linears, RMSNorm, rotary embedding.

Frozen tensors are registered buffers; the LoRA factors are the only `nn.Parameter`s, so
`torch.func.functional_call(decoder, lora)` replaces exactly the differentiable state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class DenseLinear(nn.Module):
    """Frozen y = x Wᵀ + b with W [out, in] and b [out] held as buffers."""

    def __init__(self, weight: Tensor, bias: Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)

    def dequantized_weight(self) -> Tensor:
        """The weight [out, in] in compute dtype (here it is stored that way)."""
        return self.weight

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


class LoRALinear(nn.Module):
    """y = base(x) + s · (x Aᵀ) Bᵀ, with A [r, in] and B [out, r] the only parameters.

    `s` is PEFT's scaling (lora_alpha / r, or lora_alpha / √r with rsLoRA). Dropout is
    deliberately absent: the probe measures the model, not a noisy copy (and vmap refuses
    randomness). The low-rank path is kept unmerged so reverse mode produces [r, in] and
    [out, r] gradients, never a full [out, in] one.

    Mixed precision as PEFT 0.21's `lora.Linear.forward` (autocast_adapter_dtype): the factors
    may have another dtype than the base (fp32 LoRA on a bf16 base); x is cast to the factors'
    dtype for the low-rank path, the sum is formed in the promoted dtype and cast back to the
    base output's dtype.
    """

    def __init__(self, base: nn.Module, lora_A: Tensor, lora_B: Tensor, scaling: float) -> None:
        super().__init__()
        if lora_A.shape[1] != base.in_features or lora_B.shape[0] != base.out_features:
            raise ValueError(
                f"LoRA factors A {tuple(lora_A.shape)}, B {tuple(lora_B.shape)} do not fit a "
                f"linear of shape [out={base.out_features}, in={base.in_features}]"
            )
        if lora_A.shape[0] != lora_B.shape[1]:
            raise ValueError(f"LoRA ranks differ: A has {lora_A.shape[0]}, B has {lora_B.shape[1]}")
        self.base = base
        self.lora_A = nn.Parameter(lora_A)
        self.lora_B = nn.Parameter(lora_B)
        self.scaling = float(scaling)
        self.in_features, self.out_features = base.in_features, base.out_features

    def forward(self, x: Tensor) -> Tensor:
        """x [..., in] -> [..., out] in the base's output dtype."""
        result = self.base(x)
        low_rank = F.linear(F.linear(x.to(self.lora_A.dtype), self.lora_A), self.lora_B)
        return (result + low_rank * self.scaling).to(result.dtype)


class RMSNorm(nn.Module):
    """y = w · x / sqrt(mean(x²) + eps), normalised in at least fp32 (as transformers does)."""

    def __init__(self, weight: Tensor, eps: float) -> None:
        super().__init__()
        self.register_buffer("weight", weight)
        self.eps = float(eps)

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        x = x.to(torch.promote_types(dtype, torch.float32))
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotary_cos_sin(
    position_ids: Tensor, inv_freq: Tensor, attention_scaling: float, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """cos, sin [B, T, head_dim] for positions [B, T] and inverse frequencies [head_dim/2].

    Angles are formed in at least fp32, as transformers does, then cast to the compute dtype.
    """
    angle_dtype = torch.promote_types(dtype, torch.float32)
    freqs = position_ids[..., None].to(angle_dtype) * inv_freq.to(angle_dtype)  # [B, T, d/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [B, T, d]
    return (emb.cos() * attention_scaling).to(dtype), (emb.sin() * attention_scaling).to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    """[x1, x2] -> [-x2, x1] on the last dim (the rotate-half RoPE convention of Llama/Qwen)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [B, H, T, d] by cos/sin [B, T, d]."""
    cos, sin = cos[:, None], sin[:, None]  # [B, 1, T, d]
    return x * cos + rotate_half(x) * sin
