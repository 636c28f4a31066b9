"""What an HF Trainer / TRL GRPOTrainer ``checkpoint-N/`` directory says about the next step.

A checkpoint saved by ``Trainer._save_checkpoint`` holds the PEFT adapter
(``adapter_model.safetensors``, ``adapter_config.json``), ``optimizer.pt`` (the optimizer's
state_dict, saved after ``scheduler.step()``: its groups' lr is the next step's),
``scheduler.pt``, ``trainer_state.json`` (``global_step``, ``log_history``) and
``training_args.bin`` (the pickled TrainingArguments / GRPOConfig). :func:`read_trainer_checkpoint`
reads them into a :class:`TrainerCheckpoint`: the optimizer state named by the adapter's
parameters (``optimizer_state.read_checkpoint``: Trainer.create_optimizer's two groups), the
next step's lr, the step, ``max_grad_norm`` and, for a GRPOConfig, the trainer loss
(``TrainerLoss.from_config``: loss_type, temperature, β, scale_rewards, max_completion_length,
num_iterations, ...).

``training_args.bin`` is a pickle. It is loaded with ``torch.load(weights_only=True)`` and an
allow-list: TrainingArguments and its subclasses, enums and the AcceleratorConfig /
PartialState the arguments carry, from transformers / trl / accelerate; any other global in the
file is refused by name (no arbitrary code runs).
"""

from __future__ import annotations

import enum
import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .optim_match import OptimizerState
from .optim_step import AdamState
from .optimizer_state import adapter_shapes, load_file, read_checkpoint
from .trl_config import TrainerLoss

__all__ = ["TrainerCheckpoint", "read_trainer_checkpoint", "read_training_args"]

TRUSTED_PACKAGES = ("transformers", "trl", "accelerate")
TRUSTED_CLASSES = ("transformers.trainer_pt_utils.AcceleratorConfig", "accelerate.state.PartialState")


@dataclass(frozen=True)
class TrainerCheckpoint:
    """A Trainer checkpoint, read and matched to its adapter.

    Attributes:
        path: the checkpoint-N/ directory (also the adapter directory).
        state: the optimizer state by adapter parameter name, ready for ``state.step``.
        lr: the next step's lr per param group with parameters (scheduler.pt's ``_last_lr``).
        step: ``global_step`` of trainer_state.json (the steps taken), None without the file.
        max_grad_norm: the trainer's gradient clipping (None: none, i.e. 0 or unset).
        loss: the TRL loss of a GRPOConfig; None for plain TrainingArguments.
        args: the TrainingArguments / GRPOConfig object itself.
        order: how optimizer positions were matched to names (one line, for the report).
    """

    path: Path
    state: AdamState
    lr: list[float]
    step: int | None
    max_grad_norm: float | None
    loss: TrainerLoss | None
    args: Any
    order: str


def read_trainer_checkpoint(ckpt: str | Path, *, num_processes: int | None = None) -> TrainerCheckpoint:
    """Read `ckpt` (see the module docstring). `num_processes`: the data-parallel ranks of the
    run (default: the saved arguments' ``world_size``), which dapo-style losses divide by.

    Raises ValueError naming the file: no directory / adapter / optimizer.pt / training_args.bin,
    an optimizer state that does not match the adapter, a global in training_args.bin outside
    the allow-list, a GRPOConfig option the trainer loss cannot express.
    """
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise ValueError(f"{ckpt}: not a directory; expected a Trainer checkpoint-N/ directory")
    shapes = adapter_shapes(ckpt)
    saved = read_checkpoint(ckpt, shapes)
    state = AdamState.from_state_dict(saved.state_dict, saved.names)
    state.check_shapes(shapes, f"{ckpt}'s adapter")
    args = read_training_args(ckpt / "training_args.bin")
    loss = None
    if hasattr(args, "loss_type") and hasattr(args, "num_generations"):  # a GRPOConfig
        loss = TrainerLoss.from_config(args, num_processes=num_processes)
    clip = getattr(args, "max_grad_norm", None)
    return TrainerCheckpoint(
        path=ckpt, state=state, lr=next_lrs(ckpt, state, saved), step=global_step(ckpt),
        max_grad_norm=float(clip) if clip else None, loss=loss, args=args, order=saved.order,
    )  # fmt: skip


def next_lrs(ckpt: Path, state: AdamState, saved: OptimizerState) -> list[float]:
    """The lr of each param group that has parameters (what ``AdamState.step(lr=...)`` takes):
    scheduler.pt's ``_last_lr`` (one per saved group), else the groups' own with group 0's
    replaced by read_checkpoint's (already checked > 0)."""
    groups = sorted({ps.group for ps in state.params.values()})
    sched = ckpt / "scheduler.pt"
    if sched.is_file():
        last = load_file(sched, "scheduler state").get("_last_lr") or []
        if len(last) == len(saved.state_dict["param_groups"]):
            return [float(last[g]) for g in groups]
    own = {ps.group: ps.lr for ps in state.params.values()}
    return [saved.lr] + [own[g] for g in groups[1:]]


def global_step(ckpt: Path) -> int | None:
    path = ckpt / "trainer_state.json"
    if not path.is_file():
        return None
    try:
        step = json.loads(path.read_text()).get("global_step")
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not JSON ({err.msg})") from None
    return int(step) if isinstance(step, int) else None


def read_training_args(path: str | Path) -> Any:
    """The TrainingArguments / GRPOConfig pickled in `path`, unpickled with weights_only=True
    and only the allow-listed classes (module docstring); ValueError naming any other global."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: not found; a Trainer checkpoint saves its arguments there")
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception as err:  # a truncated or foreign file fails in the zip or pickle layer
        raise ValueError(f"{path}: not a torch.save file ({type(err).__name__}: {err})") from None
    allowed = [trusted_global(name, path) for name in names]
    with torch.serialization.safe_globals(allowed):
        args = torch.load(path, map_location="cpu", weights_only=True)
    if not is_training_args(type(args)):
        raise ValueError(f"{path}: holds a {type(args).__name__}, not TrainingArguments")
    return args


def trusted_global(name: str, path: Path) -> type:
    """The class `name` ("module.Qualname") if it is allow-listed, else ValueError."""
    module, _, attr = name.rpartition(".")
    obj = None
    if module.split(".")[0] in TRUSTED_PACKAGES:
        try:
            obj = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError):
            pass
    if isinstance(obj, type) and (name in TRUSTED_CLASSES or issubclass(obj, enum.Enum) or is_training_args(obj)):
        return obj
    raise ValueError(f"{path}: refusing to unpickle {name}: only TrainingArguments / GRPOConfig and the "
                     f"enums and configs they hold (from {', '.join(TRUSTED_PACKAGES)}) are allowed")  # fmt: skip


def is_training_args(cls: type) -> bool:
    """TrainingArguments or a subclass (GRPOConfig, ...), told by name: no transformers import."""
    return any(c.__name__ == "TrainingArguments" and c.__module__.startswith("transformers") for c in cls.__mro__)
