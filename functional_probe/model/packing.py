"""Which tokens a no-graph pass computes: pads skipped, rows packed (DESIGN §3, issue 17).

A pad never influences a real token (it is masked as a key, and a right pad comes after every
query that could see it), and a real token after a row's last needed position influences nothing
needed (causality). So the no-graph passes run every position-wise op (linears, norms, SwiGLU) on
the N needed tokens only, packed as [..., N, D], and attention on them left-aligned per row:
    slots [B, T'],  T' = max tokens of a row,  token i of row b (in order) at slot (b, i)
where the causal mask alone hides the trailing empty slots of a row from its tokens (they hold
zeros, so 0-weighted values stay finite). Positions are the tokens' own (from the mask), so
rotary sees what the padded forward sees. `Packing.full` is the identity (every position kept,
attention on the original [B, T] with its key mask), for passes that must return pads too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class Packing:
    """tokens [N] flat indices into B·T of the computed tokens (row-major), or None (all, unpacked);
    slots [N] their flat indices into B·T'; shape (B, T'); key_mask [B, T'] bool (what attention
    masks besides causality); positions [B, T'] the slots' rotary positions."""

    tokens: Tensor | None
    slots: Tensor | None
    shape: tuple[int, int]
    key_mask: Tensor
    positions: Tensor
    _buffers: dict = field(default_factory=dict, repr=False)

    @classmethod
    def full(cls, attention_mask: Tensor, position_ids: Tensor) -> Packing:
        """Every position of [B, T], unpacked: pads computed, masked as keys as in the plain forward."""
        return cls(None, None, tuple(attention_mask.shape), attention_mask.bool(), position_ids)

    @classmethod
    def of(cls, keep: Tensor, position_ids: Tensor) -> Packing:
        """The tokens where keep [B, T] (bool) is True, packed. Exact only when each row keeps its
        real tokens up to some column (what `needed` returns): the others must influence none."""
        b, t = keep.shape
        counts = keep.sum(-1)
        width = max(int(counts.max()), 1) if b else 1
        rank = keep.long().cumsum(-1) - 1  # slot of each kept token within its row
        rows = torch.arange(b, device=keep.device)[:, None].expand(b, t)
        flat_keep = keep.flatten()
        tokens = flat_keep.nonzero()[:, 0]
        slots = (rows * width + rank).flatten()[flat_keep]
        positions = position_ids.new_zeros(b * width).index_copy_(0, slots, position_ids.flatten()[tokens])
        key_mask = torch.ones(b, width, dtype=torch.bool, device=keep.device)
        return cls(tokens, slots, (b, width), key_mask, positions.view(b, width))

    @property
    def count(self) -> int:
        """N, the tokens computed."""
        return self.shape[0] * self.shape[1] if self.tokens is None else self.tokens.numel()

    def pack(self, x: Tensor) -> Tensor:
        """x [B, T, ...] -> [N, ...] (the kept tokens; unpacked: x itself)."""
        return x if self.tokens is None else x.flatten(0, 1)[self.tokens]

    def to_slots(self, x: Tensor) -> Tensor:
        """x [n, N, W] (or [n, B, T, W] unpacked) -> [n, B, T', W]; empty slots are zeros.
        The result is a buffer reused by the next call with the same (n, W, dtype)."""
        if self.slots is None:
            return x
        n, _, w = x.shape
        key = (n, w, x.dtype)
        if key not in self._buffers:
            self._buffers[key] = x.new_zeros(n, self.shape[0] * self.shape[1], w)
        buf = self._buffers[key]
        buf.index_copy_(1, self.slots, x)
        return buf.view(n, *self.shape, w)

    def from_slots(self, y: Tensor, out: Tensor | None = None) -> Tensor:
        """y [n, B, T', W] -> [n, N, W], written into `out` when given (unpacked: y itself)."""
        if self.slots is None:
            return y
        return torch.index_select(y.flatten(1, 2), 1, self.slots, out=out)


def needed(attention_mask: Tensor, response_mask: Tensor, prompt_end: int) -> tuple[Tensor, ...]:
    """What S needs, for [R, T] masks (1 = real / response token) and the common prompt end p:
    keep [R, T] bool (real tokens up to the row's last position predicting a response token), and
    for the M positions (row, col) predicting response tokens (token col + 1), in the order of
    `response_mask[:, p:].nonzero()`: head_rows [M] their indices in `Packing.of(keep)`, rows, cols."""
    real, response = attention_mask.bool(), response_mask.bool()
    predicts = torch.zeros_like(real)
    predicts[:, prompt_end - 1 : -1] = response[:, prompt_end:]  # position t-1 predicts token t
    cols = torch.arange(real.shape[1], device=real.device)
    last = torch.where(predicts, cols, -1).amax(-1, keepdim=True)  # [R, 1]
    keep = real & (cols <= last)
    if bool((predicts & ~keep).any()):
        raise ValueError("a position predicting a response token is padding; expected real tokens")
    index = keep.flatten().long().cumsum(0) - 1  # packed index of each kept position
    rows, cols = predicts.nonzero(as_tuple=True)
    return keep, index[rows * real.shape[1] + cols], rows, cols


def row_sums(values: Tensor, rows: Tensor, cols: Tensor, shape: tuple[int, int]) -> Tensor:
    """Σ per row of values [M] at positions (rows, cols) [M] of an [R, T] grid -> [R], values' dtype.

    Placed in a zero [R, T] grid and summed along T (torch's blocked sum, as the plain forward's
    masked sum), not `index_add_`, which adds serially: in fp32 its rounding grows with the
    running total, 6.8e-7 relative on S at T = 2048 against 3e-8 for the blocked sum, and the X
    loss's leave-one-out coefficient amplifies S errors ~300× in s (bench/results/long_exactness.md).
    """
    grid = values.new_zeros(shape)
    grid[rows, cols] = values
    return grid.sum(-1)
