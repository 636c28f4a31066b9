"""The Adam-family update rule: the displacement Δθ of one step, its parts and Jacobian.

For one parameter tensor with state (m, v, v_max, t) before the step, group hyper-parameters
``lr, (β1, β2), ε, λ`` and trainer gradient ``g`` (what ``p.grad`` holds), the optimizer
computes, elementwise (torch ``Adam``/``AdamW``, bitsandbytes Adam-family alike)::

    c  = min(1, max_norm / (‖g_all‖ + 1e-6))      global clipping factor (1 without clipping)
    u  = ±c·g + λ_L2·θ                            − under maximize; λ_L2 = λ for Adam's L2
    m' = β1·m + (1 − β1)·u,   v' = β2·v + (1 − β2)·u²,   w = max(v_max, v') (AMSGrad) or v'
    denom = sqrt(w) / sqrt(1 − β2^(t+1)) + ε,   k = lr / (1 − β1^(t+1))
    Δθ = −k·m' / denom − lr·λ_dec·θ               λ_dec = λ for decoupled decay (AdamW, bnb)

An empty state (before the first step) is m = v = v_max = 0, t = 0. Δθ splits exactly into

    gradient = −k(1 − β1)(±c·g) / denom      (this batch's gradient; denom includes its g²)
    momentum = −k·β1·m / denom               (the history)
    decay    = −k(1 − β1)λ_L2·θ / denom − lr·λ_dec·θ

and ``D = ∂Δθ/∂g`` (elementwise, c held fixed) includes v's dependence on g::

    D = ±c · (−k) · [(1 − β1)/denom − m'·(1 − β2)·u / (sqrt(1 − β2^(t+1))·sqrt(w)·denom²)]

(the second term is 0 where AMSGrad's v_max wins, or where w = 0). The clipping factor's own
dependence on g is a rank-one term, applied in :meth:`NextStep.pullback`.
Computed in float64 (:func:`adam_parts`, one tensor from its ``ParamState``); ``optim_step.AdamState``
applies it to a whole optimizer and returns the result in ``promote(g, θ, float32)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .optim_read import ParamState

CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_: clip_coef = max_norm / (total_norm + 1e-6)


@dataclass(frozen=True, eq=False)
class NextStep:
    """Δθ of the next optimizer step for given gradients, and what it is made of.

    Attributes (dicts keyed like the LoRA dict, shaped like each parameter):
        delta: Δθ = gradient + momentum + decay (summed in float64).
        gradient, momentum, decay: the split of the module docstring.
        jacobian: D = ∂Δθ/∂g elementwise with the clipping factor held fixed.
        grads: the gradients the step was computed for (before clipping).
        clip_coef: c (1.0 without clipping or when the norm is below max_norm).
        grad_norm: ‖g_all‖ over all the optimizer's tensors (float64), or None without clipping.
        clipping: True when c < 1 came from max_norm / (‖g‖ + 1e-6), i.e. c depends on g.
    """

    delta: dict[str, Tensor]
    gradient: dict[str, Tensor]
    momentum: dict[str, Tensor]
    decay: dict[str, Tensor]
    jacobian: dict[str, Tensor]
    grads: dict[str, Tensor]
    clip_coef: float
    grad_norm: float | None
    clipping: bool

    def pullback(self, vec: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Jᵀ·vec for the full Jacobian J = ∂Δθ/∂g of the step, clipping factor included.

        J = diag(D) + (∂Δθ/∂c)(∇c)ᵀ with ∂Δθ/∂c = D·g/c and, while clipping is active,
        ∇c = −c·g / ((‖g‖ + 1e-6)·‖g‖); so Jᵀv = D·v − g·<D·g, v> / ((‖g‖ + 1e-6)·‖g‖).
        Float64 inside, returned in each vec tensor's dtype promoted with float32.
        """
        out = {k: self.jacobian[k].double() * vec[k].double() for k in self.jacobian}
        if self.clipping:
            n = self.grad_norm
            coef = sum(float((out[k] * self.grads[k].double()).sum()) for k in out) / ((n + CLIP_EPS) * n)
            out = {k: out[k] - coef * self.grads[k].double() for k in out}
        return {k: v.to(torch.promote_types(vec[k].dtype, torch.float32)) for k, v in out.items()}


PARTS = ("delta", "gradient", "momentum", "decay", "jacobian")


def adam_parts(ps: ParamState, g: Tensor, theta: Tensor, c: float) -> tuple[Tensor, ...]:
    """(Δθ, gradient, momentum, decay, D) for one tensor, float64 (formulas: module docstring)."""
    zero = torch.zeros(g.shape, dtype=torch.float64, device=g.device)
    m, v = (zero if x is None else x.to(g.device, torch.float64) for x in (ps.m, ps.v))
    sign = -1.0 if ps.maximize else 1.0
    theta = theta.detach().to(g.device, torch.float64)
    l2 = 0.0 if ps.decoupled else ps.weight_decay
    u_g = (sign * c) * g.detach().double()
    u = u_g + l2 * theta if l2 else u_g
    m_new = ps.beta1 * m + (1 - ps.beta1) * u
    w = ps.beta2 * v + (1 - ps.beta2) * u * u
    through_v = torch.ones_like(w, dtype=torch.bool)
    if ps.amsgrad:
        v_max = zero if ps.v_max is None else ps.v_max.to(g.device, torch.float64)
        through_v = w >= v_max
        w = torch.maximum(w, v_max)
    bc2_sqrt = math.sqrt(1 - ps.beta2 ** (ps.step + 1))
    k = ps.lr / (1 - ps.beta1 ** (ps.step + 1))
    denom = w.sqrt() / bc2_sqrt + ps.eps
    gradient = -k * (1 - ps.beta1) * u_g / denom
    momentum = -k * ps.beta1 * m / denom
    decay = -k * (1 - ps.beta1) * l2 * theta / denom if l2 else torch.zeros_like(denom)
    if ps.decoupled and ps.weight_decay:
        decay = decay - ps.lr * ps.weight_decay * theta
    safe = torch.where(w > 0, w, 1.0).sqrt()
    d_denom = torch.where(through_v & (w > 0), (1 - ps.beta2) * u / (bc2_sqrt * safe), 0.0)
    jac = (sign * c) * -k * ((1 - ps.beta1) / denom - m_new * d_denom / denom**2)
    return gradient + momentum + decay, gradient, momentum, decay, jac


def clip_factor(grads: Mapping[str, Tensor], max_norm: float | None) -> tuple[float | None, float, bool]:
    """(‖g‖, c, clipping) as torch.nn.utils.clip_grad_norm_: c = min(1, max_norm/(‖g‖ + 1e-6)),
    ‖g‖ the 2-norm over all tensors (float64); clipping is True when c < 1."""
    if max_norm is None:
        return None, 1.0, False
    if not (isinstance(max_norm, int | float) and math.isfinite(max_norm) and max_norm > 0):
        raise ValueError(f"max_grad_norm={max_norm!r}; expected a positive finite number or None")
    norm = math.sqrt(sum(float(g.detach().double().square().sum()) for g in grads.values()))
    coef = max_norm / (norm + CLIP_EPS)
    return norm, min(coef, 1.0), coef < 1.0


def group_lrs(params: Mapping[str, ParamState], lr: float | Sequence[float] | None) -> dict[int, float]:
    """Group index -> lr for the step: the state's, one float for all, or one per group."""
    groups = sorted({ps.group for ps in params.values()})
    own = {ps.group: ps.lr for ps in params.values()}
    if lr is None:
        return own
    lrs = [lr] * len(groups) if isinstance(lr, int | float) else list(lr)
    if len(lrs) != len(groups):
        raise ValueError(f"lr has {len(lrs)} values for {len(groups)} param groups")
    for i, x in enumerate(lrs):
        if not (isinstance(x, int | float) and math.isfinite(x) and x >= 0):
            raise ValueError(f"lr[{i}] = {x!r}; expected a finite number >= 0")
    return dict(zip(groups, map(float, lrs), strict=True))
