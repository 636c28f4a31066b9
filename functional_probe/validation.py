"""Checks of user input shared across the library: token sequences (batches and rollout files
alike), advantages, per-prompt Lmax, the step size η.

Each raises ``ValueError`` naming the offending item (``what``: e.g. ``"prompt 3, response 1"``)
and what was expected. Nothing here knows a model or a batch layout.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "as_list", "check_advantages", "check_max_lengths", "check_positive_ints", "check_step_size", "check_tokens", "is_int",
]  # fmt: skip

INT64_MAX = 2**63 - 1


def is_int(t: Any) -> bool:
    """True for Python / numpy integers, False for bools, floats, strings, None, ..."""
    return isinstance(t, numbers.Integral) and not isinstance(t, bool)


def check_positive_ints(**sizes: Any) -> None:
    """Every keyword a positive Python int (bools and floats are not), else ValueError naming it."""
    for name, size in sizes.items():
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"{name}={size!r}; expected a positive int")


def as_list(x: Any, what: str) -> list:
    """``x`` as a Python list (tensors / arrays via ``tolist``), else ValueError."""
    if isinstance(x, Tensor | np.ndarray):
        if x.ndim == 0:
            raise ValueError(f"{what} must be a sequence, got a 0-d {type(x).__name__}")
        return x.tolist()
    if isinstance(x, str | bytes) or not isinstance(x, Sequence):
        raise ValueError(f"{what} must be a sequence, got {type(x).__name__}")
    return list(x)


def check_tokens(seq: Any, what: str) -> list[int]:
    """One token sequence: non-empty, ints in [0, 2**63) (no bools, no floats such as 3.0).

    ``seq`` may be a list / tuple of ints or a 1-D integer tensor / array. Returns the ids as
    a list of Python ints. The vocabulary bound is the model's to check (``Batch.check_vocab``).
    """
    if isinstance(seq, Tensor | np.ndarray) and seq.ndim != 1:
        raise ValueError(f"{what} must be a 1-D sequence of token ids, got shape {tuple(seq.shape)}")
    toks = as_list(seq, what)
    if len(toks) == 0:
        raise ValueError(f"{what} is empty; expected at least one token id")
    for i, t in enumerate(toks):
        if not is_int(t):
            raise ValueError(f"{what}, token {i}: expected an int token id, got {t!r} ({type(t).__name__})")
        if t < 0:
            raise ValueError(f"{what}, token {i}: token id {int(t)} is negative; expected an id >= 0")
        if t > INT64_MAX:
            raise ValueError(f"{what}, token {i}: token id {int(t)} does not fit in int64")
    return [int(t) for t in toks]


def check_advantages(advantages: Any, n_prompts: int, group: int) -> Tensor:
    """``advantages`` as a finite float32 ``[N, G]`` tensor (nested lists, array or tensor)."""
    expected = f"[N, G] = [{n_prompts}, {group}]"
    if isinstance(advantages, Tensor):
        if advantages.is_complex() or advantages.dtype == torch.bool:
            raise ValueError(f"advantages must be real numbers, got dtype {advantages.dtype}")
        arr = advantages.detach().cpu().to(torch.float64)
    else:
        if not isinstance(advantages, np.ndarray):
            check_rows(as_list(advantages, "advantages"), n_prompts, group, expected)
        try:
            arr = torch.from_numpy(np.asarray(advantages, dtype=np.float64))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"advantages must be real numbers, shape {expected}: {exc}") from exc
    if tuple(arr.shape) != (n_prompts, group):
        raise ValueError(f"advantages has shape {tuple(arr.shape)}, expected {expected}")
    for values, why in ((arr, "is {v}; expected a finite number"),
                        (arr.to(torch.float32), "= {v} overflows float32; expected a finite float32 number")):  # fmt: skip
        bad = ~torch.isfinite(values)
        if bool(bad.any()):
            n, g = (int(v) for v in torch.nonzero(bad)[0])
            raise ValueError(f"advantages[{n}][{g}] (prompt {n}, response {g}) " + why.format(v=float(arr[n, g])))
    return arr.to(torch.float32)


def check_rows(rows: list, n_prompts: int, group: int, expected: str) -> None:
    """Nested-list advantages: one row per prompt, G numbers per row."""
    if len(rows) != n_prompts:
        raise ValueError(f"advantages has {len(rows)} rows, expected {expected} (one per prompt)")
    for n, row in enumerate(rows):
        if isinstance(row, str | bytes) or not hasattr(row, "__len__"):
            raise ValueError(f"advantages[{n}] must be a sequence of {group} numbers, got {type(row).__name__}")
        if len(row) != group:
            raise ValueError(f"advantages[{n}] has {len(row)} entries, expected {group} "
                             f"(one per response of prompt {n})")  # fmt: skip


def check_max_lengths(max_lengths: Any, resp_lens: list[list[int]]) -> Tensor:
    """``max_lengths`` as float32 ``[N]``; each an int >= the longest response of its prompt."""
    n_prompts = len(resp_lens)
    vals = as_list(max_lengths, "max_lengths")
    if len(vals) != n_prompts:
        raise ValueError(f"max_lengths has {len(vals)} entries, expected {n_prompts} (one per prompt)")
    for n, v in enumerate(vals):
        if not is_int(v):
            raise ValueError(f"max_lengths[{n}] (prompt {n}) must be an int number of tokens, "
                             f"got {v!r} ({type(v).__name__})")  # fmt: skip
        if v <= 0:
            raise ValueError(f"max_lengths[{n}] (prompt {n}) is {int(v)}; expected > 0")
        longest = max(resp_lens[n])
        if v < longest:
            g = resp_lens[n].index(longest)
            raise ValueError(f"max_lengths[{n}] (prompt {n}) is {int(v)}, shorter than response {g} of "
                             f"prompt {n} ({longest} tokens); expected max_lengths[{n}] >= {longest}")  # fmt: skip
    return torch.tensor([float(v) for v in vals], dtype=torch.float32)


def check_step_size(eta: Any, what: str = "eta") -> float:
    """η (the lr of the step probed): a finite real number > 0, returned as a float.

    η = 0 makes δH₁ = 0 ± 0 and δH₁/SE undefined; η < 0 probes a step against the gradient
    that no optimizer takes; NaN/inf propagate into every number. All three are refused.
    """
    if isinstance(eta, bool) or not isinstance(eta, numbers.Real):
        raise ValueError(f"{what}={eta!r}: expected a number (the step size, the optimizer's lr)")
    if not math.isfinite(eta) or eta <= 0:
        raise ValueError(f"{what}={eta!r}: expected a finite step size > 0 (the optimizer's lr)")
    return float(eta)
