"""The displacement Δθ an Adam-family optimizer applies at its next ``step()``, its parts and Jacobian.

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
Everything is computed in float64 and returned in ``promote(g, θ, float32)``. Reading optimizers
and state dicts into ``ParamState``s: ``optim_read`` (torch) and ``optim_bnb`` (bitsandbytes).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor
from torch.nn import Parameter

from .optim_bnb import is_bnb_entry, read_bnb_entry
from .optim_read import ParamState, describe, names_by_id, read_torch_entry, state_reader, unwrap_optimizer

__all__ = ["AdamState", "NextStep", "ParamState", "next_step"]

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


@dataclass(frozen=True, eq=False)
class AdamState:
    """An Adam-family optimizer's state, matched to parameter names, ready to take the next step.

    Build with :meth:`from_optimizer` (live, matched by Parameter identity) or
    :meth:`from_state_dict` (saved; names in param-group order). ``params``: name -> its state,
    a copy taken when read (a later ``optimizer.step()`` does not change it); ``live``: name ->
    the live Parameter (None for a saved state: pass θ to :meth:`step`); ``source`` names the
    optimizer.
    """

    params: dict[str, ParamState]
    source: str
    live: dict[str, Tensor] | None = None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.params)

    @property
    def lr(self) -> float:
        """The first parameter group's lr (the η a probe reports per-unit-step numbers against)."""
        return next(iter(self.params.values())).lr

    @classmethod
    def from_optimizer(
        cls,
        optimizer: torch.optim.Optimizer,
        named_params: Mapping[str, Parameter] | Iterable[tuple[str, Parameter]],
    ) -> AdamState:
        """Read a live torch Adam/AdamW or bitsandbytes Adam-family optimizer (also wrapped by
        accelerate's ``AcceleratedOptimizer``); every optimizer parameter must be named in
        ``named_params`` (extra names, e.g. frozen weights, are ignored). An empty state (the
        optimizer has not stepped yet) is the first step.

        Raises:
            ValueError: another optimizer (naming its real class), an unnamed or aliased
                parameter, a complex parameter, or an option whose step is not reproduced.
        """
        opt, wrapped = unwrap_optimizer(optimizer)
        kind = describe(opt, wrapped)
        reader = state_reader(opt, kind)
        by_id = names_by_id(named_params)
        params: dict[str, ParamState] = {}
        live: dict[str, Tensor] = {}
        for gi, group in enumerate(opt.param_groups):
            for pi, p in enumerate(group["params"]):
                if id(p) not in by_id:
                    raise ValueError(f"{kind}: param group {gi}, parameter {pi} (shape {tuple(p.shape)}) "
                                     "is not in named_params")  # fmt: skip
                name = by_id[id(p)]
                if p.is_complex():
                    raise ValueError(f"parameter {name!r} is complex; only real parameters are supported")
                params[name] = reader(name, opt.state.get(p) or {}, group, gi, pi, tuple(p.shape))
                live[name] = p
        return cls._checked(params, kind, live)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any], names: Sequence[str]) -> AdamState:
        """Read ``optimizer.state_dict()`` of a torch Adam/AdamW or a bitsandbytes Adam-family
        optimizer (told apart by their keys: ``exp_avg_sq`` vs ``state1``/``state2``).

        Args:
            state: ``{"state": {index: {...}}, "param_groups": [{"params": [index, ...], ...}]}``.
            names: one name per parameter in param-group order (group 0's ``params`` first).
                Shapes are those of the saved tensors; a parameter without state must be
                checked against the LoRA dict with :meth:`check_shapes`.

        Raises:
            ValueError: malformed dict, wrong number of names, a state of another optimizer,
                naming the item.
        """
        if not isinstance(state, Mapping) or "state" not in state or "param_groups" not in state:
            raise ValueError("state must be an optimizer.state_dict() with keys 'state' and 'param_groups'")
        names = list(names)
        indices = [i for g in state["param_groups"] for i in g["params"]]
        if len(names) != len(indices):
            raise ValueError(f"got {len(names)} names for {len(indices)} parameters in the state "
                             "dict's param groups")  # fmt: skip
        params: dict[str, ParamState] = {}
        k = 0
        for gi, group in enumerate(state["param_groups"]):
            for pi, idx in enumerate(group["params"]):
                name, st = names[k], state["state"].get(idx) or {}
                k += 1
                if name in params:
                    raise ValueError(f"name {name!r} is given twice")
                read = read_bnb_entry if is_bnb_entry(st, group) else read_torch_entry
                params[name] = read(name, st, group, gi, pi, None)
        return cls._checked(params, "state dict", None)

    @classmethod
    def _checked(cls, params: dict[str, ParamState], source: str, live) -> AdamState:
        if not params:
            raise ValueError(f"{source} has no parameters")
        return cls(params=params, source=source, live=live)

    def check_shapes(self, shapes: Mapping[str, Sequence[int]], what: str = "the LoRA dict") -> None:
        """Names and shapes must be exactly those of ``shapes`` (e.g. the LoRA dict's); a
        ValueError names the first missing, extra or mis-shaped parameter."""
        missing = [k for k in self.params if k not in shapes]
        if missing:
            raise ValueError(f"optimizer parameter {missing[0]!r} is not in {what} "
                             f"({len(missing)} of {len(self.params)} names missing)")  # fmt: skip
        extra = [k for k in shapes if k not in self.params]
        if extra:
            raise ValueError(f"{what}: {extra[0]!r} has no optimizer state ({self.source}; "
                             f"{len(extra)} unknown names)")  # fmt: skip
        for k, ps in self.params.items():
            want = tuple(shapes[k])
            if ps.shape is not None and ps.shape != want:
                raise ValueError(f"parameter {k!r}: the optimizer state has shape {ps.shape}, "
                                 f"{what} has {want}")  # fmt: skip

    def step(
        self,
        grads: Mapping[str, Tensor],
        theta: Mapping[str, Tensor] | None = None,
        *,
        max_grad_norm: float | None = None,
        lr: float | Sequence[float] | None = None,
    ) -> NextStep:
        """The next step for ``p.grad = grads[name]`` from parameters ``theta`` (default: the
        live parameters). ``max_grad_norm``: the trainer's clip_grad_norm_ over all these
        tensors. ``lr``: None uses each group's current lr — what a torch LR scheduler has set
        for the next step, since ``scheduler.step()`` runs after ``optimizer.step()``; a float
        sets every group's lr, a sequence one lr per group (e.g. ``scheduler.get_last_lr()``).

        Raises:
            ValueError: keys or shapes differ from the state's, a non-finite gradient, a bad
                max_grad_norm or lr; naming the item.
        """
        theta = self.live if theta is None else theta
        if theta is None:
            raise ValueError("a saved optimizer state needs theta (the parameters it steps)")
        self.check_shapes({k: v.shape for k, v in grads.items()}, "grads")
        self.check_shapes({k: v.shape for k, v in theta.items()}, "theta")
        for k, g in grads.items():
            if g.shape != theta[k].shape:
                raise ValueError(f"gradient {k!r} has shape {tuple(g.shape)}, theta {tuple(theta[k].shape)}")
        lrs = group_lrs(self.params, lr)
        for k, g in grads.items():
            if not bool(torch.isfinite(g).all()):
                raise ValueError(f"gradient {k!r} has non-finite entries")
        norm, c, clipping = clip_factor(grads, max_grad_norm)
        parts = {k: adam_parts(replace(ps, lr=lrs[ps.group]), grads[k], theta[k], c)
                 for k, ps in self.params.items()}  # fmt: skip
        dtype = {k: torch.promote_types(torch.promote_types(grads[k].dtype, theta[k].dtype), torch.float32)
                 for k in parts}  # fmt: skip
        out = {name: {k: parts[k][i].to(dtype[k]) for k in parts} for i, name in enumerate(PARTS)}
        return NextStep(**out, grads=dict(grads), clip_coef=c, grad_norm=norm, clipping=clipping)


PARTS = ("delta", "gradient", "momentum", "decay", "jacobian")


def next_step(
    optimizer: torch.optim.Optimizer,
    named_params: Mapping[str, Parameter] | Iterable[tuple[str, Parameter]],
    grads: Mapping[str, Tensor],
    *,
    max_grad_norm: float | None = None,
    lr: float | Sequence[float] | None = None,
) -> dict[str, Tensor]:
    """Δθ that ``optimizer.step()`` will apply next when ``p.grad = grads[name]`` (after the
    trainer's ``clip_grad_norm_(max_grad_norm)`` when given), as a dict keyed like ``grads``.
    The parts and the Jacobian: ``AdamState.from_optimizer(optimizer, named_params).step(grads)``.
    """
    return AdamState.from_optimizer(optimizer, named_params).step(
        grads, max_grad_norm=max_grad_norm, lr=lr).delta  # fmt: skip


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
