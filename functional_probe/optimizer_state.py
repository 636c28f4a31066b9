"""Optimizer states matched to the adapter by parameter name, never by position alone.

An Adam state_dict lists its parameters by position (``state[i]``, ``param_groups[k]["params"]``).
Two adapters' parameters in different orders often have the same shapes, so a state read in
the wrong order passes every shape check and gives a wrong δH₁. This module reads the states
people have and returns an :class:`OptimizerState`: the state_dict and one adapter name per
state position (param-group order), what ``AdamPreconditioner.from_state_dict(state, names)``
and ``next_step`` take.

Three inputs:

1. **A state saved with its names** (:data:`NAMED_FORMAT`), written by
   :func:`save_optimizer_state`: ``torch.save({"format": NAMED_FORMAT, "names": [...],
   "state_dict": optimizer.state_dict()})``, ``names[i]`` the name of the i-th parameter in
   param-group order. A plain ``optimizer.state_dict()`` whose groups carry ``param_names``
   (an optimizer built from ``named_parameters()``, torch >= 2.6) counts as named too.
   Names are matched to the adapter's; an order different from the adapter's is fine.
2. **A Hugging Face Trainer / TRL checkpoint directory** (``checkpoint-N/``: ``optimizer.pt``,
   ``scheduler.pt``, ``trainer_state.json``, the adapter). ``Trainer.create_optimizer`` builds
   two groups from ``model.named_parameters()`` (trainable only): the weight-decay parameters,
   then the others (names matching ``bias`` or a norm); the positions are named by that rule
   and the group sizes checked against it. The lr is the scheduler's next lr.
3. **A bare optimizer.pt** (positions only): the count and every position's shape are checked
   against the adapter's parameters in ``named_parameters()`` order, the order assumed is
   stated in ``OptimizerState.order``; a permutation between same-shape tensors cannot be seen
   and is the reason to prefer 1 or 2.

Everything is read with ``torch.load(weights_only=True)`` (data, never code) and checked before
any model is loaded; errors are ValueErrors naming the file and the offending item.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.nn import Parameter

from .optim_match import OptimizerState, by_name, by_position
from .validation import check_step_size

__all__ = [
    "NAMED_FORMAT",
    "adapter_shapes",
    "check_lr",
    "read_optimizer_state",
    "save_optimizer_state",
]

NAMED_FORMAT = "functional_probe.named_optimizer_state.v1"
# transformers 5.x Trainer.get_decay_parameter_names: names matching these get no weight decay
NO_DECAY_PATTERNS = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]
LR_FACTOR = 2.0  # --lr further than this factor from the state's lr is refused unless forced
Shapes = Mapping[str, Sequence[int]]


def save_optimizer_state(
    optimizer: torch.optim.Optimizer,
    named_params: Mapping[str, Parameter] | Iterable[tuple[str, Parameter]],
    path: str | Path,
) -> None:
    """``torch.save`` the optimizer's state_dict with the name of each parameter (NAMED_FORMAT).

    Args:
        optimizer: any torch optimizer.
        named_params: name -> the Parameter it steps (e.g. ``peft_model.named_parameters()`` or
            the dict whose values were passed to the optimizer); names should be the adapter's
            (``model.lora`` keys). Parameters the optimizer does not hold are ignored.

    Raises:
        ValueError: an optimizer parameter has no name in ``named_params``.
    """
    pairs = named_params.items() if isinstance(named_params, Mapping) else named_params
    by_id = {id(p): name for name, p in pairs}
    names = []
    for gi, group in enumerate(optimizer.param_groups):
        for pi, p in enumerate(group["params"]):
            if id(p) not in by_id:
                raise ValueError(f"optimizer param group {gi}, parameter {pi} (shape {tuple(p.shape)}) "
                                 "is not in named_params")  # fmt: skip
            names.append(by_id[id(p)])
    torch.save({"format": NAMED_FORMAT, "names": names, "state_dict": optimizer.state_dict()}, path)


def read_optimizer_state(path: str | Path, expected: Shapes | Mapping[str, Tensor]) -> OptimizerState:
    """Read a named state file, a Trainer checkpoint directory or a bare optimizer.pt (see module doc).

    Args:
        path: a file or a ``checkpoint-N/`` directory.
        expected: the adapter's parameters, name -> shape (or tensor; ``model.lora`` works),
            in ``named_parameters()`` order (the order :func:`adapter_shapes` gives); a bare
            state's positions are assumed to follow it.

    Raises:
        ValueError: naming the file and what does not match (names, counts, shapes, groups).
    """
    path = Path(path)
    shapes = {k: tuple(v.shape if isinstance(v, Tensor) else v) for k, v in expected.items()}
    if path.is_dir():
        return read_checkpoint(path, shapes)
    obj = load_file(path, "optimizer state")
    if isinstance(obj, Mapping) and obj.get("format") == NAMED_FORMAT:
        state, names = obj.get("state_dict"), obj.get("names")
        check_structure(state, path)
        return by_name(state, names, shapes, path, "names saved with the state")
    check_structure(obj, path)
    groups = obj["param_groups"]
    if all("param_names" in g for g in groups):
        names = [n for g in groups for n in g["param_names"]]
        return by_name(obj, names, shapes, path, "the state's param_names")
    return by_position(obj, list(shapes), shapes, path, f"{path}: no names in the file; assumed "
                       "state position i = i-th trainable adapter parameter in named_parameters() order "
                       "(counts and shapes checked)")  # fmt: skip


def read_checkpoint(ckpt: Path, shapes: dict[str, tuple[int, ...]]) -> OptimizerState:
    """A Trainer checkpoint: positions named as Trainer.create_optimizer groups them."""
    opt_file = ckpt / "optimizer.pt"
    if not opt_file.is_file():
        raise ValueError(f"{ckpt}: no optimizer.pt: not a Trainer checkpoint directory (checkpoint-N/)")
    state = load_file(opt_file, "optimizer state")
    check_structure(state, opt_file)
    no_decay = [re.compile(p) for p in NO_DECAY_PATTERNS]
    decay = [n for n in shapes if not any(p.search(n.lower()) for p in no_decay)]
    rest = [n for n in shapes if n not in decay]
    sizes = [len(g["params"]) for g in state["param_groups"]]
    if sizes != [len(decay), len(rest)]:
        raise ValueError(f"{opt_file}: param groups of sizes {sizes}, but Trainer.create_optimizer groups the "
                         f"adapter's {len(shapes)} parameters as [{len(decay)} with weight decay, {len(rest)} "
                         "without]: a custom optimizer (LoRA+, optimizer_cls_and_kwargs) or another adapter")  # fmt: skip
    result = by_position(state, decay + rest, shapes, opt_file,
                         f"{ckpt}: positions named as transformers' Trainer.create_optimizer builds its groups "
                         f"(weight-decay parameters, then the {len(rest)} others, named_parameters() order)")  # fmt: skip
    lr, note = scheduler_lr(ckpt, result.lr)
    return OptimizerState(result.state_dict, result.names, lr, result.order + note)


def scheduler_lr(ckpt: Path, group_lr: float) -> tuple[float, str]:
    """The next step's lr: scheduler.pt's ``_last_lr[0]`` if saved, else the state's group 0 lr."""
    note = ""
    sched = ckpt / "scheduler.pt"
    lr = group_lr
    if sched.is_file():
        last = load_file(sched, "scheduler state").get("_last_lr")
        if last:
            lr = float(last[0])
            note = f"; next step's lr {lr:.6g} (scheduler.pt)"
    state_file = ckpt / "trainer_state.json"
    if state_file.is_file():
        info = json.loads(state_file.read_text())
        logged = [e["learning_rate"] for e in info.get("log_history", []) if "learning_rate" in e]
        note += f"; after global_step {info.get('global_step')}"
        if logged:
            note += f", whose learning_rate was {float(logged[-1]):.6g} (trainer_state.json)"
    if not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"{ckpt}: the scheduler's next lr is {lr}: the next step moves nothing (the end "
                         "of a decaying schedule?); probe an earlier checkpoint")  # fmt: skip
    return lr, note


def load_file(path: Path, what: str) -> Any:
    if not path.is_file():
        raise ValueError(f"{path}: {what} file not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types; all mean "not a saved state"
        raise ValueError(f"{path}: not a torch.save'd {what} ({type(err).__name__})") from err


def check_structure(state: Any, path: Path) -> None:
    """``state`` looks like ``optimizer.state_dict()``: ``state`` and ``param_groups`` with ``params``."""
    if not isinstance(state, Mapping) or "state" not in state or "param_groups" not in state:
        raise ValueError(f"{path}: not an optimizer.state_dict() (expected keys 'state' and 'param_groups')")
    for gi, group in enumerate(state["param_groups"]):
        if "params" not in group or "lr" not in group:
            raise ValueError(f"{path}: param group {gi} has no 'params' or no 'lr'")




def check_lr(lr: float | None, state_lr: float, *, force: bool = False, flag: str = "--lr") -> float:
    """The step size to probe at: ``lr`` checked against the state's, or the state's if None.

    Raises:
        ValueError: ``lr`` not finite and > 0, or further than a factor LR_FACTOR from
            ``state_lr`` (unless ``force``): the probe would describe a step nobody takes.
    """
    if lr is None:
        return state_lr
    check_step_size(lr, flag)
    if not force and not state_lr / LR_FACTOR <= lr <= state_lr * LR_FACTOR:
        raise ValueError(f"{flag} {lr:g} is {lr / state_lr:.3g}x the optimizer state's lr {state_lr:g} "
                         "(param group 0): omit it to use the state's, or pass --force-lr")  # fmt: skip
    return float(lr)


_ADAPTER_FILE_KEY = re.compile(
    r"^base_model\.model\.model\.layers\.(?P<layer>\d+)\.(?P<block>self_attn|mlp)\.(?P<proj>\w+)"
    r"\.lora_(?P<ab>[AB])(\.\w+)?\.weight$"
)


def adapter_shapes(adapter_dir: str | Path, adapter_name: str = "default") -> dict[str, tuple[int, ...]]:
    """The LoRA factors' names (``model.lora`` keys) and shapes from a PEFT adapter's weight
    file, without reading the tensors, in ``named_parameters()`` order (layer, then projection
    in module order q, k, v, o, gate, up, down, then lora_A before lora_B).

    Raises:
        ValueError: no such directory, no weights file, or a key that is not a LoRA factor.
    """
    from safetensors import safe_open

    from .model.decoder import PROJECTIONS

    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise ValueError(f"{adapter_dir}: no such adapter directory")
    weights = adapter_dir / "adapter_model.safetensors"
    if not weights.is_file():
        raise ValueError(f"{adapter_dir}: no adapter_model.safetensors: not a PEFT adapter directory")
    entries = []
    with safe_open(str(weights), "pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a Mapping)
            m = _ADAPTER_FILE_KEY.match(key)
            if m is None or m["proj"] not in PROJECTIONS:
                raise ValueError(f"{weights}: tensor {key!r} is not a LoRA factor of a Llama-family projection")
            name = (f"base_model.model.model.layers.{m['layer']}.{m['block']}.{m['proj']}"
                    f".lora_{m['ab']}.{adapter_name}.weight")  # fmt: skip
            rank = (int(m["layer"]), PROJECTIONS.index(m["proj"]), m["ab"])
            entries.append((rank, name, tuple(f.get_slice(key).get_shape())))
    return {name: shape for _, name, shape in sorted(entries)}
