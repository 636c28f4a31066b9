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

Validation happens once, in :func:`make_batch`, with the checks of
:mod:`functional_probe.batch_checks` and :mod:`functional_probe.validation` (the token
validator is the one rollout files use too);
every bad input raises ``ValueError`` naming the offending prompt ``n`` / response ``g`` and
what was expected. Token ids at
or above the vocabulary size are checked by :meth:`Batch.check_vocab`, because only the
model knows the vocabulary.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import einops
import torch
from torch import Tensor

from .batch_checks import check_batch_vocab, check_groups, check_pad_token_id
from .validation import check_advantages, check_max_lengths

__all__ = ["Batch", "make_batch"]

NOT_TENSORS = ("pad_token_id", "has_advantages")


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
        has_advantages: False when the batch was built without advantages (an evaluation
            batch): the Y loss then refuses it instead of giving 0 ± 0.
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
    has_advantages: bool = True

    def __post_init__(self) -> None:
        if self.input_ids.dim() != 3:
            raise ValueError(f"Batch.input_ids must be [N, G, T], got shape {tuple(self.input_ids.shape)}")
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
                raise ValueError(f"Batch.{name} has shape {got}, expected {shape} to match "
                                 f"input_ids [N, G, T] = {(n, g, t)}")

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
            if f.name not in NOT_TENSORS
        }
        real_cols = picked["attention_mask"].any(dim=1).any(dim=0)  # [T]
        cols = torch.nonzero(real_cols).reshape(-1)
        start, stop = int(cols[0]), int(cols[-1]) + 1
        for name in ("input_ids", "attention_mask", "response_mask", "position_ids"):
            picked[name] = picked[name][..., start:stop]
        return Batch(pad_token_id=self.pad_token_id, has_advantages=self.has_advantages, **picked)

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
        """Check every real (non-pad) token id lies in ``[0, vocab_size)``; ValueError naming the
        first offending prompt / response / position (``batch_checks.check_batch_vocab``)."""
        check_batch_vocab(self, vocab_size)

    def require_advantages(self, what: str, loss: str = "y") -> None:
        """Raise ValueError if ``loss`` is the Y loss and the batch carries no advantages
        (``what`` names the caller)."""
        if loss == "y" and not self.has_advantages:
            raise ValueError(f"{what}: the batch has no advantages (make_batch(..., advantages=None) or a "
                             "rollout file without 'advantages'/'rewards'); the Y loss of such a batch is "
                             "0, so δH₁ would be 0 ± 0: pass the update batch's advantages")  # fmt: skip

    # ----------------------------------------------------------------- device
    def to(self, device: torch.device | str) -> Batch:
        """The same batch with every tensor on ``device`` (dtypes unchanged)."""
        moved = {f.name: getattr(self, f.name).to(device) for f in fields(self) if f.name not in NOT_TENSORS}
        return replace(self, **moved)


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
            finite; stored as float32. Default: zeros, with ``has_advantages=False`` (fine for
            the X loss; the Y loss refuses the batch).
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
    pad_token_id = check_pad_token_id(pad_token_id)
    prompt_toks, resp_toks = check_groups(prompts, responses)
    n_prompts, group = len(prompt_toks), len(resp_toks[0])
    resp_lens = [[len(r) for r in rs] for rs in resp_toks]
    adv = (
        torch.zeros(n_prompts, group, dtype=torch.float32)
        if advantages is None
        else check_advantages(advantages, n_prompts, group)
    )
    lmax = (
        torch.tensor([float(max(ls)) for ls in resp_lens], dtype=torch.float32)
        if max_lengths is None
        else check_max_lengths(max_lengths, resp_lens)
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
        has_advantages=advantages is not None,
    )
