"""Per-prompt X (entropy-gradient surrogate) and Y (policy-gradient) losses, DESIGN §1.

Both take ``S`` — teacher-forced sequence log-probs ``[N, G]`` (nats) — and a
:class:`~functional_probe.batch.Batch`, and return one loss per prompt, ``[N]``.
They are pure tensor functions of ``S`` (the batch supplies constants), so they work
under ``torch.func.grad``, ``vjp``, ``jvp`` and ``vmap``.

Computation happens in ``S``'s dtype, promoted to at least float32 (half / bfloat16
inputs are computed, and returned, in float32; float64 stays float64).
"""

from __future__ import annotations

import einops
import torch
from torch import Tensor

from functional_probe.batch import Batch

__all__ = ["WEIGHTINGS", "x_loss_values", "x_losses", "y_loss_values", "y_losses"]

WEIGHTINGS: tuple[str, ...] = ("dr_grpo", "per_token_avg")


def _checked(S: Tensor, batch: Batch, fn: str) -> Tensor:
    """``S`` promoted to >= float32 after checking it is a floating ``[N, G]`` tensor."""
    if not isinstance(S, Tensor):
        raise ValueError(f"{fn}: S must be a torch.Tensor [N, G], got {type(S).__name__}")
    expected = (batch.num_prompts, batch.group_size)
    if tuple(S.shape) != expected:
        raise ValueError(
            f"{fn}: S has shape {tuple(S.shape)}, expected [N, G] = {list(expected)} "
            "(prompts x responses of the batch)"
        )
    if not S.is_floating_point():
        raise ValueError(f"{fn}: S must be a floating-point tensor, got dtype {S.dtype}")
    return S.to(torch.promote_types(S.dtype, torch.float32))


def x_losses(S: Tensor, batch: Batch, *, weighting: str = "dr_grpo") -> Tensor:
    """X loss per prompt: ``Lx[n] = -mean_g(c[n, g] * S[n, g])``, ``[N]``.

    With ``w = S / Lmax[n]`` (``"dr_grpo"``) or ``w = S / len[n, g]``
    (``"per_token_avg"``), ``b[n, g] = (sum_g' w[n, g'] - w[n, g]) / max(G - 1, 1)``
    (leave-one-out mean; G = 1 gives b = 0) and ``c = stopgrad(w - b)``. The
    coefficient carries no gradient, so ``dLx[n]/dS[n, g] = -c[n, g] / G`` and
    ``grad_theta Lx[n]`` estimates the entropy gradient for prompt n.

    Args:
        S: ``[N, G]`` sequence log-probs (nats), floating point.
        batch: supplies ``max_lengths`` ``[N]`` and ``response_lengths`` ``[N, G]``.
        weighting: ``"dr_grpo"`` or ``"per_token_avg"``.

    Returns:
        ``[N]`` losses in S's dtype (at least float32), on S's device.

    Raises:
        ValueError: unknown ``weighting`` (naming it and the allowed values), or ``S``
            not a floating ``[N, G]`` tensor matching the batch.
    """
    if not isinstance(weighting, str) or weighting not in WEIGHTINGS:
        allowed = ", ".join(repr(w) for w in WEIGHTINGS)
        raise ValueError(f"x_losses: unknown weighting {weighting!r}; expected one of {allowed}")
    S = _checked(S, batch, "x_losses")
    return x_loss_values(S, batch.max_lengths, batch.response_lengths, weighting)


def x_loss_values(S: Tensor, max_lengths: Tensor, response_lengths: Tensor, weighting: str) -> Tensor:
    """The X-loss formula on plain tensors (what `x_losses` and vmapped per-prompt code call).

    S [N, G] (≥ fp32), max_lengths [N], response_lengths [N, G] -> [N].
    """
    group = S.shape[1]
    if weighting == "dr_grpo":
        denom = einops.rearrange(max_lengths.to(S.device, S.dtype), "n -> n 1")
    else:
        denom = response_lengths.to(S.device, S.dtype)
    w = S / denom  # [N, G]
    b = (w.sum(dim=1, keepdim=True) - w) / max(group - 1, 1)  # [N, G] leave-one-out mean
    c = (w - b).detach()  # [N, G] stop-gradient coefficient
    return -(c * S).mean(dim=1)


def y_losses(S: Tensor, batch: Batch) -> Tensor:
    """Y loss per prompt: ``Ly[n] = mean_g(A[n, g] / Lmax[n] * S[n, g])``, ``[N]``.

    Args:
        S: ``[N, G]`` sequence log-probs (nats), floating point.
        batch: supplies ``advantages`` ``[N, G]`` and ``max_lengths`` ``[N]``.

    Returns:
        ``[N]`` losses in S's dtype (at least float32), on S's device.

    Raises:
        ValueError: ``S`` not a floating ``[N, G]`` tensor matching the batch.
    """
    S = _checked(S, batch, "y_losses")
    batch.require_advantages("y_losses")
    return y_loss_values(S, batch.advantages, batch.max_lengths)


def y_loss_values(S: Tensor, advantages: Tensor, max_lengths: Tensor) -> Tensor:
    """The Y-loss formula on plain tensors: S [N, G], advantages [N, G], max_lengths [N] -> [N]."""
    adv = advantages.to(S.device, S.dtype)  # [N, G]
    lmax = einops.rearrange(max_lengths.to(S.device, S.dtype), "n -> n 1")
    return (adv / lmax * S).mean(dim=1)
