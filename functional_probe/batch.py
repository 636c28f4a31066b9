"""Batches of N prompts x G responses, aligned so every prompt ends at the same column.

Layout of row (n, g) of a :class:`Batch` with ``T`` columns::

    [left pad][prompt n][response (n, g)][right pad]
     0 ..     P - plen[n] .. P - 1
                          P .. P + len[n, g] - 1
                                          .. T - 1

``P`` (``Batch.prompt_end``) is the length of the longest prompt in the batch, so the
first response token of every row sits at column ``P`` and the target of the logit at
column ``t`` is the token at column ``t + 1``. All masks are built from the lengths,
never by comparing tokens with the pad id: a response may legitimately contain the pad
or EOS id.

Validation happens once, in :func:`make_batch`; every bad input raises ``ValueError``
naming the offending prompt ``n`` / response ``g`` and what was expected. Token ids at
or above the vocabulary size are checked by :meth:`Batch.check_vocab`, because only the
model knows the vocabulary.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import einops
import numpy as np
import torch
from torch import Tensor

__all__ = ["Batch", "make_batch"]

_INT64_MAX = 2**63 - 1


@dataclass(frozen=True, eq=False)
class Batch:
    """N prompts x G responses, laid out per row as
    ``[left pad][prompt][response][right pad]`` so every prompt ends at column ``P``.

    Build it with :func:`make_batch`; construct it directly only from tensors that
    already follow the layout (shapes are checked, contents are not).

    Attributes:
        input_ids: ``[N, G, T]`` int64 token ids; pad positions hold ``pad_token_id``.
        attention_mask: ``[N, G, T]`` bool; True on prompt and response tokens.
        response_mask: ``[N, G, T]`` bool; True on response-token positions (the targets).
        position_ids: ``[N, G, T]`` int64; ``cumsum(attention_mask) - 1`` on real tokens,
            0 on pads, so positions restart at 0 on each row's first real token.
        response_lengths: ``[N, G]`` int64, response lengths in tokens.
        prompt_lengths: ``[N]`` int64, prompt lengths in tokens.
        max_lengths: ``[N]`` float32, ``Lmax[n]`` in tokens (default: longest response
            of prompt n); the Dr. GRPO normaliser of the X and Y losses.
        advantages: ``[N, G]`` float32 (zeros if not given).
        pad_token_id: the id written at pad positions (never used to build masks).
    """

    input_ids: Tensor
    attention_mask: Tensor
    response_mask: Tensor
    position_ids: Tensor
    response_lengths: Tensor
    prompt_lengths: Tensor
    max_lengths: Tensor
    advantages: Tensor
    pad_token_id: int

    def __post_init__(self) -> None:
        if self.input_ids.dim() != 3:
            raise ValueError(
                f"Batch.input_ids must be [N, G, T], got shape {tuple(self.input_ids.shape)}"
            )
        n, g, t = self.input_ids.shape
        expected = {
            "attention_mask": (n, g, t),
            "response_mask": (n, g, t),
            "position_ids": (n, g, t),
            "response_lengths": (n, g),
            "prompt_lengths": (n,),
            "max_lengths": (n,),
            "advantages": (n, g),
        }
        for name, shape in expected.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise ValueError(
                    f"Batch.{name} has shape {got}, expected {shape} to match "
                    f"input_ids [N, G, T] = {(n, g, t)}"
                )

    # ------------------------------------------------------------------ shape
    @property
    def num_prompts(self) -> int:
        """N, the number of prompts."""
        return self.input_ids.shape[0]

    @property
    def group_size(self) -> int:
        """G, the number of responses per prompt."""
        return self.input_ids.shape[1]

    @property
    def seq_len(self) -> int:
        """T, the number of columns (tokens) per row."""
        return self.input_ids.shape[2]

    @property
    def prompt_end(self) -> int:
        """P, the column where every prompt ends and every response starts.

        Read from the response mask of row (0, 0) (every response has ≥ 1 token), so it
        stays correct for any batch that follows the layout, trimmed or not.
        """
        return int(self.response_mask[0, 0].to(torch.int8).argmax())

    def __len__(self) -> int:
        return self.num_prompts

    # --------------------------------------------------------------- indexing
    def __getitem__(self, idx: int | slice | Sequence[int] | Tensor) -> Batch:
        """Select prompts (all G responses of each) and trim all-pad columns.

        ``idx`` may be an int (gives a batch with N = 1), a slice, a sequence of ints or
        an integer / boolean tensor; negative indices count from the end. Columns that
        are pad in every selected row are dropped at both ends, so the result follows
        the layout with ``P = longest selected prompt`` and ``T`` as small as possible.
        Position ids are unchanged (they count real tokens only).

        Raises:
            IndexError: an index is out of range (so ``iter(batch)`` stops properly).
            ValueError: the selection is empty.
        """
        n_total = self.num_prompts
        if isinstance(idx, bool):
            raise TypeError("Batch index must be an int, slice, sequence of ints or tensor")
        if isinstance(idx, numbers.Integral):
            i = int(idx)
            if not -n_total <= i < n_total:
                raise IndexError(f"prompt index {i} out of range for a batch of {n_total}")
            rows = torch.tensor([i % n_total], dtype=torch.long)
        else:
            if isinstance(idx, Tensor):
                idx = idx.cpu()
            try:
                rows = torch.arange(n_total)[idx]
            except (IndexError, TypeError, ValueError, RuntimeError) as exc:
                raise IndexError(
                    f"cannot select prompts {idx!r} from a batch of {n_total}: {exc}"
                ) from exc
            rows = rows.reshape(-1)
        if rows.numel() == 0:
            raise ValueError(f"selection {idx!r} selects no prompts from a batch of {n_total}")
        return self._select(rows)

    def _select(self, rows: Tensor) -> Batch:
        """Rows ``rows`` (int64 [K]) of every tensor, then trim all-pad columns."""
        dev_rows = rows.to(self.input_ids.device)
        picked = {
            f.name: getattr(self, f.name).index_select(0, dev_rows)
            for f in fields(self)
            if f.name != "pad_token_id"
        }
        real_cols = picked["attention_mask"].any(dim=1).any(dim=0)  # [T]
        cols = torch.nonzero(real_cols).reshape(-1)
        start, stop = int(cols[0]), int(cols[-1]) + 1
        for name in ("input_ids", "attention_mask", "response_mask", "position_ids"):
            picked[name] = picked[name][..., start:stop]
        return Batch(pad_token_id=self.pad_token_id, **picked)

    def split(self, size: int) -> list[Batch]:
        """Consecutive microbatches of at most ``size`` prompts each, every one trimmed.

        Raises:
            ValueError: ``size`` is not a positive int.
        """
        if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size <= 0:
            raise ValueError(f"split size must be a positive int, got {size!r}")
        size = int(size)
        return [self[i : i + size] for i in range(0, self.num_prompts, size)]

    # ------------------------------------------------------------- validation
    def check_vocab(self, vocab_size: int) -> None:
        """Check every real (non-pad) token id lies in ``[0, vocab_size)``.

        Pad positions are ignored (the pad id may be anything the model never reads).

        Raises:
            ValueError: naming the first offending prompt ``n`` (and response ``g`` and
                position within the response, or position within the prompt) and the
                allowed range.
        """
        if (
            isinstance(vocab_size, bool)
            or not isinstance(vocab_size, numbers.Integral)
            or vocab_size <= 0
        ):
            raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
        bad = self.attention_mask & ((self.input_ids < 0) | (self.input_ids >= vocab_size))
        if not bool(bad.any()):
            return
        n, g, col = (int(v) for v in torch.nonzero(bad)[0])
        token = int(self.input_ids[n, g, col])
        p = self.prompt_end
        if col < p:
            pos = col - (p - int(self.prompt_lengths[n]))
            where = f"prompt {n}: prompt token {pos}"
        else:
            where = f"prompt {n}, response {g}: response token {col - p}"
        raise ValueError(f"{where} has id {token}, outside the vocabulary [0, {int(vocab_size)})")

    # ----------------------------------------------------------------- device
    def to(self, device: torch.device | str) -> Batch:
        """The same batch with every tensor on ``device`` (dtypes unchanged)."""
        return replace(
            self,
            **{
                f.name: getattr(self, f.name).to(device)
                for f in fields(self)
                if f.name != "pad_token_id"
            },
        )


# ---------------------------------------------------------------------------------
# construction
# ---------------------------------------------------------------------------------


def _as_list(x: Any, what: str) -> list:
    """``x`` as a Python list (tensors / arrays via ``tolist``), else ValueError."""
    if isinstance(x, Tensor | np.ndarray):
        if x.ndim == 0:
            raise ValueError(f"{what} must be a sequence, got a 0-d {type(x).__name__}")
        return x.tolist()
    if isinstance(x, str | bytes) or not isinstance(x, Sequence):
        raise ValueError(f"{what} must be a sequence, got {type(x).__name__}")
    return list(x)


def _is_int(t: Any) -> bool:
    """True for Python / numpy integers, False for bools, floats, strings, None, ..."""
    return isinstance(t, int | np.integer) and not isinstance(t, bool)


def _tokens(seq: Any, what: str) -> list[int]:
    """Validate one token sequence (non-empty, ints in [0, 2**63)) and return it."""
    if isinstance(seq, Tensor | np.ndarray) and seq.ndim != 1:
        raise ValueError(
            f"{what} must be a 1-D sequence of token ids, got shape {tuple(seq.shape)}"
        )
    toks = _as_list(seq, what)
    if len(toks) == 0:
        raise ValueError(f"{what} is empty; expected at least one token id")
    for i, t in enumerate(toks):
        if not _is_int(t):
            raise ValueError(
                f"{what}, token {i}: expected an int token id, got {t!r} ({type(t).__name__})"
            )
        if t < 0:
            raise ValueError(
                f"{what}, token {i}: token id {int(t)} is negative; expected an id >= 0"
            )
        if t > _INT64_MAX:
            raise ValueError(f"{what}, token {i}: token id {int(t)} does not fit in int64")
    return [int(t) for t in toks]


def _advantages(advantages: Any, n_prompts: int, group: int) -> Tensor:
    """``advantages`` as a finite float32 ``[N, G]`` tensor, else ValueError."""
    expected = f"[N, G] = [{n_prompts}, {group}]"
    if isinstance(advantages, Tensor):
        if advantages.is_complex() or advantages.dtype == torch.bool:
            raise ValueError(f"advantages must be real numbers, got dtype {advantages.dtype}")
        arr = advantages.detach().cpu().to(torch.float64)
    else:
        if not isinstance(advantages, np.ndarray):
            rows = _as_list(advantages, "advantages")
            if len(rows) != n_prompts:
                raise ValueError(
                    f"advantages has {len(rows)} rows, expected {expected} (one per prompt)"
                )
            for n, row in enumerate(rows):
                if isinstance(row, str | bytes) or not hasattr(row, "__len__"):
                    raise ValueError(
                        f"advantages[{n}] must be a sequence of {group} numbers, "
                        f"got {type(row).__name__}"
                    )
                if len(row) != group:
                    raise ValueError(
                        f"advantages[{n}] has {len(row)} entries, expected {group} "
                        f"(one per response of prompt {n})"
                    )
        try:
            np_arr = np.asarray(advantages, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"advantages must be real numbers, shape {expected}: {exc}") from exc
        arr = torch.from_numpy(np_arr)
    if tuple(arr.shape) != (n_prompts, group):
        raise ValueError(f"advantages has shape {tuple(arr.shape)}, expected {expected}")
    finite = torch.isfinite(arr)
    if not bool(finite.all()):
        n, g = (int(v) for v in torch.nonzero(~finite)[0])
        raise ValueError(
            f"advantages[{n}][{g}] (prompt {n}, response {g}) is {float(arr[n, g])}; "
            "expected a finite number"
        )
    arr32 = arr.to(torch.float32)
    finite32 = torch.isfinite(arr32)
    if not bool(finite32.all()):
        n, g = (int(v) for v in torch.nonzero(~finite32)[0])
        raise ValueError(
            f"advantages[{n}][{g}] (prompt {n}, response {g}) = {float(arr[n, g])} "
            "overflows float32; expected a finite float32 number"
        )
    return arr32


def _max_lengths(max_lengths: Any, resp_lens: list[list[int]]) -> Tensor:
    """``max_lengths`` as float32 ``[N]``; each must be an int >= the longest response."""
    n_prompts = len(resp_lens)
    vals = _as_list(max_lengths, "max_lengths")
    if len(vals) != n_prompts:
        raise ValueError(
            f"max_lengths has {len(vals)} entries, expected {n_prompts} (one per prompt)"
        )
    out = []
    for n, v in enumerate(vals):
        if not _is_int(v):
            raise ValueError(
                f"max_lengths[{n}] (prompt {n}) must be an int number of tokens, "
                f"got {v!r} ({type(v).__name__})"
            )
        if v <= 0:
            raise ValueError(f"max_lengths[{n}] (prompt {n}) is {int(v)}; expected > 0")
        longest = max(resp_lens[n])
        if v < longest:
            g = resp_lens[n].index(longest)
            raise ValueError(
                f"max_lengths[{n}] (prompt {n}) is {int(v)}, shorter than response {g} of "
                f"prompt {n} ({longest} tokens); expected max_lengths[{n}] >= {longest}"
            )
        out.append(float(v))
    return torch.tensor(out, dtype=torch.float32)


def make_batch(
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[Sequence[int]]],
    *,
    advantages: Any = None,
    pad_token_id: int = 0,
    max_lengths: Sequence[int] | None = None,
) -> Batch:
    """Validate and align N prompts x G responses into a :class:`Batch` (on CPU).

    Args:
        prompts: N token sequences (lists / tuples of ints, or 1-D integer tensors /
            arrays), each non-empty.
        responses: N groups of G non-empty token sequences each; G must be the same for
            every prompt. Responses may contain ``pad_token_id`` or EOS ids anywhere:
            masks and lengths come from the sequence lengths only.
        advantages: ``[N][G]`` real numbers (nested lists, numpy array or tensor), all
            finite; stored as float32. Default: zeros.
        pad_token_id: non-negative int written at pad positions.
        max_lengths: N ints, ``Lmax[n]`` in tokens, each ``>= `` the longest response of
            prompt n (a smaller value would make the Dr. GRPO weight of that response
            exceed a per-token average, so it is rejected rather than silently used).
            Default: the longest response of each prompt.

    Returns:
        A Batch with ``T = P + longest response``, ``P = longest prompt``.

    Raises:
        ValueError: naming prompt n / response g and what was expected, for: no prompts;
            different numbers of prompts and response groups; a prompt with no responses
            or a different G than prompt 0; an empty prompt or response; a token that is
            not an int (floats such as 3.0, bools, strings, None are all rejected) or is
            negative; advantages of the wrong shape or non-finite; max_lengths of the
            wrong length, non-int, <= 0 or shorter than a response; a negative or non-int
            pad_token_id.
    """
    if not _is_int(pad_token_id) or pad_token_id < 0 or pad_token_id > _INT64_MAX:
        raise ValueError(f"pad_token_id must be a non-negative int, got {pad_token_id!r}")
    prompt_list = _as_list(prompts, "prompts")
    group_list = _as_list(responses, "responses")
    if len(prompt_list) == 0:
        raise ValueError("make_batch needs at least one prompt, got 0 (N == 0)")
    if len(group_list) != len(prompt_list):
        raise ValueError(
            f"got {len(prompt_list)} prompts but {len(group_list)} response groups; "
            "expected one group of responses per prompt"
        )
    n_prompts = len(prompt_list)

    prompt_toks = [_tokens(p, f"prompt {n}") for n, p in enumerate(prompt_list)]
    resp_toks: list[list[list[int]]] = []
    group = -1
    for n, grp in enumerate(group_list):
        if isinstance(grp, Tensor | np.ndarray) and grp.ndim != 2:
            raise ValueError(
                f"responses of prompt {n} must be G token sequences, got an array of shape "
                f"{tuple(grp.shape)}"
            )
        rs = _as_list(grp, f"responses of prompt {n}")
        if len(rs) == 0:
            raise ValueError(f"prompt {n} has 0 responses, expected at least 1")
        if group < 0:
            group = len(rs)
        elif len(rs) != group:
            raise ValueError(f"prompt {n} has {len(rs)} responses, expected {group} like prompt 0")
        resp_toks.append([_tokens(r, f"prompt {n}, response {g}") for g, r in enumerate(rs)])

    resp_lens = [[len(r) for r in rs] for rs in resp_toks]
    adv = (
        torch.zeros(n_prompts, group, dtype=torch.float32)
        if advantages is None
        else _advantages(advantages, n_prompts, group)
    )
    lmax = (
        torch.tensor([float(max(ls)) for ls in resp_lens], dtype=torch.float32)
        if max_lengths is None
        else _max_lengths(max_lengths, resp_lens)
    )

    plen = torch.tensor([len(p) for p in prompt_toks], dtype=torch.int64)  # [N]
    rlen = torch.tensor(resp_lens, dtype=torch.int64)  # [N, G]
    p_end = int(plen.max())
    seq_len = p_end + int(rlen.max())

    # Masks from lengths only: column c of row (n, g) is real iff
    # P - plen[n] <= c < P + rlen[n, g]; a response target iff P <= c < P + rlen[n, g].
    cols = einops.rearrange(torch.arange(seq_len), "t -> 1 1 t")
    start = einops.rearrange(p_end - plen, "n -> n 1 1")
    stop = einops.rearrange(p_end + rlen, "n g -> n g 1")
    attention_mask = (cols >= start) & (cols < stop)  # [N, G, T]
    response_mask = (cols >= p_end) & (cols < stop)  # [N, G, T]
    position_ids = (torch.cumsum(attention_mask, dim=-1) - 1).clamp_min(0) * attention_mask

    input_ids = torch.full((n_prompts, group, seq_len), pad_token_id, dtype=torch.int64)
    for n in range(n_prompts):
        input_ids[n, :, p_end - len(prompt_toks[n]) : p_end] = torch.tensor(
            prompt_toks[n], dtype=torch.int64
        )
        for g, r in enumerate(resp_toks[n]):
            input_ids[n, g, p_end : p_end + len(r)] = torch.tensor(r, dtype=torch.int64)

    return Batch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        response_mask=response_mask,
        position_ids=position_ids.to(torch.int64),
        response_lengths=rlen,
        prompt_lengths=plen,
        max_lengths=lmax,
        advantages=adv,
        pad_token_id=int(pad_token_id),
    )
