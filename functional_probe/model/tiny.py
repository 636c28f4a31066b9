"""The embedded default: a small random Qwen2 with a LoRA adapter. No files, no network."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .adapter import LoraSpec, linear_shapes, module_path
from .base_weights import dense_or_nf4
from .decoder import PROJECTIONS, DecoderConfig
from .functional import FunctionalModel
from .loading import adapter_dtype, build_model, resolve_device, resolve_dtype

TINY_RANK = 4
TINY_ALPHA = 8.0


def tiny_config(vocab_size: int = 512, hidden_size: int = 64, num_layers: int = 2):
    """A transformers `Qwen2Config` small enough for CPU tests (GQA: 4 query, 2 kv heads)."""
    from transformers import Qwen2Config

    return Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )


def tiny_state_dict(hf_config, seed: int = 0) -> dict[str, Tensor]:
    """Random fp32 base weights under transformers' names, scaled so that logits are not flat."""
    cfg = DecoderConfig.from_hf(hf_config)
    gen = torch.Generator().manual_seed(seed)

    def normal(*shape: int, std: float) -> Tensor:
        return torch.randn(*shape, generator=gen) * std

    d, v = cfg.hidden_size, cfg.vocab_size
    state = {"model.embed_tokens.weight": normal(v, d, std=1.0)}
    for i in range(cfg.num_layers):
        for proj, (out_f, in_f) in linear_shapes(cfg).items():
            path = module_path(i, proj)
            state[f"{path}.weight"] = normal(out_f, in_f, std=1 / math.sqrt(in_f))
            if cfg.attention_bias and proj in ("q_proj", "k_proj", "v_proj"):
                state[f"{path}.bias"] = normal(out_f, std=0.1)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            state[f"model.layers.{i}.{norm}.weight"] = 1 + normal(d, std=0.1)
    state["model.norm.weight"] = 1 + normal(d, std=0.1)
    state["lm_head.weight"] = normal(v, d, std=2 / math.sqrt(d))
    return state


def tiny_lora(
    hf_config, seed: int = 0, rank: int = TINY_RANK, alpha: float = TINY_ALPHA
) -> LoraSpec:
    """LoRA on all seven projections with BOTH factors non-zero (PEFT's B = 0 would make
    every lora_A gradient exactly zero, and tests would compare zeros)."""
    cfg = DecoderConfig.from_hf(hf_config)
    gen = torch.Generator().manual_seed(seed + 1)
    factors = {}
    for i in range(cfg.num_layers):
        for proj in PROJECTIONS:
            out_f, in_f = linear_shapes(cfg)[proj]
            a = (torch.rand(rank, in_f, generator=gen) * 2 - 1) / math.sqrt(in_f)
            b = (torch.rand(out_f, rank, generator=gen) * 2 - 1) * 0.2
            factors[module_path(i, proj)] = (a, b, alpha / rank)
    return LoraSpec("default", factors)


def tiny_model(
    seed: int = 0,
    quantize: str | None = "nf4",
    *,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device | None = None,
    autocast_adapter_dtype: bool = True,
) -> FunctionalModel:
    """The embedded default model: `tiny_config()` with `tiny_state_dict(seed)` and
    `tiny_lora(seed)`, base linears in NF4 unless `quantize=None`.

    `dtype`, `device` (None: CUDA when available, else CPU) and `autocast_adapter_dtype`
    (fp32 LoRA factors on a bf16/fp16 base) as in `load_model`.
    """
    dtype, device = resolve_dtype(dtype), resolve_device(device)
    hf_config = tiny_config()
    state = tiny_state_dict(hf_config, seed)
    frozen = dense_or_nf4(state.get, quantize, dtype, device)
    return build_model(
        hf_config, state.get, frozen, tiny_lora(hf_config, seed),
        dtype=dtype, lora_dtype=adapter_dtype(dtype, autocast_adapter_dtype), device=device,
    )  # fmt: skip
