"""JSONL rollout files: read, validate, write.

One prompt per line, as a JSON object::

    {"prompt": [ids] | "text",
     "responses": [[ids] | "text", ...],        # G responses, G the same on every line
     "advantages": [floats],                    # one per response, or instead:
     "rewards": [floats],                       # centred per prompt: A = r − mean_g r
     "max_length": int}                         # optional Lmax for this prompt (Dr. GRPO)

* An evaluation file (E) needs neither ``advantages`` nor ``rewards``: the X loss does not use
  them. Then no line may carry them, ``Rollouts.has_advantages`` is False and the batch it
  gives refuses the Y loss (an update file U must carry them).
* ``rewards`` become advantages as in GRPO, **centred only, not divided by the group's
  standard deviation**: ``A[g] = r[g] − (1/G) Σ_g' r[g']``. Give ``advantages`` for any
  other normalisation.
* Text is tokenized with ``tokenizer(text, add_special_tokens=False)["input_ids"]`` for
  prompts and responses alike, so no BOS/EOS is added and no chat template is applied:
  pass pre-tokenized ids when the prompt needs a chat template or special tokens.
* ``max_length``, where given, must be ``>=`` the longest response of its line (in
  tokens). If only some lines give it, the others get their longest response, which is
  also what :func:`functional_probe.batch.make_batch` uses by default.
* Text needs a tokenizer: on the command line, the one in ``--model``'s directory.
* Blank lines are skipped; keys other than the ones above are ignored.

Every problem raises ``ValueError`` whose message starts with ``path:line_no:``.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .validation import check_tokens, is_int

if TYPE_CHECKING:
    from functional_probe.batch import Batch

__all__ = ["Rollouts", "read_rollouts", "write_rollouts"]

Tokenizer = Callable[..., Any]  # a Hugging Face tokenizer (or anything called the same way)


@dataclass(frozen=True)
class Rollouts:
    """N prompts with G sampled responses each and their advantages.

    Attributes:
        prompts: ``[N]`` token-id lists, each non-empty.
        responses: ``[N][G]`` token-id lists, each non-empty; G is the same for all prompts.
        advantages: ``[N][G]`` finite floats (already centred if they came from rewards);
            zeros when ``has_advantages`` is False.
        max_lengths: ``[N]`` ints ``Lmax[n] >=`` longest response of prompt n, or ``None``
            (then Lmax is the longest response, decided by ``make_batch``).
        has_advantages: False for an evaluation file without advantages or rewards.
        rewards: ``[N][G]`` the raw rewards when every line gave ``rewards`` (else ``None``),
            for losses that normalise them their own way (TRL's ``scale_rewards``).

    Construction validates the structure (ValueError naming ``prompt n`` / ``response g``).
    """

    prompts: list[list[int]]
    responses: list[list[list[int]]]
    advantages: list[list[float]]
    max_lengths: list[int] | None = None
    has_advantages: bool = True
    rewards: list[list[float]] | None = None

    def __post_init__(self) -> None:
        n = len(self.prompts)
        if len(self.responses) != n or len(self.advantages) != n:
            raise ValueError(f"got {n} prompts, {len(self.responses)} response groups and "
                             f"{len(self.advantages)} advantage rows")
        if self.rewards is not None and len(self.rewards) != n:
            raise ValueError(f"got {len(self.rewards)} reward rows for {n} prompts")
        if self.max_lengths is not None and len(self.max_lengths) != n:
            raise ValueError(f"got {len(self.max_lengths)} max_lengths for {n} prompts")
        g0 = len(self.responses[0]) if n else 0
        for i in range(n):
            where = f"prompt {i}: "
            _check_ids(self.prompts[i], "prompt", where)
            group = self.responses[i]
            if len(group) != g0:
                raise ValueError(f"{where}has G = {len(group)} responses, prompt 0 has {g0}")
            _check_group(group, where)
            _check_numbers(self.advantages[i], "advantages", len(group), where)
            if self.rewards is not None:
                _check_numbers(self.rewards[i], "rewards", len(group), where)
            if self.max_lengths is not None:
                _check_max_length(self.max_lengths[i], group, where)

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def group_size(self) -> int:
        """G, responses per prompt (0 if there are no prompts)."""
        return len(self.responses[0]) if self.responses else 0

    def to_batch(self, pad_token_id: int = 0) -> Batch:
        """``functional_probe.batch.make_batch`` of these rollouts, advantages and Lmax included."""
        from functional_probe.batch import make_batch

        advantages = self.advantages if self.has_advantages else None
        return make_batch(self.prompts, self.responses, advantages=advantages,
                          pad_token_id=pad_token_id, max_lengths=self.max_lengths)


# ----------------------------------------------------------------------------- checks


def _check_ids(ids: Any, what: str, where: str) -> list[int]:
    if not isinstance(ids, list | tuple):
        raise ValueError(f"{where}{what} must be a list of token ids, got {type(ids).__name__}")
    return check_tokens(ids, f"{where}{what}")


def _check_group(group: Any, where: str) -> None:
    if not isinstance(group, list | tuple) or not group:
        raise ValueError(f"{where}responses must be a non-empty list")
    for g, r in enumerate(group):
        _check_ids(r, f"response {g}", where)


def _check_numbers(values: Any, key: str, count: int, where: str) -> list[float]:
    if not isinstance(values, list | tuple):
        raise ValueError(f"{where}{key} must be a list of numbers, got {type(values).__name__}")
    if len(values) != count:
        raise ValueError(f"{where}{key} has {len(values)} values for {count} responses")
    out = []
    for g, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise ValueError(f"{where}{key}[{g}] is {v!r}, expected a number")
        if not math.isfinite(v):
            raise ValueError(f"{where}{key}[{g}] is not finite ({v})")
        out.append(float(v))
    return out


def _check_max_length(m: Any, group: list[list[int]], where: str) -> int:
    longest = max(len(r) for r in group)
    if not is_int(m) or m < longest:
        raise ValueError(f"{where}max_length is {m!r}, expected an int >= the longest "
                         f"response ({longest} tokens)")
    return m


# ----------------------------------------------------------------------------- reading


def _tokens(value: Any, what: str, where: str, line_no: int,
            tokenizer: Tokenizer | None) -> list[int]:
    if isinstance(value, str):
        if tokenizer is None:
            raise ValueError(f"{where}line {line_no} has text ({what}) and there is no tokenizer: "
                             "write token ids instead, or put the tokenizer files (tokenizer.json) in "
                             "--model's directory (from Python: read_rollouts(..., tokenizer=...))")
        value = [int(t) for t in tokenizer(value, add_special_tokens=False)["input_ids"]]
    return _check_ids(value, what, where)


def _parse_line(obj: Any, where: str, line_no: int, tokenizer: Tokenizer | None,
                ) -> tuple[list[int], list[list[int]], list[float] | None, int | None, list[float] | None]:
    """One JSON object -> (prompt ids, G response ids, G advantages or None, max_length or None,
    the G raw rewards or None)."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}expected a JSON object, got {type(obj).__name__}")
    for key in ("prompt", "responses"):
        if key not in obj:
            raise ValueError(f"{where}missing key {key!r}")
    has_adv, has_rew = "advantages" in obj, "rewards" in obj
    if has_adv and has_rew:
        raise ValueError(f"{where}give one of 'advantages' and 'rewards', got both")
    prompt = _tokens(obj["prompt"], "prompt", where, line_no, tokenizer)
    raw = obj["responses"]
    if not isinstance(raw, list) or not raw:
        raise ValueError(f"{where}responses must be a non-empty list")
    group = [_tokens(r, f"response {g}", where, line_no, tokenizer) for g, r in enumerate(raw)]
    adv = rewards = None
    if has_adv:
        adv = _check_numbers(obj["advantages"], "advantages", len(group), where)
    elif has_rew:
        rewards = _check_numbers(obj["rewards"], "rewards", len(group), where)
        mean = math.fsum(rewards) / len(rewards)
        adv = [r - mean for r in rewards]
    max_len = obj.get("max_length")
    if max_len is not None:
        _check_max_length(max_len, group, where)
    return prompt, group, adv, max_len, rewards


def read_rollouts(path: str | os.PathLike[str], *, tokenizer: Tokenizer | None = None) -> Rollouts:
    """Read and validate a JSONL rollout file (format in the module docstring).

    Args:
        path: the ``.jsonl`` file (UTF-8).
        tokenizer: a Hugging Face tokenizer, needed only if a line holds text.

    Returns:
        Rollouts with advantages (rewards centred per prompt; none in the whole file gives
        ``has_advantages=False``) and ``max_lengths`` if any line gives ``max_length`` (else ``None``).

    Raises:
        ValueError: ``path:line_no: what was wrong`` for the first bad line; also for a
            missing or empty file and for a line whose G differs from the first line's.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise ValueError(f"{p}: rollout file not found") from e
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{p}: cannot read rollout file: {e}") from e

    prompts: list[list[int]] = []
    responses: list[list[list[int]]] = []
    advantages: list[list[float] | None] = []
    given: list[int | None] = []
    rewards: list[list[float] | None] = []
    first_line = 0
    for line_no, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{p}:{line_no}: "
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}invalid JSON: {e.msg} (column {e.colno})") from e
        prompt, group, adv, max_len, rew = _parse_line(obj, where, line_no, tokenizer)
        if not prompts:
            first_line = line_no
        elif len(group) != len(responses[0]):
            raise ValueError(f"{where}line {line_no} has G = {len(group)} responses but line "
                             f"{first_line} has G = {len(responses[0])}")
        elif (adv is None) != (advantages[0] is None):
            raise ValueError(f"{where}line {line_no} {'has no' if adv is None else 'has'} advantages/rewards "
                             f"but line {first_line} {'has' if adv is None else 'has none'}: give them on "
                             "every line (an update file) or on none (an evaluation file)")  # fmt: skip
        prompts.append(prompt)
        responses.append(group)
        advantages.append(adv)
        given.append(max_len)
        rewards.append(rew)
    if not prompts:
        raise ValueError(f"{p}: no rollouts (the file is empty or has only blank lines)")
    max_lengths = None
    if any(m is not None for m in given):
        max_lengths = [m if m is not None else max(len(r) for r in grp)
                       for m, grp in zip(given, responses, strict=True)]
    if advantages[0] is None:
        zeros = [[0.0] * len(grp) for grp in responses]
        return Rollouts(prompts, responses, zeros, max_lengths, has_advantages=False)
    raw = rewards if all(r is not None for r in rewards) else None
    return Rollouts(prompts, responses, advantages, max_lengths, rewards=raw)


# ----------------------------------------------------------------------------- writing


def write_rollouts(path: str | os.PathLike[str], rollouts: Rollouts) -> None:
    """Write ``rollouts`` as JSONL: ids, advantages — or the raw rewards when the Rollouts keep
    them (read back as the same rewards and their centred advantages) — and ``max_length``,
    one prompt a line.

    Floats are written with ``repr`` precision, so :func:`read_rollouts` gives back exactly
    the same Rollouts (up to the rounding of r − mean when rewards are kept). The file is written next to ``path`` and then renamed over it.
    """
    p = Path(path)
    tmp = p.with_name(p.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for i in range(len(rollouts)):
            obj: dict[str, Any] = {
                "prompt": [int(t) for t in rollouts.prompts[i]],
                "responses": [[int(t) for t in r] for r in rollouts.responses[i]],
            }
            if rollouts.rewards is not None:
                obj["rewards"] = [float(r) for r in rollouts.rewards[i]]
            elif rollouts.has_advantages:
                obj["advantages"] = [float(a) for a in rollouts.advantages[i]]
            if rollouts.max_lengths is not None:
                obj["max_length"] = int(rollouts.max_lengths[i])
            f.write(json.dumps(obj, allow_nan=False) + "\n")
    os.replace(tmp, p)

