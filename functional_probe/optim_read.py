"""Reading Adam-family optimizers into per-parameter `ParamState`s: live torch Adam/AdamW (also
inside wrappers such as accelerate's AcceleratedOptimizer) and saved torch state dicts; the
bitsandbytes side is `optim_bnb`. Any other optimizer is refused naming its real class.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

SUPPORTED = ("torch.optim.Adam, torch.optim.AdamW, bitsandbytes Adam-family (Adam, AdamW, "
             "Adam8bit, AdamW8bit, PagedAdam, PagedAdamW, PagedAdamW8bit, PagedAdamW32bit, ...)")


@dataclass(frozen=True, eq=False)
class ParamState:
    """One parameter's Adam state before the step (``m``/``v``/``v_max`` None: empty, i.e. 0)
    and its group's hyper-parameters. ``step`` = steps taken so far (0 before the first)."""

    shape: tuple[int, ...]
    m: Tensor | None
    v: Tensor | None
    v_max: Tensor | None
    step: int
    group: int
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    decoupled: bool
    amsgrad: bool = False
    maximize: bool = False


def unwrap_optimizer(optimizer: Any) -> tuple[Any, list[str]]:
    """The optimizer inside wrappers that keep it as ``.optimizer`` (accelerate's
    AcceleratedOptimizer, ...), and the wrapper class names."""
    wrapped = []
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        wrapped.append(type(optimizer).__name__)
        optimizer = optimizer.optimizer
    return optimizer, wrapped


def describe(opt: Any, wrapped: Sequence[str]) -> str:
    cls = type(opt)
    inside = f" inside {' inside '.join(reversed(wrapped))}" if wrapped else ""
    return f"optimizer {cls.__name__} ({cls.__module__}.{cls.__qualname__}){inside}"


def state_reader(opt: Any, kind: str):
    """The per-parameter reader for a supported optimizer; ValueError naming the real class."""
    if type(opt) in (torch.optim.Adam, torch.optim.AdamW):
        return read_torch_entry
    if type(opt).__module__.startswith("bitsandbytes"):
        from .optim_bnb import bnb_reader  # here, not at the top: optim_bnb imports this module

        reader = bnb_reader(opt, kind)
        if reader is not None:
            return reader
    raise ValueError(f"{kind} is not supported: its step is not reproduced (supported: {SUPPORTED})")


def names_by_id(named_params) -> dict[int, str]:
    pairs = list(named_params.items() if isinstance(named_params, Mapping) else named_params)
    by_id: dict[int, str] = {}
    for name, p in pairs:
        if id(p) in by_id:
            raise ValueError(f"parameters {by_id[id(p)]!r} and {name!r} are the same tensor")
        by_id[id(p)] = name
    return by_id


def hyper(group: Mapping[str, Any], gi: int, name: str, key: str) -> Any:
    if key not in group:
        raise ValueError(f"param group {gi} (parameter {name!r}) has no {key!r}: not an Adam-family "
                         "optimizer")  # fmt: skip
    return group[key]


def group_fields(group: Mapping[str, Any], gi: int, name: str) -> dict[str, Any]:
    """lr, betas, eps, weight_decay of a param group as floats, checked finite."""
    beta1, beta2 = (float(b) for b in hyper(group, gi, name, "betas")[:2])
    out = dict(lr=float(hyper(group, gi, name, "lr")), beta1=beta1, beta2=beta2,
               eps=float(hyper(group, gi, name, "eps")), weight_decay=float(group.get("weight_decay", 0.0)))  # fmt: skip
    bad = [k for k, x in out.items() if not math.isfinite(x)]
    if bad:
        raise ValueError(f"param group {gi} has {bad[0]} = {out[bad[0]]}")
    return out


def read_torch_entry(name: str, st: Mapping[str, Any], group: Mapping[str, Any], gi: int, pi: int,
                     shape: tuple[int, ...] | None) -> ParamState:  # fmt: skip
    """ParamState of a torch Adam/AdamW parameter (``shape`` None: from the saved tensors)."""
    f = group_fields(group, gi, name)
    amsgrad = bool(group.get("amsgrad", False))
    decoupled = group.get("decoupled_weight_decay")
    if decoupled is None and f["weight_decay"]:
        raise ValueError(f"param group {gi} has weight_decay {f['weight_decay']} but no "
                         "'decoupled_weight_decay' flag: cannot tell Adam (L2) from AdamW")  # fmt: skip
    if not st:
        return ParamState(shape=shape, m=None, v=None, v_max=None, step=0, group=gi, amsgrad=amsgrad,
                          maximize=bool(group.get("maximize", False)), decoupled=bool(decoupled), **f)  # fmt: skip
    keys = ["exp_avg", "exp_avg_sq", "step"] + (["max_exp_avg_sq"] if amsgrad else [])
    lost = [k for k in keys if k not in st]
    if lost:
        raise ValueError(f"parameter {name!r} state has no {lost[0]!r} (keys: {sorted(st)}): not a "
                         "torch Adam/AdamW state")  # fmt: skip
    tensors = {k: st[k].detach().clone() for k in keys[:2] + keys[3:]}  # a snapshot: step() updates in place
    shapes = {tuple(t.shape) for t in tensors.values()} | ({shape} if shape is not None else set())
    if len(shapes) != 1:
        raise ValueError(f"parameter {name!r}: state tensors have shapes {sorted(shapes)}, expected one shape")
    return ParamState(
        shape=shapes.pop(), m=tensors["exp_avg"], v=tensors["exp_avg_sq"], v_max=tensors.get("max_exp_avg_sq"),
        step=step_count(name, st["step"]), group=gi, amsgrad=amsgrad,
        maximize=bool(group.get("maximize", False)), decoupled=bool(decoupled), **f,
    )  # fmt: skip


def step_count(name: str, step: Any) -> int:
    t = float(step)  # int or 0-d tensor
    if t < 0 or t != int(t):
        raise ValueError(f"parameter {name!r} has step {t:g}; expected a whole number >= 0")
    return int(t)
