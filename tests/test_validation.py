"""validation.py: the shared input checks, as make_batch, read_rollouts and the probes see them."""

from __future__ import annotations

import json

import pytest

import functional_probe as fp
from functional_probe.validation import check_positive_ints, check_step_size, check_tokens

BAD_TOKENS = [
    ([1, 2.0], r"token 1: expected an int token id, got 2\.0"),
    ([1, -3], "token 1: token id -3 is negative"),
    ([True], "token 0: expected an int token id, got True"),
    ([], "is empty; expected at least one token id"),
]


@pytest.mark.parametrize(("ids", "message"), BAD_TOKENS)
def test_batch_and_rollout_file_give_the_same_token_message(tmp_path, ids, message):
    with pytest.raises(ValueError, match=message):
        check_tokens(ids, "x")
    with pytest.raises(ValueError, match=f"prompt 0, response 1, {message}" if ids else "response 1 is empty"):
        fp.make_batch([[1]], [[[2], ids]])
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"prompt": [1], "responses": [[2], ids]}) + "\n")
    with pytest.raises(ValueError, match=f"{path}:1: response 1, {message}" if ids else "response 1 is empty"):
        fp.read_rollouts(path)


@pytest.mark.parametrize("eta", [0.0, -1e-3, float("nan"), float("inf"), "1e-3", True, None])
def test_step_size_that_is_not_a_positive_number_is_refused(tiny_fp32, eta):
    prompts, responses = [[1, 2], [3, 4, 5]], [[[4, 9], [5, 6]], [[7], [8, 2]]]
    batch = fp.make_batch(prompts, responses, advantages=[[1.0, -1.0], [0.5, -0.5]])
    with pytest.raises(ValueError, match="--lr=.*expected a"):
        check_step_size(eta, "--lr")
    with pytest.raises(ValueError, match="probe: eta=.*expected a"):
        fp.probe(tiny_fp32, tiny_fp32.lora, batch, batch, preconditioner=lambda g: g, eta=eta)
    with pytest.raises(ValueError, match="alpha_variance: eta=.*expected a"):
        fp.alpha_variance(tiny_fp32.lora, batch, model=tiny_fp32, direction=tiny_fp32.lora, eta=eta)


def test_a_positive_step_size_passes_unchanged():
    assert check_step_size(3e-4) == 3e-4 and check_step_size(2) == 2.0


@pytest.mark.parametrize("bad", [0, -3, 2.0, True, None, "4"])
def test_a_size_that_is_not_a_positive_int_is_named(bad):
    with pytest.raises(ValueError, match=rf"^block_k={bad!r}; expected a positive int$"):
        check_positive_ints(block_q=64, block_k=bad)


def test_positive_int_sizes_pass():
    assert check_positive_ints(block_q=1, block_k=2**40) is None
