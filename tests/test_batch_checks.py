"""batch_checks: the N x G structure checks of make_batch and the vocabulary check of a Batch.

The messages are held against hand-built inputs whose offending item is known; make_batch's
whole table of bad inputs is in tests/test_batch.py."""

from __future__ import annotations

import pytest
import torch

from functional_probe.batch import make_batch
from functional_probe.batch_checks import check_batch_vocab, check_groups, check_pad_token_id


def test_groups_come_back_as_python_int_lists():
    prompts = [torch.tensor([1, 2]), (3,)]
    responses = [torch.tensor([[4, 5], [6, 7]]), [[8], [9, 10, 11]]]
    p, r = check_groups(prompts, responses)
    assert p == [[1, 2], [3]]
    assert r == [[[4, 5], [6, 7]], [[8], [9, 10, 11]]]
    assert all(type(t) is int for rs in r for seq in rs for t in seq)


@pytest.mark.parametrize(
    "prompts, responses, pattern",
    [
        ([[1], [2]], [[[3], [4]], [[5]]], r"prompt 1 has 1 responses, expected 2 like prompt 0"),
        ([[1]], [torch.tensor([3, 4])], r"responses of prompt 0 must be G token sequences, got an array of shape \(2,\)"),
        ([[1], [2]], [[[3]]], r"2 prompts but 1 response groups"),
        ([[1], [2]], [[[3]], [[4, -1]]], r"prompt 1, response 0, token 1: token id -1 is negative"),
    ],
)
def test_bad_groups_name_the_prompt_and_response(prompts, responses, pattern):
    with pytest.raises(ValueError, match=pattern):
        check_groups(prompts, responses)


@pytest.mark.parametrize("pad", [-1, 1.0, True, 2**63, "0"])
def test_pad_token_id_must_be_a_non_negative_int(pad):
    with pytest.raises(ValueError, match="pad_token_id must be a non-negative int"):
        check_pad_token_id(pad)


def test_vocab_check_ignores_pads_and_matches_the_method():
    batch = make_batch([[1, 2], [3, 4, 5]], [[[6], [7, 8]], [[9], [10, 11, 12]]], pad_token_id=99)
    check_batch_vocab(batch, 13)  # the pad id 99 is never read
    for check in (batch.check_vocab, lambda v: check_batch_vocab(batch, v)):
        with pytest.raises(ValueError, match=r"prompt 1, response 1: response token 2 has id 12"):
            check(12)


def test_vocab_check_names_prompt_or_response_position():
    prompts = [[1, 2], [3, 4, 5]]
    responses = [[[6], [7, 8]], [[9], [10, 11, 12]]]
    batch = make_batch(prompts, responses, pad_token_id=99)  # pad id ≥ vocab is fine
    batch.check_vocab(13)
    with pytest.raises(ValueError, match=r"prompt 1, response 1: response token 2 has id 12"):
        batch.check_vocab(12)
    with pytest.raises(ValueError, match=r"prompt 0: prompt token 1 has id 2, outside .*\[0, 2\)"):
        make_batch([[0, 2], [1, 1]], [[[0]], [[1]]]).check_vocab(2)
    with pytest.raises(ValueError, match=r"prompt 1: prompt token 1 has id 5"):
        make_batch([[0, 0], [1, 5, 1]], [[[0]], [[1]]]).check_vocab(5)
    with pytest.raises(ValueError, match="vocab_size must be a positive int"):
        batch.check_vocab(0)


