"""Batch: layout, masks from lengths, slicing / split, validation messages."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from functional_probe.batch import Batch, make_batch

PAD = 0


def _example():
    """3 prompts x 2 responses with ragged lengths; responses contain the pad id 0."""
    prompts = [[5, 6, 7], [8], [9, 10]]
    responses = [
        [[11, 0, 12], [0]],  # pad id inside and as the whole response
        [[13, 14, 15, 16, 0], [17, 18]],  # pad id as the last response token
        [[19], [0, 0, 20, 0]],
    ]
    return prompts, responses


def _check_layout(batch: Batch, prompts, responses, pad: int) -> None:
    """Every invariant of the layout, checked element by element against the inputs."""
    n_prompts, group, seq_len = batch.input_ids.shape
    assert n_prompts == len(prompts) == len(batch) == batch.num_prompts
    assert group == batch.group_size == len(responses[0])
    assert seq_len == batch.seq_len
    p_end = max(len(p) for p in prompts)
    assert batch.prompt_end == p_end
    assert seq_len == p_end + max(len(r) for rs in responses for r in rs)
    assert batch.input_ids.dtype == torch.int64
    assert batch.position_ids.dtype == torch.int64
    assert batch.attention_mask.dtype == torch.bool
    assert batch.response_mask.dtype == torch.bool
    assert batch.max_lengths.dtype == torch.float32
    assert batch.advantages.dtype == torch.float32
    for n in range(n_prompts):
        prompt = prompts[n]
        assert int(batch.prompt_lengths[n]) == len(prompt)
        left = p_end - len(prompt)
        for g in range(group):
            resp = responses[n][g]
            assert int(batch.response_lengths[n, g]) == len(resp)
            ids = batch.input_ids[n, g].tolist()
            att = batch.attention_mask[n, g].tolist()
            rm = batch.response_mask[n, g].tolist()
            pos = batch.position_ids[n, g].tolist()
            end = p_end + len(resp)
            assert ids[:left] == [pad] * left
            assert ids[left:p_end] == list(prompt)
            assert ids[p_end:end] == list(resp)
            assert ids[end:] == [pad] * (seq_len - end)
            assert att == [False] * left + [True] * (end - left) + [False] * (seq_len - end)
            assert rm == [False] * p_end + [True] * len(resp) + [False] * (seq_len - end)
            assert pos == [0] * left + list(range(end - left)) + [0] * (seq_len - end)


def test_layout_and_masks_from_lengths_with_pad_ids_inside_responses():
    prompts, responses = _example()
    batch = make_batch(prompts, responses, pad_token_id=PAD)
    _check_layout(batch, prompts, responses, PAD)
    # explicit numbers for one row: prompt [8] (left pad 2), response [13, 14, 15, 16, 0]
    assert batch.prompt_end == 3
    assert batch.seq_len == 8
    assert batch.input_ids[1, 0].tolist() == [0, 0, 8, 13, 14, 15, 16, 0]
    assert batch.attention_mask[1, 0].tolist() == [0, 0, 1, 1, 1, 1, 1, 1]
    assert batch.response_mask[1, 0].tolist() == [0, 0, 0, 1, 1, 1, 1, 1]
    assert batch.position_ids[1, 0].tolist() == [0, 0, 0, 1, 2, 3, 4, 5]
    # a response consisting only of the pad id still has length 1 and one target
    assert batch.response_lengths.tolist() == [[3, 1], [5, 2], [1, 4]]
    assert batch.response_mask[0, 1].tolist() == [0, 0, 0, 1, 0, 0, 0, 0]
    assert batch.response_mask.sum().item() == 3 + 1 + 5 + 2 + 1 + 4
    assert batch.max_lengths.tolist() == [3.0, 5.0, 4.0]
    assert batch.advantages.tolist() == [[0.0, 0.0]] * 3


def test_nonzero_pad_id_equal_to_eos_in_response():
    prompts = [[1, 2], [3]]
    responses = [[[4, 2], [2]], [[5, 6, 2], [2, 2]]]  # 2 plays EOS and pad
    batch = make_batch(prompts, responses, pad_token_id=2)
    _check_layout(batch, prompts, responses, 2)
    assert batch.response_lengths.tolist() == [[2, 1], [3, 2]]


def test_inputs_as_tensors_arrays_and_numpy_ints():
    prompts = [torch.tensor([5, 6]), np.array([7], dtype=np.int32)]
    responses = [torch.tensor([[1, 2], [3, 4]]), [np.array([5]), [np.int64(6), 7]]]
    batch = make_batch(
        prompts,
        responses,
        advantages=np.array([[1.0, -1.0], [0.5, 2]]),
        max_lengths=torch.tensor([4, 3]),
    )
    _check_layout(batch, [[5, 6], [7]], [[[1, 2], [3, 4]], [[5], [6, 7]]], PAD)
    assert batch.advantages.tolist() == [[1.0, -1.0], [0.5, 2.0]]
    assert batch.max_lengths.tolist() == [4.0, 3.0]


def test_advantages_and_max_lengths_given():
    prompts, responses = _example()
    adv = [[1.0, -1.0], [0.25, 0.0], [-2, 3]]
    batch = make_batch(prompts, responses, advantages=adv, max_lengths=[3, 7, 4])
    assert batch.advantages.tolist() == [[1.0, -1.0], [0.25, 0.0], [-2.0, 3.0]]
    assert batch.max_lengths.tolist() == [3.0, 7.0, 4.0]
    batch_t = make_batch(prompts, responses, advantages=torch.tensor(adv, dtype=torch.float64))
    assert torch.equal(batch_t.advantages, batch.advantages)


def _content(batch: Batch, n: int, g: int):
    """(prompt tokens, response tokens) of row (n, g), read through the masks."""
    ids = batch.input_ids[n, g]
    prompt = ids[batch.attention_mask[n, g] & ~batch.response_mask[n, g]].tolist()
    resp = ids[batch.response_mask[n, g]].tolist()
    return prompt, resp


@pytest.mark.parametrize(
    "idx, rows",
    [
        (1, [1]),
        (-1, [2]),
        (slice(0, 2), [0, 1]),
        (slice(1, None), [1, 2]),
        ([2, 0], [2, 0]),
        (torch.tensor([1]), [1]),
        (torch.tensor([True, False, True]), [0, 2]),
    ],
)
def test_getitem_equals_batch_of_selected_prompts_trimmed(idx, rows):
    prompts, responses = _example()
    adv = [[1.0, -1.0], [0.25, 0.0], [-2.0, 3.0]]
    whole = make_batch(prompts, responses, advantages=adv, max_lengths=[3, 7, 4])
    sub = whole[idx]
    ref = make_batch(
        [prompts[i] for i in rows],
        [responses[i] for i in rows],
        advantages=[adv[i] for i in rows],
        max_lengths=[[3, 7, 4][i] for i in rows],
    )
    for name in (
        "input_ids",
        "attention_mask",
        "response_mask",
        "position_ids",
        "response_lengths",
        "prompt_lengths",
        "max_lengths",
        "advantages",
    ):
        assert torch.equal(getattr(sub, name), getattr(ref, name)), name
    assert sub.pad_token_id == whole.pad_token_id
    _check_layout(sub, [prompts[i] for i in rows], [responses[i] for i in rows], PAD)


def test_trimming_removes_leading_and_trailing_pad_columns():
    prompts = [[1, 2, 3, 4], [5]]
    responses = [[[6], [7]], [[8, 9, 10, 11, 12], [13]]]
    whole = make_batch(prompts, responses)
    assert (whole.prompt_end, whole.seq_len) == (4, 9)
    first, second = whole[0], whole[1]
    assert (first.prompt_end, first.seq_len) == (4, 5)
    assert (second.prompt_end, second.seq_len) == (1, 6)
    assert second.input_ids[0, 0].tolist() == [5, 8, 9, 10, 11, 12]
    assert second.position_ids[0, 1].tolist() == [0, 1, 0, 0, 0, 0]


@pytest.mark.parametrize("size", [1, 2, 3, 5])
def test_split_parts_equal_slices_and_reproduce_content(size):
    prompts, responses = _example()
    whole = make_batch(prompts, responses, advantages=[[1, 2], [3, 4], [5, 6]])
    parts = whole.split(size)
    assert [len(p) for p in parts] == [min(size, 3 - i) for i in range(0, 3, size)]
    seen = []
    for k, part in enumerate(parts):
        ref = whole[k * size : (k + 1) * size]
        assert torch.equal(part.input_ids, ref.input_ids)
        assert torch.equal(part.position_ids, ref.position_ids)
        assert torch.equal(part.response_mask, ref.response_mask)
        for n in range(len(part)):
            seen.append(
                (
                    [_content(part, n, g) for g in range(part.group_size)],
                    part.advantages[n].tolist(),
                    part.max_lengths[n].item(),
                )
            )
    expected = [
        (
            [_content(whole, n, g) for g in range(whole.group_size)],
            whole.advantages[n].tolist(),
            whole.max_lengths[n].item(),
        )
        for n in range(len(whole))
    ]
    assert seen == expected
    assert expected[1][0][0] == ([8], [13, 14, 15, 16, 0])


def test_iteration_and_index_errors():
    prompts, responses = _example()
    batch = make_batch(prompts, responses)
    assert [len(b) for b in batch] == [1, 1, 1]
    with pytest.raises(IndexError, match="prompt index 3 out of range"):
        batch[3]
    with pytest.raises(ValueError, match="selects no prompts"):
        batch[2:2]


@pytest.mark.parametrize("size", [0, -1, 1.5])
def test_split_bad_size(size):
    batch = make_batch(*_example())
    with pytest.raises(ValueError, match="split size must be a positive int"):
        batch.split(size)


def test_to_device_roundtrip():
    batch = make_batch(*_example(), advantages=[[1, 2], [3, 4], [5, 6]])
    moved = batch.to("cpu")
    assert isinstance(moved, Batch)
    assert moved.pad_token_id == batch.pad_token_id
    assert moved.input_ids.device.type == "cpu"
    assert torch.equal(moved.advantages, batch.advantages)
    meta = batch.to("meta")
    assert meta.input_ids.device.type == "meta"
    assert meta.input_ids.shape == batch.input_ids.shape


def test_batch_constructor_checks_shapes():
    batch = make_batch(*_example())
    with pytest.raises(ValueError, match="advantages has shape"):
        Batch(**{**batch.__dict__, "advantages": torch.zeros(3, 3)})


# ------------------------------------------------------------------ property test

_token = st.integers(min_value=0, max_value=50)
_seq = st.lists(_token, min_size=1, max_size=7)


@st.composite
def _ragged(draw):
    n = draw(st.integers(1, 4))
    g = draw(st.integers(1, 3))
    prompts = [draw(_seq) for _ in range(n)]
    responses = [[draw(_seq) for _ in range(g)] for _ in range(n)]
    pad = draw(st.integers(0, 50))
    adv = [[draw(st.floats(-5, 5, allow_nan=False)) for _ in range(g)] for _ in range(n)]
    return prompts, responses, pad, adv


@settings(max_examples=60, deadline=None)
@given(_ragged(), st.data())
def test_property_layout_invariants(case, data):
    prompts, responses, pad, adv = case
    batch = make_batch(prompts, responses, pad_token_id=pad, advantages=adv)
    _check_layout(batch, prompts, responses, pad)
    assert batch.max_lengths.tolist() == [float(max(len(r) for r in rs)) for rs in responses]
    assert batch.advantages.tolist() == torch.tensor(adv, dtype=torch.float32).tolist()
    rows = data.draw(st.lists(st.integers(0, len(prompts) - 1), min_size=1, max_size=len(prompts)))
    sub = batch[rows]
    _check_layout(sub, [prompts[i] for i in rows], [responses[i] for i in rows], pad)
    size = data.draw(st.integers(1, len(prompts) + 1))
    parts = batch.split(size)
    flat = [(part, n) for part in parts for n in range(len(part))]
    assert len(flat) == len(prompts)
    for k, (part, n) in enumerate(flat):
        for g in range(batch.group_size):
            assert _content(part, n, g) == (prompts[k], responses[k][g])


# ------------------------------------------------------------------ validation

P2 = [[1, 2], [3]]
R2 = [[[4], [5, 6]], [[7], [8]]]


@pytest.mark.parametrize(
    "prompts, responses, kwargs, pattern",
    [
        ([], [], {}, r"at least one prompt, got 0"),
        (P2, R2[:1], {}, r"2 prompts but 1 response groups"),
        (
            [[1]] * 4,
            [[[1]] * 4, [[1]] * 4, [[1]] * 4, [[1]] * 2],
            {},
            r"prompt 3 has 2 responses, expected 4 like prompt 0",
        ),
        (P2, [[[4], [5]], []], {}, r"prompt 1 has 0 responses, expected at least 1"),
        ([[1, 2], []], R2, {}, r"prompt 1 is empty; expected at least one token"),
        (P2, [[[4], [5]], [[7], []]], {}, r"prompt 1, response 1 is empty"),
        (P2, [[[4], [5, 3.0]], [[7], [8]]], {}, r"prompt 0, response 1, token 1: .*int.*3\.0"),
        (P2, [[[4], [5]], [[True], [8]]], {}, r"prompt 1, response 0, token 0: .*int.*True"),
        ([[1, "a"], [3]], R2, {}, r"prompt 0, token 1: expected an int token id, got 'a'"),
        (P2, [[[4], [5]], [[7], [None]]], {}, r"prompt 1, response 1, token 0: .*None"),
        ([[1, 2], [2.5]], R2, {}, r"prompt 1, token 0: expected an int token id, got 2\.5"),
        (P2, [[[4], [5, -1]], [[7], [8]]], {}, r"prompt 0, response 1, token 1: .*-1.*negative"),
        ([[1, -3], [3]], R2, {}, r"prompt 0, token 1: token id -3 is negative"),
        (
            P2,
            [[[4], torch.tensor([1.0, 2.0])], [[7], [8]]],
            {},
            r"prompt 0, response 1, token 0: expected an int token id, got 1\.0",
        ),
        ("ab", R2, {}, r"prompts must be a sequence, got str"),
        ([5, 6], R2, {}, r"prompt 0 must be a sequence"),
        (P2, R2, {"pad_token_id": -1}, r"pad_token_id must be a non-negative int, got -1"),
        (P2, R2, {"pad_token_id": 1.0}, r"pad_token_id must be a non-negative int, got 1\.0"),
        (
            P2,
            R2,
            {"advantages": [[1.0, 2.0]]},
            r"advantages has 1 rows, expected \[N, G\] = \[2, 2\]",
        ),
        (
            P2,
            R2,
            {"advantages": [[1.0, 2.0], [3.0]]},
            r"advantages\[1\] has 1 entries, expected 2 \(one per response of prompt 1\)",
        ),
        (
            P2,
            R2,
            {"advantages": np.zeros((2, 3))},
            r"advantages has shape \(2, 3\), expected \[N, G\] = \[2, 2\]",
        ),
        (
            P2,
            R2,
            {"advantages": torch.zeros(4)},
            r"advantages has shape \(4,\), expected \[N, G\] = \[2, 2\]",
        ),
        (
            P2,
            R2,
            {"advantages": [[1.0, 2.0], [3.0, float("nan")]]},
            r"advantages\[1\]\[1\] \(prompt 1, response 1\) is nan; expected a finite",
        ),
        (
            P2,
            R2,
            {"advantages": torch.tensor([[1.0, float("-inf")], [3.0, 4.0]])},
            r"advantages\[0\]\[1\] \(prompt 0, response 1\) is -inf",
        ),
        (
            P2,
            R2,
            {"advantages": [[1e300, 0.0], [0.0, 0.0]]},
            r"advantages\[0\]\[0\] .* overflows float32",
        ),
        (P2, R2, {"advantages": [["x", 1], [0, 0]]}, r"advantages must be real numbers"),
        (P2, R2, {"max_lengths": [3]}, r"max_lengths has 1 entries, expected 2"),
        (P2, R2, {"max_lengths": [3, 0]}, r"max_lengths\[1\] \(prompt 1\) is 0; expected > 0"),
        (P2, R2, {"max_lengths": [-2, 3]}, r"max_lengths\[0\] \(prompt 0\) is -2; expected > 0"),
        (
            P2,
            R2,
            {"max_lengths": [1, 3]},
            r"max_lengths\[0\] \(prompt 0\) is 1, shorter than response 1 of prompt 0 "
            r"\(2 tokens\); expected max_lengths\[0\] >= 2",
        ),
        (
            P2,
            R2,
            {"max_lengths": [2, 3.0]},
            r"max_lengths\[1\] \(prompt 1\) must be an int number of tokens, got 3\.0",
        ),
    ],
)
def test_bad_input_raises_naming_the_index(prompts, responses, kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        make_batch(prompts, responses, **kwargs)


def test_batch_records_whether_advantages_were_given():
    prompts, responses = [[1, 2], [3]], [[[4], [5, 6]], [[7], [8]]]
    assert make_batch(prompts, responses, advantages=[[1.0, -1.0], [0.5, -0.5]]).has_advantages
    without = make_batch(prompts, responses)
    assert not without.has_advantages
    assert not without[1:].has_advantages and not without.split(1)[0].has_advantages
    assert not without.to("cpu").has_advantages


def test_update_batch_without_advantages_is_refused_not_zero(tiny_fp32):
    """make_batch(..., advantages=None) used for the Y loss would give μY = 0 and δH₁ = 0 ± 0."""
    import functional_probe as fp

    prompts, responses = [[1, 2], [3, 4, 5]], [[[4, 9], [5, 6]], [[7], [8, 2]]]
    E, U = make_batch(prompts, responses), make_batch(prompts, responses)
    S = fp.sequence_logprobs(tiny_fp32, tiny_fp32.lora, U)
    assert float(fp.x_losses(S, E).abs().max()) > 0  # the X loss needs no advantages
    with pytest.raises(ValueError, match="y_losses: the batch has no advantages"):
        fp.y_losses(S, U)
    with pytest.raises(ValueError, match=r"the Y loss \(loss='y'\): the batch has no advantages"):
        fp.mean_grad(tiny_fp32, tiny_fp32.lora, U, loss="y")
    with pytest.raises(ValueError, match="probe: the update batch U: the batch has no advantages"):
        fp.probe(tiny_fp32, tiny_fp32.lora, E, U, preconditioner=lambda g: g, eta=1e-3)

