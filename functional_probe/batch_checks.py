"""The checks behind :func:`functional_probe.batch.make_batch` and :meth:`Batch.check_vocab`.

What knows the N x G structure of a batch lives here; the checks of one token sequence, of
advantages and of Lmax (shared with rollout files) live in :mod:`functional_probe.validation`.
Each raises ``ValueError`` naming prompt ``n`` / response ``g`` and what was expected.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from .validation import INT64_MAX, as_list, check_tokens, is_int

if TYPE_CHECKING:
    from .batch import Batch

__all__ = ["check_batch_vocab", "check_groups", "check_pad_token_id"]


def check_pad_token_id(pad_token_id: Any) -> int:
    """``pad_token_id`` as an int in [0, 2**63), else ValueError."""
    if not is_int(pad_token_id) or pad_token_id < 0 or pad_token_id > INT64_MAX:
        raise ValueError(f"pad_token_id must be a non-negative int, got {pad_token_id!r}")
    return int(pad_token_id)


def check_groups(prompts: Sequence[Any], responses: Sequence[Any]) -> tuple[list[list[int]], list[list[list[int]]]]:
    """N prompts and N groups of G responses, each a valid token sequence, G equal for all prompts.

    Returns ``(prompt_tokens [N][len], response_tokens [N][G][len])`` as Python ints.
    """
    prompt_list = as_list(prompts, "prompts")
    group_list = as_list(responses, "responses")
    if len(prompt_list) == 0:
        raise ValueError("make_batch needs at least one prompt, got 0 (N == 0)")
    if len(group_list) != len(prompt_list):
        raise ValueError(
            f"got {len(prompt_list)} prompts but {len(group_list)} response groups; "
            "expected one group of responses per prompt"
        )
    prompt_toks = [check_tokens(p, f"prompt {n}") for n, p in enumerate(prompt_list)]
    resp_toks: list[list[list[int]]] = []
    group = -1
    for n, grp in enumerate(group_list):
        if isinstance(grp, Tensor | np.ndarray) and grp.ndim != 2:
            raise ValueError(
                f"responses of prompt {n} must be G token sequences, got an array of shape {tuple(grp.shape)}"
            )
        rs = as_list(grp, f"responses of prompt {n}")
        if len(rs) == 0:
            raise ValueError(f"prompt {n} has 0 responses, expected at least 1")
        if group < 0:
            group = len(rs)
        elif len(rs) != group:
            raise ValueError(f"prompt {n} has {len(rs)} responses, expected {group} like prompt 0")
        resp_toks.append([check_tokens(r, f"prompt {n}, response {g}") for g, r in enumerate(rs)])
    return prompt_toks, resp_toks


def check_batch_vocab(batch: Batch, vocab_size: Any) -> None:
    """Every real (non-pad) token id of ``batch`` in ``[0, vocab_size)``; pads may hold anything.

    The error names the first offending prompt ``n`` (and response ``g`` and the position within
    the response, or the position within the prompt) and the allowed range.
    """
    if not is_int(vocab_size) or vocab_size <= 0:
        raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
    bad = batch.attention_mask & ((batch.input_ids < 0) | (batch.input_ids >= vocab_size))
    if not bool(bad.any()):
        return
    n, g, col = (int(v) for v in torch.nonzero(bad)[0])
    token = int(batch.input_ids[n, g, col])
    p = batch.prompt_end
    if col < p:
        where = f"prompt {n}: prompt token {col - (p - int(batch.prompt_lengths[n]))}"
    else:
        where = f"prompt {n}, response {g}: response token {col - p}"
    raise ValueError(f"{where} has id {token}, outside the vocabulary [0, {int(vocab_size)})")
