"""Block-causal dual attention (primal and tangent together, online softmax) against torch.func.jvp
over the plain forward, with padding and ragged blocks, and its memory bound."""

from __future__ import annotations

import pytest
import torch
from helpers import LargestOutput, random_direction, rel_err
from test_dual import ARCHITECTURES, inputs, padded_inputs

from functional_probe.model.dual import dual_hidden_states
from functional_probe.model.dual_attention import attention_pair


@pytest.mark.parametrize("blocks", [(5, 3), (4, 7), (8, 64), (64, 2)], ids=lambda b: f"q{b[0]}k{b[1]}")
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_block_causal_dual_equals_jvp_with_padding_and_ragged_blocks(arch, blocks):
    model = ARCHITECTURES[arch]()
    assert model.decoder.cfg.model_type == arch.split("-")[0]
    lora, direction = model.lora, random_direction(model.lora, seed=1)
    ids, mask = padded_inputs(model.vocab_size)
    h, h_dot = dual_hidden_states(model, lora, direction, ids, mask, block_q=blocks[0], block_k=blocks[1])
    ref, ref_dot = torch.func.jvp(lambda lo: model.hidden_states(lo, ids, mask), (lora,), (direction,))
    assert ref_dot.norm() > 1e-2 * ref.norm()
    for i in range(4):  # every row, its pad positions included
        assert rel_err(h[i], ref[i]) <= 1e-5
        assert rel_err(h_dot[i], ref_dot[i]) <= 1e-5


@pytest.mark.parametrize("size", [0, -1, 2.0, True])
def test_block_sizes_must_be_positive_ints(tiny_fp32, size):
    ids, mask = inputs(tiny_fp32.vocab_size)
    with pytest.raises(ValueError, match="block_k"):
        dual_hidden_states(tiny_fp32, tiny_fp32.lora, tiny_fp32.lora, ids, mask, block_k=size)


def test_block_attention_never_allocates_a_full_score_matrix():
    """Scores live one [block_q, block_k] tile per head at a time: no [T, T] tensor per head."""
    b, kh, r, d, t = 1, 2, 2, 8, 256
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, b, kh, t, r, d, generator=gen), torch.randn(2, b * kh, t, d, generator=gen)
    v, mask = torch.randn(b * kh, t, 2 * d, generator=gen), torch.ones(b, t, dtype=torch.bool)
    outs = torch.empty(2, 2, b, t, kh, r, d)
    with LargestOutput() as tiled:
        attention_pair(q, k, v, mask, outs[0], 32, 32)
    with LargestOutput() as whole:
        attention_pair(q, k, v, mask, outs[1], t, t)
    assert whole.largest >= kh * r * t * t  # one block holds the [heads, T, T] scores
    # views of the inputs and outputs count too; nothing of size [heads, T, T] is made
    assert tiled.largest <= max(kh * r * 32 * 32, outs[0].numel()) < kh * r * t * t // 8
    assert rel_err(outs[0], outs[1]) <= 1e-5
