"""Decoder building blocks against transformers' and PEFT's own implementations."""

import torch
from helpers import rel_err
from peft import LoraConfig, get_peft_model
from transformers import Qwen2Config
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm, Qwen2RotaryEmbedding, apply_rotary_pos_emb

from functional_probe.model.layers import DenseLinear, LoRALinear, RMSNorm, apply_rotary, rotary_cos_sin
from functional_probe.model.loading import rope_inv_freq

GEN = torch.Generator().manual_seed(0)


def test_rmsnorm_equals_transformers():
    x = torch.randn(2, 5, 32, generator=GEN) * 3
    ref = Qwen2RMSNorm(32, eps=1e-6)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(32, generator=GEN))
    assert rel_err(RMSNorm(ref.weight.detach(), 1e-6)(x), ref(x)) <= 1e-7


def test_rotary_equals_transformers():
    cfg = Qwen2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2)
    pos = torch.tensor([[0, 0, 1, 2, 3], [0, 1, 2, 3, 4]])
    q = torch.randn(2, 4, 5, 16, generator=GEN)
    k = torch.randn(2, 2, 5, 16, generator=GEN)
    cos_ref, sin_ref = Qwen2RotaryEmbedding(cfg)(q, pos)
    q_ref, k_ref = apply_rotary_pos_emb(q, k, cos_ref, sin_ref)
    inv_freq, scaling = rope_inv_freq(cfg)
    cos, sin = rotary_cos_sin(pos, inv_freq, scaling, q.dtype)
    assert rel_err(apply_rotary(q, cos, sin), q_ref) <= 1e-6
    assert rel_err(apply_rotary(k, cos, sin), k_ref) <= 1e-6


def test_lora_linear_equals_peft_lora_layer():
    base = torch.nn.Sequential(torch.nn.Linear(24, 40))
    peft_model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=12, target_modules=["0"], init_lora_weights=False)
    )
    layer = peft_model.base_model.model[0]
    ours = LoRALinear(
        DenseLinear(layer.base_layer.weight.detach(), layer.base_layer.bias.detach()),
        layer.lora_A["default"].weight.detach(),
        layer.lora_B["default"].weight.detach(),
        layer.scaling["default"],
    )
    x = torch.randn(3, 24, generator=GEN)
    assert rel_err(ours(x), layer(x)) <= 1e-6
    assert layer.lora_B["default"].weight.abs().sum() > 0


def test_lora_linear_rejects_factors_that_do_not_fit():
    base = DenseLinear(torch.zeros(8, 6))
    try:
        LoRALinear(base, torch.zeros(2, 5), torch.zeros(8, 2), 1.0)
    except ValueError as err:
        assert "do not fit" in str(err)
    else:
        raise AssertionError("expected ValueError")


def test_lora_linear_on_bf16_base_with_fp32_factors_equals_peft_autocast_adapter_dtype():
    """PEFT 0.21 lora.Linear.forward: x cast to the adapter dtype, sum cast back to the base's."""
    base = torch.nn.Sequential(torch.nn.Linear(24, 40)).to(torch.bfloat16)
    peft_model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=12, target_modules=["0"], init_lora_weights=False)
    )  # autocast_adapter_dtype=True: fp32 factors on the bf16 base
    layer = peft_model.base_model.model[0]
    a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    assert a.dtype == b.dtype == torch.float32 and layer.base_layer.weight.dtype == torch.bfloat16
    ours = LoRALinear(
        DenseLinear(layer.base_layer.weight.detach(), layer.base_layer.bias.detach()),
        a, b, layer.scaling["default"],
    )  # fmt: skip
    x = torch.randn(3, 24, generator=GEN).to(torch.bfloat16)
    y = ours(x)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, layer(x))
    # the low-rank path really is in fp32: rounding the factors to bf16 changes the output
    low = LoRALinear(ours.base, a.bfloat16(), b.bfloat16(), ours.scaling)
    assert not torch.equal(low(x), y)
