"""Shared test utilities: error measures (DESIGN §1) and the references tests compare against."""

from __future__ import annotations

import torch
from torch import Tensor


def rel_err(a: Tensor, b: Tensor) -> float:
    """‖a − b‖ / ‖b‖ (Frobenius), in float64."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm()).item()


def dict_rel_err(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    """Worst per-tensor relative error over two dicts with the same keys."""
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:3]
    return max(rel_err(a[k], b[k]) for k in b)


def proj_rel_err(a: Tensor, b: Tensor) -> float:
    """max_n |a_n − b_n| / max_n |b_n| for vectors of projections."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max()).item()


def assert_not_trivial(grads: dict[str, Tensor], floor: float = 1e-6) -> None:
    """Every compared gradient tensor has a norm well above zero (both LoRA factors live)."""
    small = {k: v.norm().item() for k, v in grads.items() if v.norm() <= floor}
    assert not small, f"trivially small gradients: {list(small.items())[:3]}"


def token_logliks(logits: Tensor, input_ids: Tensor, target_mask: Tensor) -> Tensor:
    """Σ_t log softmax(logits_{t−1})[y_t] over positions where target_mask is True: [B]."""
    logp = logits[:, :-1].log_softmax(-1).gather(-1, input_ids[:, 1:, None])[..., 0]
    return (logp * target_mask[:, 1:]).sum(-1)


def random_direction(like: dict[str, Tensor], seed: int = 0) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen, dtype=v.dtype) for k, v in like.items()}
