"""An optimizer state_dict's positions matched to the adapter's parameter names.

A state_dict lists parameters by position (``param_groups[k]["params"]``, ``state[i]``).
:func:`by_name` matches names the state carries to the adapter's, in any order, each exactly
once; :func:`by_position` names position i ``names[i]`` and checks the count and every shape
(a same-shape permutation cannot be seen, so it says which order was assumed). Both return an
:class:`OptimizerState`; optimizer_state.py decides which applies to a file.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

# prefixes that wrappers add to parameter names: DDP / DeepSpeed, torch.compile
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


@dataclass(frozen=True)
class OptimizerState:
    """A validated optimizer state_dict with one adapter parameter name per position.

    Attributes:
        state_dict: ``optimizer.state_dict()`` as saved (``state``, ``param_groups``).
        names: ``names[i]`` = the adapter name (``model.lora`` key) of the i-th parameter in
            param-group order (group 0's ``params`` first).
        lr: the lr of the next step, param group 0 (the scheduler's, for a checkpoint), 1/step.
        order: one line saying how positions were matched to names.
    """

    state_dict: dict
    names: list[str]
    lr: float
    order: str

    def preconditioner(self):
        """``AdamPreconditioner.from_state_dict(state_dict, names)``."""
        from .precondition import AdamPreconditioner

        return AdamPreconditioner.from_state_dict(self.state_dict, self.names)


def state_lr(state: Mapping[str, Any], path: Path) -> float:
    lr = float(state["param_groups"][0]["lr"])  # may be a 0-d tensor
    if not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"{path}: param group 0 has lr = {lr}: the next step moves nothing (the end of a "
                         "decaying schedule?); probe an earlier checkpoint")  # fmt: skip
    return lr


def param_shape(entry: Mapping[str, Any] | None) -> tuple[int, ...] | None:
    """The shape of a parameter from its per-parameter state (Adam's moments), None if unknown."""
    for key in ("exp_avg_sq", "exp_avg", "state2", "state1"):
        if entry and isinstance(entry.get(key), Tensor):
            return tuple(entry[key].shape)
    return None


def indices(state: Mapping[str, Any]) -> list[Any]:
    return [i for g in state["param_groups"] for i in g["params"]]


def strip_wrappers(name: str) -> str:
    while name.startswith(WRAPPER_PREFIXES):
        name = name.split(".", 1)[1]
    return name


def by_name(state, names, shapes: dict[str, tuple[int, ...]], path: Path, source: str) -> OptimizerState:
    """Match the state's own names to the adapter's; any order, every name exactly once."""
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{path}: {source} must be a list of strings")
    names = [strip_wrappers(n) for n in names]
    idx = indices(state)
    if len(names) != len(idx):
        raise ValueError(f"{path}: {len(names)} names for {len(idx)} parameters in the param groups")
    dup = [n for n, c in Counter(names).items() if c > 1]
    if dup:
        raise ValueError(f"{path}: parameter name {dup[0]!r} appears {names.count(dup[0])} times")
    unknown = [n for n in names if n not in shapes]
    if unknown:
        raise ValueError(f"{path}: the state has {unknown[0]!r}, which is not a parameter of the adapter "
                         f"(e.g. {next(iter(shapes))!r}); {len(unknown)} such names")  # fmt: skip
    missing = [n for n in shapes if n not in set(names)]
    if missing:
        raise ValueError(f"{path}: the adapter's {missing[0]!r} has no entry in the state "
                         f"({len(missing)} of {len(shapes)} missing)")  # fmt: skip
    for name, i in zip(names, idx, strict=True):
        check_shape(state, i, name, shapes[name], path)
    permuted = names != list(shapes)
    order = f"{path}: matched by name ({source})" + (
        "; the state lists the parameters in another order than the adapter" if permuted else ""
    )
    return OptimizerState(dict(state), names, state_lr(state, path), order)


def by_position(state, names: list[str], shapes: dict[str, tuple[int, ...]], path: Path,
                order: str) -> OptimizerState:  # fmt: skip
    """Position i of the state is ``names[i]``: counts and every shape must agree."""
    idx = indices(state)
    if len(idx) != len(names):
        raise ValueError(f"{path}: the state holds {len(idx)} parameters, the adapter {len(names)}: "
                         "the state is for another adapter")  # fmt: skip
    got = [param_shape(state["state"].get(i)) for i in idx]
    for k, (name, shape) in enumerate(zip(names, got, strict=True)):
        if shape is not None and shape != shapes[name]:
            same_set = Counter(s for s in got if s is not None) == Counter(shapes[n] for n in names)
            why = ("the same shapes in another order: the state's parameters are not in the adapter's "
                   "named_parameters() order; save it with names (save_optimizer_state) or pass the "
                   "Trainer checkpoint directory" if same_set else "the state is for another adapter")  # fmt: skip
            raise ValueError(f"{path}: state position {k} has shape {list(shape)}, the adapter's "
                             f"{name!r} is {list(shapes[name])}: {why}")  # fmt: skip
    return OptimizerState(dict(state), list(names), state_lr(state, path), order)


def check_shape(state, i, name: str, shape: tuple[int, ...], path: Path) -> None:
    got = param_shape(state["state"].get(i))
    if got is not None and got != shape:
        raise ValueError(f"{path}: the state of {name!r} has shape {list(got)}, the adapter's is {list(shape)}")
