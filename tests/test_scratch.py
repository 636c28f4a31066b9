"""Per-pass buffers: reuse of one storage across layers, growth, a fresh one per dtype."""

import torch

from functional_probe.model.scratch import scratch


def test_scratch_reuses_storage_and_grows():
    buffers, like = {}, torch.zeros(1)
    first = scratch(buffers, "a", (3, 4), like)
    smaller = scratch(buffers, "a", (2, 5), like)  # a later, smaller layer (the last one keeps fewer tokens)
    assert smaller.shape == (2, 5) and smaller.data_ptr() == first.data_ptr()
    larger = scratch(buffers, "a", (5, 5), like)
    assert larger.shape == (5, 5) and buffers["a"].numel() == 25
    assert scratch(buffers, "a", (2,), like.double()).dtype == torch.float64  # another dtype: fresh
