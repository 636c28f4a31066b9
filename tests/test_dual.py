"""The dual forward against torch.func.jvp over the pure forward, and against finite differences."""

import math

import pytest
import torch
from helpers import random_direction, rel_err
from transformers import LlamaConfig, MistralConfig, Qwen3Config

import functional_probe as fp
from functional_probe.model.adapter import LoraSpec
from functional_probe.model.base_weights import dense_or_nf4
from functional_probe.model.decoder import PROJECTIONS, DecoderConfig
from functional_probe.model.dual import dual_hidden_states
from functional_probe.model.head_stream import head_logprobs_tangent
from functional_probe.model.loading import build_model
from functional_probe.model.tiny import tiny_lora, tiny_state_dict

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def family_model(config, projections, quantize=None, dtype=torch.float32):
    """A random model of another family; LoRA only on `projections` (others stay frozen)."""
    state = tiny_state_dict(config, seed=3)
    gen = torch.Generator().manual_seed(4)
    if DecoderConfig.from_hf(config).qk_norm:
        for i in range(config.num_hidden_layers):
            for norm in ("q_norm", "k_norm"):
                state[f"model.layers.{i}.self_attn.{norm}.weight"] = 1 + 0.1 * torch.randn(
                    config.head_dim, generator=gen
                )
    full = tiny_lora(config, seed=3)
    lora = LoraSpec("default", {p: f for p, f in full.factors.items() if p.split(".")[-1] in projections})
    frozen = dense_or_nf4(state.get, quantize, dtype, "cpu")
    return build_model(config, state.get, frozen, lora, dtype=dtype)


LLAMA = LlamaConfig(
    vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
    num_key_value_heads=1, tie_word_embeddings=True,
)  # fmt: skip
QWEN3 = Qwen3Config(
    vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=32,
)  # fmt: skip

MISTRAL = MistralConfig(
    vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, sliding_window=None,
)  # fmt: skip

MODELS = {
    "tiny-fp32": lambda dtype: fp.tiny_model(quantize=None, dtype=dtype),
    "tiny-nf4": lambda dtype: fp.tiny_model(quantize="nf4", dtype=dtype),
    "llama-gqa-tied-partial-lora": lambda dtype: family_model(
        LLAMA, ("q_proj", "v_proj", "down_proj"), dtype=dtype
    ),
    "qwen3-qknorm": lambda dtype: family_model(QWEN3, PROJECTIONS, dtype=dtype),
}


def inputs(vocab: int, seed: int = 0):
    """ids [4, 20]; row 1 left-padded (its first queries see no key), row 3 entirely padding."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (4, 20), generator=gen)
    mask = torch.ones(4, 20, dtype=torch.bool)
    mask[1, :7] = False
    mask[3] = False
    return ids, mask


def padded_inputs(vocab: int, t: int = 23, seed: int = 0):
    """ids [4, t]: row 0 full, row 1 left-padded past the first blocks, row 2 right-padded, row 3 both."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (4, t), generator=gen)
    mask = torch.ones(4, t, dtype=torch.bool)
    mask[1, :9] = False
    mask[2, t - 6 :] = False
    mask[3, :4] = mask[3, t - 3 :] = False
    return ids, mask


ARCHITECTURES = {
    "llama": lambda: family_model(LLAMA, PROJECTIONS),
    "mistral": lambda: family_model(MISTRAL, PROJECTIONS),
    "qwen2-bias": lambda: fp.tiny_model(quantize=None),
    "qwen3-qknorm": lambda: family_model(QWEN3, PROJECTIONS),
}


def cast(d, dtype):
    return {k: v.to(dtype) for k, v in d.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("name", list(MODELS))
def test_dual_hidden_states_equal_jvp(name, dtype):
    model = MODELS[name](dtype)
    lora, direction = model.lora, cast(random_direction(model.lora, seed=1), dtype)
    ids, mask = inputs(model.vocab_size)
    h, h_dot = dual_hidden_states(model, lora, direction, ids, mask)
    ref, ref_dot = torch.func.jvp(lambda lo: model.hidden_states(lo, ids, mask), (lora,), (direction,))
    assert h.dtype == h_dot.dtype == dtype and h.shape == h_dot.shape == ref.shape
    assert torch.isfinite(h).all() and torch.isfinite(h_dot).all()
    assert ref_dot.norm() > 1e-2 * ref.norm()  # the tangent is not trivially small
    assert rel_err(h, ref) <= TOL[dtype]
    assert rel_err(h_dot, ref_dot) <= TOL[dtype]
    # every row on its own, the padded ones included
    assert max(rel_err(h_dot[i], ref_dot[i]) for i in range(3)) <= TOL[dtype]


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_bf16_dual_is_as_close_to_float64_as_bf16_jvp(quantize):
    model = fp.tiny_model(quantize=quantize, dtype=torch.bfloat16)
    exact = fp.tiny_model(quantize=quantize, dtype=torch.float64)
    lora, direction = model.lora, random_direction(model.lora, seed=1)  # fp32, as the LoRA
    ids, mask = inputs(model.vocab_size)
    _, h_dot = dual_hidden_states(model, lora, direction, ids, mask)
    _, jvp_dot = torch.func.jvp(lambda lo: model.hidden_states(lo, ids, mask), (lora,), (direction,))
    args = (cast(lora, torch.float64),), (cast(direction, torch.float64),)
    _, ref_dot = torch.func.jvp(lambda lo: exact.hidden_states(lo, ids, mask), *args)
    assert h_dot.dtype == torch.bfloat16 and torch.isfinite(h_dot).all()
    assert rel_err(h_dot, ref_dot) <= 2 * rel_err(jvp_dot, ref_dot) + 1e-3


def test_dual_is_pure_and_gradient_free(tiny_fp32):
    lora, direction = tiny_fp32.lora, random_direction(tiny_fp32.lora, seed=2)
    before = {k: v.clone() for k, v in {**lora, **direction}.items()}
    ids, mask = inputs(tiny_fp32.vocab_size)
    position_ids = (mask.long().cumsum(-1) - 1).clamp(min=0)
    h1, d1 = dual_hidden_states(tiny_fp32, lora, direction, ids, mask)
    h2, d2 = dual_hidden_states(tiny_fp32, lora, direction, ids, mask, position_ids)
    assert torch.equal(h1, h2) and torch.equal(d1, d2)
    assert all(torch.equal(v, before[k]) for k, v in {**lora, **direction}.items())
    assert not h1.requires_grad and not d1.requires_grad
    with pytest.raises(ValueError, match="missing"):
        dual_hidden_states(tiny_fp32, lora, dict(list(direction.items())[1:]), ids, mask)


def test_sequence_logprob_tangent_equals_finite_differences():
    model = fp.tiny_model(quantize=None, dtype=torch.float64)
    lora = model.lora
    direction = cast(random_direction(lora, seed=7), torch.float64)
    direction = {k: v / math.sqrt(v.numel()) for k, v in direction.items()}
    ids, mask = inputs(model.vocab_size, seed=8)
    ids, mask = ids[:3], mask[:3]
    targets = mask.clone()
    targets[:, :12] = False  # response tokens: the last 8 of each row

    def seq_logprob(eps):
        shifted = {k: lora[k] + eps * direction[k] for k in lora}
        logp = model(shifted, ids, mask)[:, :-1].log_softmax(-1)
        logp = logp.gather(-1, ids[:, 1:, None])[..., 0]
        return (logp * targets[:, 1:]).sum(-1)

    eps = 1e-5
    finite = (seq_logprob(eps) - seq_logprob(-eps)) / (2 * eps)
    h, h_dot = dual_hidden_states(model, lora, direction, ids, mask)
    rows = targets[:, 1:]  # the hidden state at t−1 predicts token t
    _, logp_dot = head_logprobs_tangent(
        h[:, :-1][rows], h_dot[:, :-1][rows], model.head_weight, ids[:, 1:][rows], chunk_size=5
    )
    seq = torch.zeros(3, dtype=torch.float64).index_add_(0, rows.nonzero()[:, 0], logp_dot)
    assert finite.abs().min() > 1e-3
    assert rel_err(seq, finite) <= 1e-6
