"""The dual MLP pieces: the SwiGLU pair rule against torch.func.jvp, the per-pass buffer reuse."""

import torch
from helpers import rel_err

from functional_probe.model.dual_mlp import scratch, swiglu_dual


def test_swiglu_dual_equals_jvp():
    gen = torch.Generator().manual_seed(0)
    gate, up = torch.randn(2, 5, 7, generator=gen), torch.randn(2, 5, 7, generator=gen)
    out = swiglu_dual(gate, up, torch.full((2, 5, 7), float("nan")))
    ref, ref_dot = torch.func.jvp(
        lambda g, u: torch.nn.functional.silu(g) * u, (gate[0], up[0]), (gate[1], up[1])
    )
    assert rel_err(out[0], ref) < 1e-6 and rel_err(out[1], ref_dot) < 1e-6


def test_scratch_reuses_storage_and_grows():
    buffers, like = {}, torch.zeros(1)
    first = scratch(buffers, "a", (3, 4), like)
    smaller = scratch(buffers, "a", (2, 5), like)  # a later, smaller layer (the last one keeps fewer tokens)
    assert smaller.shape == (2, 5) and smaller.data_ptr() == first.data_ptr()
    larger = scratch(buffers, "a", (5, 5), like)
    assert larger.shape == (5, 5) and buffers["a"].numel() == 25
    assert scratch(buffers, "a", (2,), like.double()).dtype == torch.float64  # another dtype: fresh
