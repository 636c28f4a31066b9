"""`AdamState`: an Adam-family optimizer's state matched to parameter names, and its next step.

The state is read from a live optimizer (parameters matched by identity) or a saved state_dict
(names in param-group order) into per-parameter ``ParamState``s (``optim_read`` for torch,
``optim_bnb`` for bitsandbytes); :meth:`AdamState.step` applies the update rule of
``optim_update`` (Δθ, its parts, its Jacobian: a ``NextStep``) to given gradients. Everything is
computed in float64 and returned in ``promote(g, θ, float32)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor
from torch.nn import Parameter

from .optim_bnb import is_bnb_entry, read_bnb_entry
from .optim_read import ParamState, describe, names_by_id, read_torch_entry, state_reader, unwrap_optimizer
from .optim_update import PARTS, NextStep, adam_parts, clip_factor, group_lrs

__all__ = ["AdamState", "ParamState", "next_step"]


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
