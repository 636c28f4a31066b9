"""Convert a live `peft.PeftModel` (fp32/bf16 or bitsandbytes 4-bit base) into a FunctionalModel."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from ..nf4 import NF4Linear
from .adapter import LoraSpec, check_lora_config
from .functional import FunctionalModel
from .layers import DenseLinear
from .loading import build_model, resolve_dtype

WRAPPER_ATTRIBUTES = ("module", "_orig_mod")  # DDP / FSDP-style wrappers; torch.compile


def unwrap_peft(model: nn.Module):
    """Strip DistributedDataParallel / FSDP-style `.module` and torch.compile `._orig_mod`
    wrappers; require a PeftModel."""
    from peft import PeftModel

    given = type(model).__name__
    while not isinstance(model, PeftModel):
        inner = next(
            (m for a in WRAPPER_ATTRIBUTES if isinstance(m := getattr(model, a, None), nn.Module)),
            None,
        )
        if inner is None:
            break
        model = inner
    if not isinstance(model, PeftModel):
        inside = "" if type(model).__name__ == given else f" (inside {given})"
        raise ValueError(
            f"expected a peft.PeftModel (optionally wrapped in DDP or torch.compile), got "
            f"{type(model).__name__}{inside}: a plain model, or one returned by "
            "merge_and_unload(), which has no LoRA tensors left to differentiate"
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
        if module.disable_adapters:
            raise ValueError(
                f"{path}: adapters are disabled (disable_adapter_layers / disable_adapter()); the "
                "live model does not use its LoRA, so a probe of it would measure another model"
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


def from_peft(peft_model: nn.Module, *, dtype: torch.dtype | str | None = None) -> FunctionalModel:
    """A FunctionalModel with the same weights as `peft_model` and keys of its LoRA parameters.

    `bitsandbytes.nn.Linear4bit` base layers (NF4, double quantization) become `NF4Linear`
    holding the same packed bytes; other linears are copied dense.

    `dtype=None` (default) keeps the PeftModel's dtypes: frozen tensors as stored (the compute
    dtype is the embeddings' dtype), LoRA factors as stored (fp32 on a bf16 base when PEFT's
    autocast_adapter_dtype was on), each 4-bit layer computing in its own compute_dtype. A
    dtype (or its name) casts the frozen tensors and the 4-bit compute to it, and the LoRA
    factors to it as well, except fp32 for bf16/fp16 (PEFT's autocast_adapter_dtype).
    Everything stays on the LoRA factors' device.
    """
    import bitsandbytes as bnb
    from peft.tuners.lora import LoraLayer

    dtype = None if dtype is None else resolve_dtype(dtype)
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
        if t is not None and not t.is_floating_point():
            # e.g. a 4-bit lm_head (llm_int8_skip_modules without 'lm_head'): casting the
            # packed codes to floats would give garbage weights.
            raise ValueError(
                f"{name} is stored quantized ({type(t).__name__}, {t.dtype}); only the "
                "decoder's projections may be 4-bit (keep 'lm_head' in llm_int8_skip_modules)"
            )
        return None if t is None else t.detach()

    repacked: list[tuple[str, str]] = []

    def frozen_linear(path: str) -> nn.Module:
        layer = base.get_submodule(path)
        if isinstance(layer, LoraLayer):
            layer = layer.get_base_layer()
        if isinstance(layer, bnb.nn.Linear4bit):
            compute = dtype or layer.compute_dtype or named["model.embed_tokens.weight"].dtype
            return nf4_from_bnb(path, layer, compute, repacked)
        # bnb's Linear8bitLt (and other quantized layers) subclass nn.Linear: their integer
        # weights cast to floats without their scales would be silently wrong.
        if not isinstance(layer, nn.Linear) or not layer.weight.is_floating_point():
            raise ValueError(
                f"{path}: base layer {type(layer).__name__} with {layer.weight.dtype} weights "
                "is not supported; supported bases are full precision (nn.Linear) and "
                "bitsandbytes 4-bit NF4 (Linear4bit)"
            )
        weight, bias = layer.weight.detach(), layer.bias
        bias = None if bias is None else bias.detach().to(dtype=dtype or weight.dtype, copy=True)
        return DenseLinear(weight.to(dtype=dtype or weight.dtype, copy=True), bias)

    functional = build_model(base.config, tensors, frozen_linear, lora, dtype=dtype, device=device)
    if repacked:
        names = ", ".join(p for p, _ in repacked[:3]) + (", ..." if len(repacked) > 3 else "")
        warnings.warn(
            f"from_peft: {len(repacked)} 4-bit base layer(s) ({names}) were repacked by "
            f"bitsandbytes before conversion; first of them: {repacked[0][1]}",
            UserWarning,
            stacklevel=2,
        )
    return functional


def nf4_from_bnb(
    path: str, layer: nn.Module, dtype: torch.dtype, repacked: list[tuple[str, str]]
) -> NF4Linear:
    """`NF4Linear.from_bnb`, with its per-layer "repacked" warning collected into `repacked`
    (from_peft issues one warning naming the layers, at the caller's line)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = NF4Linear.from_bnb(layer, compute_dtype=dtype)
    for w in caught:
        if issubclass(w.category, UserWarning) and "repacked by bitsandbytes" in str(w.message):
            repacked.append((path, str(w.message)))
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return out
