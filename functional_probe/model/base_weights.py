"""The base model's tensors: a lazy safetensors reader and the frozen linears built from it.

safetensors streams the checkpoint one tensor at a time, so with `quantize="nf4"` each base
linear is quantized as it is read and no full-precision copy of all of them ever exists.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor, nn

from ..nf4 import NF4Linear
from .layers import DenseLinear


def required(tensors: Callable[[str], Tensor | None], name: str) -> Tensor:
    t = tensors(name)
    if t is None:
        raise ValueError(f"checkpoint has no tensor {name!r}")
    return t


def checkpoint_reader(base_dir: Path) -> Callable[[str], Tensor | None]:
    """Lazy reader of a safetensors checkpoint (single file or sharded with an index)."""
    index = base_dir / "model.safetensors.index.json"
    single = base_dir / "model.safetensors"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = {name: base_dir / f for name, f in weight_map.items()}
    elif single.is_file():
        with safe_open(single, framework="pt") as f:
            files = dict.fromkeys(f.keys(), single)
    else:
        raise ValueError(
            f"{base_dir} has neither model.safetensors nor model.safetensors.index.json; "
            "save the base model with save_pretrained(safe_serialization=True)"
        )

    def read(name: str) -> Tensor | None:
        if name not in files:
            return None
        with safe_open(files[name], framework="pt") as f:
            return f.get_tensor(name)

    return read


def dense_or_nf4(
    tensors: Callable[[str], Tensor | None],
    quantize: str | None,
    dtype: torch.dtype,
    device: str | torch.device,
) -> Callable[[str], nn.Module]:
    """Frozen-linear factory over a checkpoint: reads W (and b) and keeps them dense or NF4.

    W is cast to `dtype` first, so NF4 is quantized in the requested dtype, as transformers +
    bitsandbytes do (a bf16 checkpoint loaded with dtype=float32 gets a float32 quant state).
    """

    def make(path: str) -> nn.Module:
        weight = required(tensors, f"{path}.weight").to(device=device, dtype=dtype)
        bias = tensors(f"{path}.bias")
        bias = None if bias is None else bias.to(device=device, dtype=dtype)
        if quantize == "nf4":
            return NF4Linear.from_weight(weight, bias, compute_dtype=dtype)
        return DenseLinear(weight, bias)

    return make
