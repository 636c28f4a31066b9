"""Per-pass buffers: storage that every layer of one no-graph pass reuses.

Why: under glibc a fresh multi-MB tensor per layer is fresh pages (above the dynamic mmap
threshold, or after the heap top is trimmed), page-faulted on its first write. The dual's pairs
[x; ẋ] are 7–40 MB at 16 × 128 tokens of SmolLM2; reusing them measured 82 -> 70 ms per layer
for the MLP's buffers alone, and ~0.2 s of a 5.8 s dual pass with glibc's trimming switched off.
"""

from __future__ import annotations

import math

from torch import Tensor


def scratch(buffers: dict[str, Tensor], key: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """An uninitialised [shape] tensor (like's dtype and device) on the storage `buffers[key]`,
    grown when too small (a later, smaller layer gets a view of it). `buffers` lives for one pass,
    so nothing a pass returns may be a scratch view."""
    numel = math.prod(shape)
    buf = buffers.get(key)
    if buf is None or buf.numel() < numel or buf.dtype != like.dtype or buf.device != like.device:
        buf = buffers[key] = like.new_empty(numel)
    return buf[:numel].view(shape)
