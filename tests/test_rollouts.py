"""rollouts.py: JSONL round trip, reward centring, line-numbered errors, text via a tokenizer."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch

from functional_probe.rollouts import Rollouts, read_rollouts, write_rollouts


def write_lines(path: Path, lines: list[str | dict]) -> Path:
    path.write_text("".join((ln if isinstance(ln, str) else json.dumps(ln)) + "\n"
                            for ln in lines), encoding="utf-8")
    return path


GOOD = {"prompt": [5, 6, 7], "responses": [[1, 2], [3]], "advantages": [0.5, -0.5]}


def example() -> Rollouts:
    return Rollouts(
        prompts=[[5, 6, 7], [8]],
        responses=[[[1, 2], [3]], [[4, 4, 4], [9, 10]]],
        advantages=[[0.1, -1.0 / 3.0], [2.5e-17, -7.0]],
        max_lengths=[4, 3],
    )


def test_round_trip(tmp_path: Path) -> None:
    r = example()
    path = tmp_path / "r.jsonl"
    write_rollouts(path, r)
    lines = path.read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(ln)["prompt"] for ln in lines)
    assert read_rollouts(path) == r  # floats exact (repr precision)
    r2 = Rollouts(r.prompts, r.responses, r.advantages, None)
    write_rollouts(path, r2)
    assert "max_length" not in path.read_text()
    assert read_rollouts(path) == r2
    assert not (tmp_path / "r.jsonl.tmp").exists()


def test_rewards_are_centred_not_scaled(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "r.jsonl", [
        {"prompt": [1], "responses": [[2], [3], [4]], "rewards": [1.0, 0.0, 0.5]},
        {"prompt": [1], "responses": [[2], [3], [4]], "rewards": [3, 3, 3]},
        {"prompt": [1], "responses": [[2], [3], [4]], "advantages": [1.0, 0.0, 0.5]},
    ])
    r = read_rollouts(path)
    mean = (1.0 + 0.0 + 0.5) / 3
    assert r.advantages[0] == pytest.approx([1.0 - mean, 0.0 - mean, 0.5 - mean], abs=1e-15)
    assert math.fsum(r.advantages[0]) == pytest.approx(0.0, abs=1e-15)
    assert r.advantages[1] == [0.0, 0.0, 0.0]  # zero-variance group: no division by std
    assert r.advantages[2] == [1.0, 0.0, 0.5]  # advantages are taken as given
    assert r.max_lengths is None and r.group_size == 3 and len(r) == 3
    assert r.rewards is None  # one line gave advantages: no raw rewards for the whole file


def test_raw_rewards_are_kept_when_every_line_gives_them(tmp_path: Path) -> None:
    lines = [{"prompt": [1], "responses": [[2], [3]], "rewards": [1.0, 0.25]},
             {"prompt": [4], "responses": [[5], [6]], "rewards": [3, -1]}]  # fmt: skip
    r = read_rollouts(write_lines(tmp_path / "r.jsonl", lines))
    assert r.rewards == [[1.0, 0.25], [3, -1]] and r.advantages[1] == [2.0, -2.0]
    write_rollouts(tmp_path / "again.jsonl", r)
    again = read_rollouts(tmp_path / "again.jsonl")
    assert again.rewards == r.rewards and again.advantages == r.advantages
    with pytest.raises(ValueError, match="got 1 reward rows for 2 prompts"):
        Rollouts(r.prompts, r.responses, r.advantages, rewards=r.rewards[:1])


def test_blank_lines_and_partial_max_length(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "r.jsonl", [
        "", {**GOOD, "max_length": 10, "id": "extra keys are ignored"}, "   ",
        {**GOOD, "responses": [[1, 2, 3], [3]]}, "",
    ])
    r = read_rollouts(path)
    assert len(r) == 2
    assert r.max_lengths == [10, 3]  # missing -> longest response of that line


BAD_CASES = [
    ('{"prompt": [1], "responses": [[2]], "advantages": [0.0]', "invalid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ({"responses": [[1]], "advantages": [0.0]}, "missing key 'prompt'"),
    ({"prompt": [1], "advantages": [0.0]}, "missing key 'responses'"),
    ({**GOOD, "rewards": [1.0, 0.0]}, "give one of 'advantages' and 'rewards', got both"),
    ({"prompt": [1], "responses": [[2], [3]]}, "line 3 has no advantages/rewards but line 1 has"),
    ({**GOOD, "advantages": [0.5]}, "advantages has 1 values for 2 responses"),
    ('{"prompt": [1], "responses": [[2]], "advantages": [NaN]}', r"advantages\[0\] is not finite"),
    ('{"prompt": [1], "responses": [[2]], "rewards": [Infinity]}', r"rewards\[0\] is not finite"),
    ({**GOOD, "advantages": [0.5, "x"]}, r"advantages\[1\] is 'x', expected a number"),
    ({**GOOD, "advantages": [0.5, True]}, r"advantages\[1\] is True"),
    ({**GOOD, "prompt": []}, "prompt is empty"),
    ({**GOOD, "responses": [[1], []]}, "response 1 is empty"),
    ({**GOOD, "responses": []}, "responses must be a non-empty list"),
    ({**GOOD, "prompt": [1, 2.0]}, r"prompt, token 1: expected an int token id, got 2.0"),
    ({**GOOD, "prompt": [1, -3]}, "prompt, token 1: token id -3 is negative"),
    ({**GOOD, "responses": [[1], [True]]}, "response 1, token 0: expected an int token id, got True"),
    ({**GOOD, "prompt": {"ids": [1]}}, "prompt must be a list of token ids, got dict"),
    ({**GOOD, "prompt": "hello world"}, "line 3 has text .*no tokenizer: write token ids instead, or put the tokenizer .*--model's directory"),
    ({**GOOD, "responses": [[1], "hi"]}, "line 3 has text \\(response 1\\)"),
    ({**GOOD, "max_length": 1}, r"max_length is 1, expected an int >= the longest .*\(2 tokens\)"),
    ({**GOOD, "max_length": 4.0}, "max_length is 4.0"),
]


@pytest.mark.parametrize(("line", "message"), BAD_CASES)
def test_malformed_line_names_path_and_line(tmp_path: Path, line: str | dict,
                                            message: str) -> None:
    path = write_lines(tmp_path / "bad.jsonl", [GOOD, "", line, GOOD])
    with pytest.raises(ValueError, match=message) as info:
        read_rollouts(path)
    assert str(info.value).startswith(f"{path}:3: ")


def test_ragged_group_size_names_both_lines(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "r.jsonl", ["", GOOD, GOOD,
                                              {**GOOD, "responses": [[1]], "advantages": [0]}])
    with pytest.raises(ValueError, match=f"{re.escape(str(path))}:4: line 4 has G = 1 responses but line 2 "
                                         "has G = 2"):
        read_rollouts(path)


def test_missing_and_empty_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(ValueError, match=f"{re.escape(str(missing))}: rollout file not found"):
        read_rollouts(missing)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match=f"{re.escape(str(empty))}: no rollouts"):
        read_rollouts(empty)
    blank = write_lines(tmp_path / "blank.jsonl", ["", "  "])
    with pytest.raises(ValueError, match="no rollouts"):
        read_rollouts(blank)


def test_dataclass_validates() -> None:
    r = example()
    with pytest.raises(ValueError, match="2 prompts, 1 response groups"):
        Rollouts(r.prompts, r.responses[:1], r.advantages)
    with pytest.raises(ValueError, match="prompt 1: has G = 1 responses, prompt 0 has 2"):
        Rollouts(r.prompts, [r.responses[0], [[1]]], [r.advantages[0], [0.0]])
    with pytest.raises(ValueError, match=r"prompt 0: advantages\[1\] is not finite"):
        Rollouts(r.prompts, r.responses, [[0.0, math.inf], [0.0, 0.0]])
    with pytest.raises(ValueError, match="prompt 1: max_length is 2"):
        Rollouts(r.prompts, r.responses, r.advantages, [4, 2])
    with pytest.raises(ValueError, match="prompt 0: response 0 is empty"):
        Rollouts(r.prompts, [[[], [3]], r.responses[1]], r.advantages)


def tiny_tokenizer():
    """Offline word-level tokenizer whose default call would add a [BOS]."""
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[BOS]": 1, "hello": 2, "world": 3, "the": 4, "cat": 5, "sat": 6}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    tok.post_processor = TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="[BOS]")


def test_text_via_tokenizer(tmp_path: Path) -> None:
    tok = tiny_tokenizer()
    assert tok("hello")["input_ids"] == [1, 2]  # the default would add BOS
    path = write_lines(tmp_path / "t.jsonl", [
        {"prompt": "hello world", "responses": ["the cat sat", [7, 8]], "rewards": [1.0, 0.0]},
    ])
    r = read_rollouts(path, tokenizer=tok)
    assert r.prompts == [[2, 3]]
    assert r.responses == [[[4, 5, 6], [7, 8]]]
    assert r.advantages == [[0.5, -0.5]]
    empty = write_lines(tmp_path / "e.jsonl", [{**GOOD, "responses": ["", [1]]}])
    with pytest.raises(ValueError, match=f"{re.escape(str(empty))}:1: response 0 is empty"):
        read_rollouts(empty, tokenizer=tok)


def test_to_batch(tmp_path: Path) -> None:
    batch_mod = pytest.importorskip("functional_probe.batch")
    r = example()
    got = r.to_batch(pad_token_id=0)
    want = batch_mod.make_batch(r.prompts, r.responses, advantages=r.advantages,
                                pad_token_id=0, max_lengths=r.max_lengths)
    assert type(got) is type(want)
    want_adv = torch.tensor(r.advantages, dtype=torch.float32)
    assert got.advantages.shape == (2, 2) and torch.equal(got.advantages.float(), want_adv)
    assert got.max_lengths.tolist() == r.max_lengths
    for name, value in vars(want).items():
        other = getattr(got, name)
        if hasattr(value, "equal"):
            assert value.equal(other), name
        else:
            assert value == other, name


def test_evaluation_file_needs_no_advantages(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "E.jsonl", [{"prompt": [1, 2], "responses": [[3], [4, 5]]},
                                              {"prompt": [6], "responses": [[7, 8], [9]]}])
    r = read_rollouts(path)
    assert not r.has_advantages and r.advantages == [[0.0, 0.0], [0.0, 0.0]]
    assert not r.to_batch().has_advantages
    write_rollouts(tmp_path / "again.jsonl", r)
    assert "advantages" not in (tmp_path / "again.jsonl").read_text()
    assert read_rollouts(tmp_path / "again.jsonl") == r
    with_adv = read_rollouts(write_lines(tmp_path / "U.jsonl", [GOOD]))
    assert with_adv.has_advantages and with_adv.to_batch().has_advantages
