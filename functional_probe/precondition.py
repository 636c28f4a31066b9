"""Adam's diagonal preconditioner, read from a live optimizer or from its saved state dict.

For a parameter tensor with second-moment estimate ``v = exp_avg_sq`` (``max_exp_avg_sq``
under AMSGrad), step count ``t`` and group hyper-parameters ``(β1, β2), ε, lr_g``::

    denom = sqrt(v) / sqrt(1 − β2^t) + ε          (the op order of torch.optim.Adam)
    P(g)  = (lr_g / lr_0) · g / denom               elementwise, lr_0 = first group's lr

so ``η · P(g)`` with ``η = lr_0`` is the step each group takes for a gradient whose
first moment is ``g`` (LoRA+ style groups with a larger lr get their part scaled up).
``P`` excludes momentum (``exp_avg``), the first-moment bias correction ``1 − β1^t``, and
weight decay; it is the ``P`` of the design's ``Y_p = P(∇θ Ly[p])``. It is diagonal and
positive, hence self-adjoint: ``<P(a), b> = <a, P(b)>``. This is the seed's approximation of
the step (``probe(..., step="preconditioned")``); the step the optimizer really takes, with this
batch's g² in v, momentum, decay and clipping, is ``optim_step.AdamState.step``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.nn import Parameter

from .optim_step import AdamState

__all__ = ["AdamPreconditioner"]

@dataclass(frozen=True, eq=False)  # eq on dicts of tensors would be ambiguous
class AdamPreconditioner:
    """``P(g) = (lr_g / lr_0) · g / (sqrt(v) / sqrt(1 − β2^t) + ε)``, per tensor, per group.

    Attributes:
        denom: name -> ``sqrt(v) / sqrt(1 − β2^t) + ε``, shaped like the parameter, in
            float32 or wider (float64 if the state is float64), on the state's device.
        scale: name -> ``lr_g / lr_0`` of the parameter's group (1.0 in the first group).
        lr: ``lr_0``, the first param group's learning rate: the ``η`` of ``η · P(g)``.

    Build it with :meth:`from_optimizer` or :meth:`from_state_dict`; call it on a dict of
    gradients with exactly the same names and shapes.
    """

    denom: dict[str, Tensor]
    scale: dict[str, float]
    lr: float

    @property
    def names(self) -> tuple[str, ...]:
        """Parameter names, in optimizer order."""
        return tuple(self.denom)

    def __call__(self, grads: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Apply ``P`` to a dict of gradients: a new dict, same keys, shapes and dtypes.

        Each ``g`` is divided by its ``denom`` (moved to ``g``'s device) in
        ``promote(g.dtype, denom.dtype)`` and cast back to ``g.dtype``.

        Raises:
            ValueError: naming the first missing key, extra key, or shape mismatch.
        """
        missing = [k for k in self.denom if k not in grads]
        if missing:
            raise ValueError(f"gradient for parameter {missing[0]!r} is missing "
                             f"({len(missing)} of {len(self.denom)} names missing)")
        extra = [k for k in grads if k not in self.denom]
        if extra:
            raise ValueError(f"gradient {extra[0]!r} has no Adam state in the preconditioner "
                             f"({len(extra)} unknown names)")
        out: dict[str, Tensor] = {}
        for name, d in self.denom.items():
            g = grads[name]
            if tuple(g.shape) != tuple(d.shape):
                raise ValueError(f"gradient {name!r} has shape {tuple(g.shape)}, "
                                 f"the parameter's Adam state has {tuple(d.shape)}")
            d = d.to(g.device)
            work = torch.promote_types(g.dtype, d.dtype)
            p = g.to(work) / d.to(work)
            s = self.scale[name]
            if s != 1.0:
                p = p * s
            out[name] = p.to(g.dtype)
        return out

    @classmethod
    def from_optimizer(
        cls,
        optimizer: torch.optim.Optimizer,
        named_params: Mapping[str, Parameter] | Iterable[tuple[str, Parameter]],
    ) -> AdamPreconditioner:
        """Read ``P`` from a live Adam/AdamW that has stepped at least once.

        Args:
            optimizer: a ``torch.optim.Adam``/``AdamW`` or a bitsandbytes Adam-family optimizer
                (8-bit states dequantized), also inside accelerate's ``AcceleratedOptimizer``;
                read by :meth:`AdamState.from_optimizer`, which refuses any other optimizer
                naming its real class.
            named_params: name -> the Parameter object the optimizer steps (e.g.
                ``model.named_parameters()``). Names not in the optimizer are ignored;
                every optimizer parameter must have a name.

        Raises:
            ValueError: the optimizer is not supported (naming its real class), a parameter
                has no name or no state, or its step is 0; the message names the parameter.
        """
        return cls.from_adam_state(AdamState.from_optimizer(optimizer, named_params))

    @classmethod
    def from_adam_state(cls, state: AdamState) -> AdamPreconditioner:
        """``P`` from an :class:`AdamState` (live torch or bitsandbytes optimizer, or saved)."""
        lr0 = _nonzero_lr0(next(iter(state.params.values())).lr)
        denom: dict[str, Tensor] = {}
        scale: dict[str, float] = {}
        for name, ps in state.params.items():
            if ps.v is None:
                raise ValueError(f"parameter {name!r} has no Adam state: has the optimizer stepped?")
            if ps.step <= 0:
                raise ValueError(f"parameter {name!r} has Adam step {ps.step:g}: the optimizer has not stepped")
            v = ps.v_max if ps.amsgrad else ps.v
            work = torch.promote_types(v.dtype, torch.float32)
            denom[name] = (v.to(work).sqrt() / math.sqrt(1.0 - ps.beta2**ps.step)).add_(ps.eps)
            scale[name] = ps.lr / lr0
        return cls(denom=denom, scale=scale, lr=lr0)

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any], names: Sequence[str]) -> AdamPreconditioner:
        """Read ``P`` from ``optimizer.state_dict()`` (live, or after torch.save/torch.load).

        Args:
            state: ``{"state": {index: {...}}, "param_groups": [{"params": [index, ...],
                "lr", "betas", "eps", ...}]}``.
            names: one name per parameter, in the order the param groups list them
                (group 0's ``params`` first, then group 1's, ...).

        Raises:
            ValueError: malformed dict, ``len(names)`` different from the number of
                parameters, missing state, step 0, or a non-Adam state; naming the item.
        """
        if not isinstance(state, Mapping) or "state" not in state or "param_groups" not in state:
            raise ValueError("state must be an optimizer.state_dict() with keys "
                             "'state' and 'param_groups'")
        names = list(names)
        indices = [i for g in state["param_groups"] for i in g["params"]]
        if len(names) != len(indices):
            raise ValueError(f"got {len(names)} names for {len(indices)} parameters in the "
                             "state dict's param groups")
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise ValueError(f"name {dup!r} is given twice")
        per_param = state["state"]
        entries = []
        k = 0
        for gi, group in enumerate(state["param_groups"]):
            for idx in group["params"]:
                entries.append((names[k], per_param.get(idx), group, gi))
                k += 1
        return cls._build(entries, source="state dict")

    @classmethod
    def _build(
        cls,
        entries: Sequence[tuple[str, Mapping[str, Any] | None, Mapping[str, Any], int]],
        source: str,
    ) -> AdamPreconditioner:
        if not entries:
            raise ValueError(f"{source} has no parameters")
        lr0 = _nonzero_lr0(_group_lr(entries[0][2], entries[0][3]))
        denom: dict[str, Tensor] = {}
        scale: dict[str, float] = {}
        for name, st, group, gi in entries:
            for key in ("betas", "eps"):
                if key not in group:
                    raise ValueError(f"{source} is not Adam/AdamW-like: param group {gi} has no "
                                     f"{key!r} (parameter {name!r})")
            if name in denom:
                raise ValueError(f"name {name!r} is given twice")
            denom[name] = _denominator(name, st, group)
            scale[name] = _group_lr(group, gi) / lr0
        return cls(denom=denom, scale=scale, lr=lr0)


def _nonzero_lr0(lr0: float) -> float:
    if lr0 == 0.0:
        raise ValueError("param group 0 has lr = 0; cannot express other groups' steps as multiples of it")
    return lr0


def _group_lr(group: Mapping[str, Any], gi: int) -> float:
    if "lr" not in group:
        raise ValueError(f"param group {gi} has no 'lr'")
    lr = float(group["lr"])  # may be a tensor
    if not math.isfinite(lr):
        raise ValueError(f"param group {gi} has lr = {lr}")
    return lr


def _denominator(name: str, st: Mapping[str, Any] | None, group: Mapping[str, Any]) -> Tensor:
    """``sqrt(v) / sqrt(1 − β2^t) + ε`` for one parameter, float32 or wider."""
    if not st:
        raise ValueError(f"parameter {name!r} has no Adam state: has the optimizer stepped?")
    key = "max_exp_avg_sq" if group.get("amsgrad", False) else "exp_avg_sq"
    if key not in st or "step" not in st:
        raise ValueError(f"parameter {name!r} state has no {key!r}/'step' (keys: "
                         f"{sorted(st)}): the optimizer is not Adam/AdamW-like")
    v = st[key]
    if not isinstance(v, Tensor) or v.is_complex():
        raise ValueError(f"parameter {name!r}: {key} must be a real tensor")
    step = float(st["step"])  # int or 0-d tensor
    if step <= 0:
        raise ValueError(f"parameter {name!r} has Adam step {step:g}: the optimizer has "
                         "not stepped")
    beta2 = float(group["betas"][1])
    eps = float(group["eps"])
    bc2_sqrt = math.sqrt(1.0 - beta2**step)
    work = torch.promote_types(v.dtype, torch.float32)
    return (v.detach().to(work).sqrt() / bc2_sqrt).add_(eps)
