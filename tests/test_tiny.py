"""The embedded default model."""

import torch

from functional_probe.model import tiny_model
from functional_probe.nf4 import NF4Linear


def test_default_is_nf4_with_both_lora_factors_nonzero():
    model = tiny_model()
    assert any(isinstance(m, NF4Linear) for m in model.modules())
    assert model.hf_config.model_type == "qwen2"
    for name, tensor in model.lora.items():
        assert tensor.norm() > 0.1, name  # PEFT's B = 0 would fail here


def test_same_seed_same_model_other_seed_other_model():
    ids = torch.arange(10)[None]
    a, b, c = (
        tiny_model(seed=0, quantize=None),
        tiny_model(seed=0, quantize=None),
        tiny_model(seed=1, quantize=None),
    )
    assert torch.equal(a(a.lora, ids), b(b.lora, ids))
    assert not torch.allclose(a(a.lora, ids), c(c.lora, ids))
