"""The dual MLP piece: the SwiGLU pair rule against torch.func.jvp."""

import torch
from helpers import rel_err

from functional_probe.model.dual_mlp import swiglu_dual


def test_swiglu_dual_equals_jvp():
    gen = torch.Generator().manual_seed(0)
    gate, up = torch.randn(2, 5, 7, generator=gen), torch.randn(2, 5, 7, generator=gen)
    out = swiglu_dual(gate, up, torch.full((2, 5, 7), float("nan")))
    ref, ref_dot = torch.func.jvp(
        lambda g, u: torch.nn.functional.silu(g) * u, (gate[0], up[0]), (gate[1], up[1])
    )
    assert rel_err(out[0], ref) < 1e-6 and rel_err(out[1], ref_dot) < 1e-6
