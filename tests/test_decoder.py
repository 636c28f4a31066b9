"""DecoderConfig reading and the attention mask of the pure decoder."""

import pytest
import torch
from transformers import GPT2Config, MistralConfig, Qwen2Config

from functional_probe.model.decoder import DecoderConfig, attention_allowed


def test_qwen2_config_has_qkv_bias_and_gqa():
    cfg = DecoderConfig.from_hf(Qwen2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2))
    assert cfg.attention_bias and not cfg.qk_norm
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (4, 2, 16)


def test_unsupported_architecture_names_the_supported_ones():
    with pytest.raises(ValueError, match="'gpt2' is not supported; supported: llama, mistral, qwen2, qwen3"):
        DecoderConfig.from_hf(GPT2Config())


def test_sliding_window_attention_is_refused():
    with pytest.raises(ValueError, match="sliding-window"):
        DecoderConfig.from_hf(MistralConfig(sliding_window=4096))


def test_attention_mask_is_causal_and_hides_pad_keys():
    mask = torch.tensor([[False, True, True], [True, True, True]])
    allowed = attention_allowed(mask)[:, 0, 0]
    expected0 = torch.tensor([[False, False, False], [False, True, False], [False, True, True]])
    assert torch.equal(allowed[0], expected0)
    assert torch.equal(allowed[1], torch.ones(3, 3, dtype=torch.bool).tril())


