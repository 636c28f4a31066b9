"""Convert a live `peft.PeftModel` (fp32/bf16 or bitsandbytes 4-bit base) into a FunctionalModel."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..nf4 import NF4Linear
from .functional import FunctionalModel
from .layers import DenseLinear
from .loading import LoraSpec, build_model, check_lora_config


def unwrap_peft(model: nn.Module):
    """Strip DistributedDataParallel / FSDP-style `.module` wrappers; require a PeftModel."""
    from peft import PeftModel

    while not isinstance(model, PeftModel) and isinstance(
        getattr(model, "module", None), nn.Module
    ):
        model = model.module
    if not isinstance(model, PeftModel):
        raise ValueError(
            f"expected a peft.PeftModel (optionally DDP-wrapped), got {type(model).__name__}: "
            "a model returned by merge_and_unload() has no LoRA tensors left to differentiate"
        )
    return model


def lora_layers(base: nn.Module, adapter: str) -> LoraSpec:
    """Factors and scalings of every LoRA layer; merged adapters and DoRA are refused."""
    from peft.tuners.lora import LoraLayer

    factors: dict[str, tuple[Tensor, Tensor, float]] = {}
    for path, module in base.named_modules():
        if not isinstance(module, LoraLayer) or adapter not in module.lora_A:
            continue
        if module.merged:
            raise ValueError(
                f"{path}: adapter {adapter!r} is merged into the base weights (merge_adapter); "
                "unmerge it first, or the probe would differentiate a LoRA that is counted twice"
            )
        if module.use_dora.get(adapter, False):
            raise ValueError(f"{path}: DoRA adapters are not supported")
        factors[path] = (
            module.lora_A[adapter].weight.detach(),
            module.lora_B[adapter].weight.detach(),
            float(module.scaling[adapter]),
        )
    if not factors:
        raise ValueError(f"the PeftModel has no LoRA tensors for adapter {adapter!r}")
    return LoraSpec(adapter, factors)


def from_peft(peft_model: nn.Module, *, dtype: torch.dtype = torch.float32) -> FunctionalModel:
    """A FunctionalModel with the same weights as `peft_model` and keys of its LoRA parameters.

    `bitsandbytes.nn.Linear4bit` base layers (NF4, double quantization) become `NF4Linear`
    holding the same packed bytes; other linears are copied dense in `dtype`, the compute dtype.
    """
    import bitsandbytes as bnb
    from peft.tuners.lora import LoraLayer

    model = unwrap_peft(peft_model)
    adapter = model.active_adapter
    if not isinstance(adapter, str):
        raise ValueError(f"expected one active adapter, got {adapter!r}")
    check_lora_config(model.peft_config[adapter], f"adapter {adapter!r}")
    base = model.get_base_model()
    lora = lora_layers(base, adapter)
    named = dict(base.named_parameters()) | dict(base.named_buffers())
    device = next(iter(lora.factors.values()))[0].device

    def tensors(name: str) -> Tensor | None:
        t = named.get(name)
        return None if t is None else t.detach()

    def frozen_linear(path: str) -> nn.Module:
        layer = base.get_submodule(path)
        if isinstance(layer, LoraLayer):
            layer = layer.get_base_layer()
        if isinstance(layer, bnb.nn.Linear4bit):
            return NF4Linear.from_bnb(layer, compute_dtype=dtype)
        if not isinstance(layer, nn.Linear):
            raise ValueError(f"{path}: base layer {type(layer).__name__} is not supported")
        bias = None if layer.bias is None else layer.bias.detach().to(dtype=dtype, copy=True)
        return DenseLinear(layer.weight.detach().to(dtype=dtype, copy=True), bias)

    return build_model(base.config, tensors, frozen_linear, lora, dtype=dtype, device=device)
