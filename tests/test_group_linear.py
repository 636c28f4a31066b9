"""GroupLinear against the decoder's own modules (LoRALinear / DenseLinear, one per projection):
merged or low-rank, fp32, bf16 (kept low-rank by default) and NF4, biases on some projections."""

import pytest
import torch
from helpers import rel_err

import functional_probe as fp
from functional_probe.model.group_linear import GROUPS, layer_groups


def per_projection(model, index, x):
    """Each group's projections one module at a time (the plain forward's path), concatenated."""
    block = model.decoder.layers[index]
    return {
        name: torch.cat([getattr(getattr(block, parent), p)(x[name]) for p in projections], dim=-1)
        for name, (parent, projections) in GROUPS.items()
    }


def inputs(model, seed=0):
    cfg, gen = model.decoder.cfg, torch.Generator().manual_seed(seed)
    width = {"qkv": cfg.hidden_size, "o": cfg.num_heads * cfg.head_dim, "gate_up": cfg.hidden_size,
             "down": cfg.intermediate_size}  # fmt: skip
    return {k: torch.randn(3, 5, w, generator=gen).to(model.dtype) for k, w in width.items()}


@pytest.mark.parametrize("merge", [None, True, False], ids=["auto", "merged", "low-rank"])
@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_group_linear_equals_the_projections_one_by_one(quantize, merge):
    model = fp.tiny_model(quantize=quantize)
    x = inputs(model)
    with torch.no_grad():
        groups = layer_groups(model, 1, model.lora, merge)
        ref = per_projection(model, 1, x)
    assert any(g.bias is not None for g in groups.values())  # Qwen2: q/k/v biases, none on o
    for name, group in groups.items():
        assert group.merged == (merge is not False)
        assert rel_err(group(x[name]), ref[name]) <= 1e-6


def test_bf16_keeps_lora_low_rank_unless_forced():
    model = fp.tiny_model(quantize=None, dtype=torch.bfloat16)
    with torch.no_grad():
        auto, forced = layer_groups(model, 0, model.lora), layer_groups(model, 0, model.lora, merge=True)
        x = inputs(model)
        ref = per_projection(model, 0, x)
    assert not auto["qkv"].merged and forced["qkv"].merged
    assert torch.equal(auto["qkv"].weight, torch.cat([model.decoder.layers[0].self_attn.q_proj.base.weight,
                                                      model.decoder.layers[0].self_attn.k_proj.base.weight,
                                                      model.decoder.layers[0].self_attn.v_proj.base.weight]))  # fmt: skip
    assert rel_err(auto["qkv"](x["qkv"]), ref["qkv"]) <= 1e-6  # the module's own arithmetic, to rounding


def test_lora_terms_name_their_columns_and_keys():
    model = fp.tiny_model(quantize=None)
    groups = layer_groups(model, 0, model.lora)
    qkv = groups["qkv"]
    assert qkv.bounds[-1] == qkv.weight.shape[0] and len(qkv.loras) == 3
    for term, proj in zip(qkv.loras, ("q_proj", "k_proj", "v_proj"), strict=True):
        assert proj in term.keys[0] and term.keys[0].endswith("lora_A.default.weight")
        assert term.b.shape[0] == term.columns.stop - term.columns.start
