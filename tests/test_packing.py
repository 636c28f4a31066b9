"""Packing against a per-row loop, and the packed dual against torch.func.jvp over the plain
forward on every architecture with left- and right-padded rows (pads never computed)."""

import pytest
import torch
from helpers import random_direction, random_rollouts, rel_err
from test_dual import ARCHITECTURES

import functional_probe as fp
from functional_probe.model.packing import Packing, needed


def masks():
    """4 rows x 9 columns, prompt end 4: left pads (row 1), right pads (rows 0, 2), a full row (3)."""
    real = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0, 0], [0, 0, 1, 1, 1, 1, 1, 1, 0],
                         [1, 1, 1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)  # fmt: skip
    response = real.clone()
    response[:, :4] = False
    return real, response


def test_needed_and_packing_equal_a_loop():
    real, response = masks()
    keep, head_rows, rows, cols = needed(real, response, 4)
    positions = (real.long().cumsum(-1) - 1).clamp(min=0)
    packing = Packing.of(keep, positions)
    tokens, slot_pos, predicting = [], {}, []
    for b in range(4):
        last = max(c - 1 for c in range(4, 9) if response[b, c])
        kept = [c for c in range(9) if real[b, c] and c <= last]
        assert keep[b].nonzero()[:, 0].tolist() == kept
        for i, c in enumerate(kept):
            slot_pos[(b, i)] = int(positions[b, c])
        tokens += [(b, c) for c in kept]
        predicting += [(b, c - 1) for c in range(4, 9) if response[b, c]]
    assert packing.count == len(tokens) and packing.shape == (4, max(int(k.sum()) for k in keep))
    assert [tokens[i] for i in head_rows.tolist()] == predicting == list(zip(rows.tolist(), cols.tolist(), strict=True))
    assert all(int(packing.positions[b, i]) == p for (b, i), p in slot_pos.items())
    x = torch.randn(4, 9, 3)
    packed = packing.pack(x)
    assert torch.equal(packed, torch.stack([x[b, c] for b, c in tokens]))
    slots = packing.to_slots(packed[None])[0]
    for b in range(4):
        n = int(keep[b].sum())
        assert torch.equal(slots[b, :n], x[b, keep[b]]) and not slots[b, n:].any()  # empty slots: zeros
    assert torch.equal(packing.from_slots(slots[None])[0], packed)


def test_a_pad_predicting_a_response_token_is_refused():
    real, response = masks()
    real[0, 4] = False
    with pytest.raises(ValueError, match="padding"):
        needed(real, response, 4)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_packed_dual_equals_jvp_over_the_plain_forward(arch):
    model = ARCHITECTURES[arch]()
    prompts, responses, _ = random_rollouts(3, 2, model.vocab_size, seed=7)
    batch = fp.make_batch(prompts, responses)
    assert not batch.attention_mask[..., 0].all() and not batch.attention_mask[..., -1].all()  # both pads
    direction = random_direction(model.lora, seed=8)
    S_of = lambda lo: fp.sequence_logprobs(model, lo, batch)  # noqa: E731
    ref, ref_dot = torch.func.jvp(S_of, (model.lora,), (direction,))
    S, S_dot = fp.sequence_logprobs_and_tangent(model, model.lora, direction, batch)
    assert ref_dot.abs().max() > 1e-3
    assert rel_err(S, ref) <= 1e-5 and rel_err(S_dot, ref_dot) <= 1e-5
