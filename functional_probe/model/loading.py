"""Build a `FunctionalModel` from a local Hugging Face directory, a PEFT adapter, or a live PeftModel.

transformers reads configs and rotary parameters, peft reads adapter configs and files, and
safetensors streams the checkpoint one tensor at a time, so with `quantize="nf4"` each base
linear is quantized as it is read and no full-precision copy of all of them ever exists.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor, nn
from tqdm.auto import tqdm

from ..nf4 import NF4Linear
from .decoder import MLP, PROJECTIONS, Attention, Block, Decoder, DecoderConfig
from .functional import FunctionalModel
from .layers import DenseLinear, LoRALinear, RMSNorm

ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
SUPPORTED_ROPE = ("default", "linear", "llama3", "yarn")
QUANTIZE_CHOICES = (None, "nf4")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
HALF_DTYPES = (torch.bfloat16, torch.float16)
_LAYER_PATH = re.compile(r"^model\.layers\.(?P<layer>\d+)\.(self_attn|mlp)\.(?P<proj>\w+)$")


@dataclass(frozen=True)
class LoraSpec:
    """LoRA factors keyed by the module path in the HF model ('model.layers.0.self_attn.q_proj'):
    (A [r, in], B [out, r], scaling). `source` names where they come from and the model they
    were made for (adapter_config.json's base_model_name_or_path), for error messages."""

    adapter_name: str
    factors: dict[str, tuple[Tensor, Tensor, float]]
    source: str = "the LoRA"


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A floating torch dtype from a dtype or its name ('bfloat16', 'torch.float32', 'bf16')."""
    if isinstance(dtype, str):
        name = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32", "fp64": "float64"}.get(
            dtype.removeprefix("torch."), dtype.removeprefix("torch.")
        )
        dtype = getattr(torch, name, dtype)
    if dtype not in FLOAT_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in FLOAT_DTYPES)
        raise ValueError(f"dtype={dtype!r}; expected a floating dtype ({names}) or its name")
    return dtype


def adapter_dtype(dtype: torch.dtype, autocast_adapter_dtype: bool = True) -> torch.dtype:
    """The LoRA factors' dtype for a compute dtype: PEFT's `autocast_adapter_dtype=True` keeps
    adapters of a bf16/fp16 base in fp32 (and any other dtype as is)."""
    return torch.float32 if autocast_adapter_dtype and dtype in HALF_DTYPES else dtype


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None -> CUDA when available, else CPU; otherwise a device that torch can allocate on."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError, TypeError) as e:
        reason = str(e).splitlines()[0].split(". ")[0][:160]  # torch's first sentence
        raise ValueError(
            f"device={str(device)!r} cannot be used here ({reason}); expected "
            "e.g. 'cpu', 'cuda', 'cuda:1', or None for CUDA when available"
        ) from e
    return device


def module_path(layer: int, projection: str) -> str:
    """HF module path of a projection: 'model.layers.{i}.self_attn.q_proj' or '....mlp.up_proj'."""
    group = "self_attn" if projection in ATTENTION_PROJECTIONS else "mlp"
    return f"model.layers.{layer}.{group}.{projection}"


def rope_inv_freq(hf_config) -> tuple[Tensor, float]:
    """Inverse frequencies [head_dim/2] and attention scaling, from transformers' rope code."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = getattr(hf_config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE:
        raise ValueError(f"rope_type {rope_type!r} is not supported; supported: {SUPPORTED_ROPE}")
    if rope_type == "default":
        cfg = DecoderConfig.from_hf(hf_config)
        theta = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
        exponents = torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim
        return (1.0 / theta**exponents).float(), 1.0
    inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf_config, device="cpu")
    return inv_freq.float(), float(scaling)


def build_model(
    hf_config,
    tensors: Callable[[str], Tensor | None],
    frozen_linear: Callable[[str], nn.Module],
    lora: LoraSpec,
    *,
    dtype: torch.dtype | None = torch.float32,
    lora_dtype: torch.dtype | None = None,
    device: str | torch.device = "cpu",
) -> FunctionalModel:
    """Assemble the decoder layer by layer.

    `tensors(name)` returns a checkpoint tensor by its HF name (None if absent); `frozen_linear`
    returns the frozen module (dense or NF4) for an HF module path; `lora` says which linears
    carry LoRA factors. Embeddings, norms and head are copied in `dtype` (None: each keeps its
    own), the LoRA factors in `lora_dtype` (None: `adapter_dtype(dtype)`, or their own when
    dtype is None too). Every LoRA factor must fit its linear, or ValueError names it, before
    any layer is built.
    """
    cfg = DecoderConfig.from_hf(hf_config)
    check_lora_fits(lora, cfg)
    lora_dtype = lora_dtype or (dtype and adapter_dtype(dtype))

    def cast(t: Tensor | None, to: torch.dtype | None = dtype) -> Tensor | None:
        return None if t is None else t.detach().to(device=device, dtype=to or t.dtype, copy=True)

    def norm(name: str) -> RMSNorm:
        return RMSNorm(cast(required(tensors, name)), cfg.rms_norm_eps)

    blocks = []
    for i in tqdm(range(cfg.num_layers), desc="loading layers", leave=False, disable=None):
        linears: dict[str, nn.Module] = {}
        for proj in PROJECTIONS:
            path = module_path(i, proj)
            linears[proj] = frozen_linear(path)
            if path in lora.factors:
                a, b, scaling = lora.factors[path]
                linears[proj] = LoRALinear(linears[proj], cast(a, lora_dtype), cast(b, lora_dtype), scaling)
        qk = {}
        if cfg.qk_norm:
            qk = {k: norm(f"model.layers.{i}.self_attn.{k}.weight") for k in ("q_norm", "k_norm")}
        blocks.append(
            Block(
                Attention(cfg, linears, qk),
                MLP(linears),
                norm(f"model.layers.{i}.input_layernorm.weight"),
                norm(f"model.layers.{i}.post_attention_layernorm.weight"),
            )
        )
    embed = cast(required(tensors, "model.embed_tokens.weight"))
    head = embed if cfg.tie_word_embeddings else cast(required(tensors, "lm_head.weight"))
    inv_freq, attention_scaling = rope_inv_freq(hf_config)
    inv_freq = inv_freq.to(device)
    decoder = Decoder(
        cfg, embed, blocks, norm("model.norm.weight"), head, inv_freq, attention_scaling
    )
    return FunctionalModel(decoder, lora.adapter_name, hf_config)


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


def linear_shapes(cfg: DecoderConfig) -> dict[str, tuple[int, int]]:
    """[out, in] of each projection."""
    d, f = cfg.hidden_size, cfg.intermediate_size
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return {
        "q_proj": (q, d), "k_proj": (kv, d), "v_proj": (kv, d), "o_proj": (d, q),
        "gate_proj": (f, d), "up_proj": (f, d), "down_proj": (d, f),
    }  # fmt: skip


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


def load_model(
    base_dir: str | Path,
    adapter_dir: str | Path | None = None,
    *,
    quantize: str | None = None,
    dtype: torch.dtype | str = torch.float32,
    device: str | torch.device | None = None,
    autocast_adapter_dtype: bool = True,
    r: int = 8,
    lora_alpha: float = 16.0,
    target_modules: Sequence[str] = PROJECTIONS,
    lora_init: str = "peft",
    seed: int = 0,
) -> FunctionalModel:
    """Load a Llama-family causal LM from a local HF directory, plus a PEFT LoRA adapter.

    Without `adapter_dir`, a fresh LoRA of rank `r` and `lora_alpha` on `target_modules` is
    created (`lora_init="peft"`: B = 0 like PEFT, so lora_A gradients start at zero;
    `"random"`: both factors non-zero). `quantize="nf4"` stores base linears as NF4
    (blocksize 64, double quantization), quantized one by one while reading, in `dtype` (as
    transformers + bitsandbytes quantize in the requested dtype).

    Precision: `dtype` (a torch dtype or its name, e.g. "bfloat16") is the compute dtype and
    the dtype of every frozen tensor. The LoRA factors follow PEFT's `autocast_adapter_dtype`:
    True (default) keeps them in fp32 on a bf16/fp16 base, and each LoRA linear casts its input
    to fp32 for the low-rank path and its output back (see `LoRALinear`); False puts them in
    `dtype`. Log-probs and losses are computed in at least fp32 either way.
    `device`: where every tensor lives and everything runs; None picks CUDA when available,
    else CPU.
    """
    from transformers import AutoConfig

    if quantize not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize={quantize!r}; expected one of {QUANTIZE_CHOICES}")
    dtype, device = resolve_dtype(dtype), resolve_device(device)
    base_dir = Path(base_dir)
    require_directory(base_dir, "base model directory")
    if not (base_dir / "config.json").is_file():
        raise ValueError(f"{base_dir} has no config.json: not a Hugging Face model directory")
    hf_config = AutoConfig.from_pretrained(str(base_dir))
    if adapter_dir is None:
        lora = fresh_lora(
            hf_config, r=r, lora_alpha=lora_alpha, target_modules=target_modules,
            init=lora_init, seed=seed,
        )  # fmt: skip
    else:
        lora = read_adapter(Path(adapter_dir))
    tensors = checkpoint_reader(base_dir)
    frozen = dense_or_nf4(tensors, quantize, dtype, device)
    return build_model(
        hf_config, tensors, frozen, lora,
        dtype=dtype, lora_dtype=adapter_dtype(dtype, autocast_adapter_dtype), device=device,
    )  # fmt: skip
