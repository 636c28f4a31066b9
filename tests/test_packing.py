"""Packing against a per-row loop, and the packed dual against torch.func.jvp over the plain
forward on every architecture with left- and right-padded rows (pads never computed); the
per-row sums of the no-graph paths against exact sums (math.fsum, a float64 model)."""

import math

import pytest
import torch
from helpers import random_direction, random_rollouts, rel_err
from test_dual import ARCHITECTURES, LLAMA, family_model

import functional_probe as fp
from functional_probe.model.packing import Packing, needed, row_sums


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


def test_row_sums_equal_fsum_without_drift():
    """A 4096-token row of log-probs in [-20, 0] (|S| ≈ 4e4) and two short rows, scattered in
    random order: each row's sum within 2e-7 relative of math.fsum (exact). A serial fp32
    accumulation (index_add_, the old S) is off by 1.4e-6 here: its rounding grows with the total."""
    gen = torch.Generator().manual_seed(0)
    lengths = (4096, 3, 17)
    rows = torch.cat([torch.full((n,), r) for r, n in enumerate(lengths)])
    cols = torch.cat([torch.randperm(4100, generator=gen)[:n] for n in lengths])
    order = torch.randperm(rows.numel(), generator=gen)
    rows, cols = rows[order], cols[order]
    values = -20 * torch.rand(rows.numel(), generator=gen)
    got = row_sums(values, rows, cols, (3, 4100))
    for r in range(3):
        exact = math.fsum(values[rows == r].double().tolist())
        assert got.dtype == torch.float32 and abs(got[r].item() - exact) <= 2e-7 * abs(exact)


def test_long_row_S_of_the_no_graph_paths_does_not_drift():
    """T = 2048 (2 rows, |S| ≈ 8.8e4): the dual's and the fast primal's fp32 S equal the float64
    model's to 1e-7 relative (storing S in fp32 alone costs up to 4.4e-8 here; measured 5.5e-8).
    With the old serial index_add_ both were off by 2.3e-7 (5e-7 with LoRA on every projection),
    which the X loss's leave-one-out coefficient amplifies ~300× in s (bench/results/long_exactness.md)."""
    model, model64 = (family_model(LLAMA, ("q_proj", "v_proj"), dtype=d) for d in (torch.float32, torch.float64))
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 300, (1, 4), generator=gen).tolist()
    batch = fp.make_batch(prompt, torch.randint(0, 300, (1, 2, 2048), generator=gen).tolist())
    direction = random_direction(model.lora, seed=8)
    ref = fp.sequence_logprobs(model64, model64.lora, batch)
    S, _ = fp.sequence_logprobs_and_tangent(model, model.lora, direction, batch)
    fast = fp.sequence_logprobs(model, model.lora, batch, derivatives=False)
    assert ref.abs().min() > 5e4
    assert rel_err(S, ref) <= 1e-7 and rel_err(fast, ref) <= 1e-7
