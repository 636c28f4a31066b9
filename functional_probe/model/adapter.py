"""The LoRA side of a model: which projections carry factors, and where the factors come from.

`LoraSpec` holds (A, B, scaling) per HF module path; `read_adapter` reads them from a PEFT
adapter directory, `fresh_lora` draws a new PEFT-style adapter, and `check_lora_fits` /
`check_lora_config` refuse adapters the decoder cannot model before any base tensor is read.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from .decoder import PROJECTIONS, DecoderConfig

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
_LAYER_PATH = re.compile(r"^model\.layers\.(?P<layer>\d+)\.(self_attn|mlp)\.(?P<proj>\w+)$")


@dataclass(frozen=True)
class LoraSpec:
    """LoRA factors keyed by the module path in the HF model ('model.layers.0.self_attn.q_proj'):
    (A [r, in], B [out, r], scaling). `source` names where they come from and the model they
    were made for (adapter_config.json's base_model_name_or_path), for error messages."""

    adapter_name: str
    factors: dict[str, tuple[Tensor, Tensor, float]]
    source: str = "the LoRA"


def module_path(layer: int, projection: str) -> str:
    """HF module path of a projection: 'model.layers.{i}.self_attn.q_proj' or '....mlp.up_proj'."""
    group = "self_attn" if projection in ATTENTION_PROJECTIONS else "mlp"
    return f"model.layers.{layer}.{group}.{projection}"


def linear_shapes(cfg: DecoderConfig) -> dict[str, tuple[int, int]]:
    """[out, in] of each projection."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return {
        "q_proj": (q, d), "k_proj": (kv, d), "v_proj": (kv, d), "o_proj": (d, q),
        "gate_proj": (f, d), "up_proj": (f, d), "down_proj": (d, f),
    }  # fmt: skip


def check_lora_fits(lora: LoraSpec, cfg: DecoderConfig) -> None:
    """ValueError naming the first LoRA module that is not a projection of this decoder, or
    whose factors do not fit its [out, in] (an adapter made for another model)."""
    shapes = linear_shapes(cfg)
    for path, (a, b, _) in lora.factors.items():
        m = _LAYER_PATH.match(path)
        if m is None or m["proj"] not in PROJECTIONS or module_path(int(m["layer"]), m["proj"]) != path:
            raise ValueError(
                f"{lora.source} targets module {path!r}, which is not one of the decoder's "
                f"projections {PROJECTIONS}; adapters on embeddings or the head are not supported"
            )
        if int(m["layer"]) >= cfg.num_layers:
            raise ValueError(
                f"{lora.source} targets {path!r}, but this base has {cfg.num_layers} layers: the "
                "adapter was made for another model"
            )
        out_f, in_f = shapes[m["proj"]]
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != in_f or b.shape[0] != out_f:
            raise ValueError(
                f"{lora.source} does not fit this base at {path!r}: lora_A {tuple(a.shape)}, "
                f"lora_B {tuple(b.shape)}, where this base's linear is [out={out_f}, in={in_f}] "
                f"(expected lora_A (r, {in_f}), lora_B ({out_f}, r)): the adapter was made for "
                "another model"
            )
        if a.shape[0] != b.shape[1]:
            raise ValueError(
                f"{lora.source}: {path!r} has lora_A of rank {a.shape[0]} and lora_B of rank "
                f"{b.shape[1]}; expected equal ranks"
            )


def fresh_lora(
    hf_config,
    *,
    r: int,
    lora_alpha: float,
    target_modules: Sequence[str],
    init: str,
    seed: int,
) -> LoraSpec:
    """PEFT-style new adapter: A ~ kaiming-uniform (bound 1/√in), B = 0 (init="peft"), or B
    drawn like A (init="random", so every gradient is non-zero from the start)."""
    if init not in ("peft", "random"):
        raise ValueError(f"init={init!r}; expected 'peft' or 'random'")
    bad = [m for m in target_modules if m not in PROJECTIONS]
    if bad:
        raise ValueError(f"target module {bad[0]!r} is not one of {PROJECTIONS}")
    if r <= 0:
        raise ValueError(f"LoRA rank r={r}; expected a positive integer")
    cfg = DecoderConfig.from_hf(hf_config)
    shapes = linear_shapes(cfg)
    gen = torch.Generator().manual_seed(seed)
    factors = {}
    for i in range(cfg.num_layers):
        for proj in target_modules:
            out_f, in_f = shapes[proj]
            a = (torch.rand(r, in_f, generator=gen) * 2 - 1) / math.sqrt(in_f)
            b = torch.zeros(out_f, r)
            if init == "random":
                b = (torch.rand(out_f, r, generator=gen) * 2 - 1) / math.sqrt(r)
            factors[module_path(i, proj)] = (a, b, lora_alpha / r)
    return LoraSpec("default", factors)


_ADAPTER_KEY = re.compile(r"^base_model\.model\.(?P<path>.+)\.lora_(?P<ab>[AB])(\.\w+)?\.weight$")


def read_adapter(adapter_dir: Path) -> LoraSpec:
    """LoRA factors and scalings of a PEFT adapter directory (adapter_config.json + weights)."""
    from peft import PeftConfig
    from peft.utils import load_peft_weights
    from peft.utils.other import get_pattern_key

    require_directory(adapter_dir, "adapter directory")
    config_file = adapter_dir / "adapter_config.json"
    if not config_file.is_file():
        raise ValueError(f"{adapter_dir} has no adapter_config.json: not a PEFT adapter directory")
    try:
        config = PeftConfig.from_pretrained(str(adapter_dir))
    except (ValueError, TypeError, KeyError) as e:  # JSONDecodeError is a ValueError
        raise ValueError(f"{config_file} is not a valid PEFT adapter config: {e}") from e
    check_lora_config(config, str(adapter_dir))
    if not any((adapter_dir / f).is_file() for f in ADAPTER_WEIGHT_FILES):
        raise ValueError(
            f"{adapter_dir} has adapter_config.json but no {' or '.join(ADAPTER_WEIGHT_FILES)}"
        )
    made_for = config.base_model_name_or_path
    source = f"adapter {str(adapter_dir)!r} (" + (
        f"made for base_model_name_or_path={made_for!r})" if made_for
        else "its adapter_config.json names no base_model_name_or_path)"
    )  # fmt: skip
    pairs: dict[str, dict[str, Tensor]] = {}
    for key, tensor in load_peft_weights(str(adapter_dir), device="cpu").items():
        m = _ADAPTER_KEY.match(key)
        if m is None:
            raise ValueError(f"adapter tensor {key!r} in {adapter_dir} is not a LoRA factor")
        pairs.setdefault(m["path"], {})[m["ab"]] = tensor
    factors = {}
    for path, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(
                f"adapter in {adapter_dir} has only lora_{next(iter(ab))} for {path!r}"
            )
        r = ab["A"].shape[0]
        alpha = config.alpha_pattern.get(
            get_pattern_key(config.alpha_pattern.keys(), path), config.lora_alpha
        )
        scaling = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        factors[path] = (ab["A"], ab["B"], scaling)
    if not factors:
        raise ValueError(f"adapter in {adapter_dir} holds no LoRA tensors")
    return LoraSpec("default", factors, source)


ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


def require_directory(path: Path, what: str) -> None:
    """ValueError when `path` does not exist ("no such directory") or is not a directory."""
    if not path.exists():
        raise ValueError(f"{what} {str(path)!r}: no such directory")
    if not path.is_dir():
        raise ValueError(f"{what} {str(path)!r} is a file; expected a directory")


def check_lora_config(config, where: str) -> None:
    """Refuse adapter features the decoder does not model (the probe would be silently wrong)."""
    if getattr(config, "peft_type", None) is not None and str(config.peft_type) not in (
        "LORA", "PeftType.LORA",
    ):  # fmt: skip
        raise ValueError(f"{where}: adapter type {config.peft_type} is not LoRA")
    for flag in ("use_dora", "fan_in_fan_out", "lora_bias"):
        if getattr(config, flag, False):
            raise ValueError(f"{where}: LoRA with {flag}=True is not supported")
    if getattr(config, "modules_to_save", None):
        raise ValueError(
            f"{where}: modules_to_save={config.modules_to_save} trains full modules besides "
            "LoRA; the probe differentiates LoRA tensors only"
        )
