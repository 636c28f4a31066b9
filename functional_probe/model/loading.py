"""Build a `FunctionalModel` from a local Hugging Face directory, a PEFT adapter, or a live PeftModel.

transformers reads configs and rotary parameters, peft reads adapter configs and files
(adapter.py), and safetensors streams the checkpoint one tensor at a time (base_weights.py),
so with `quantize="nf4"` each base linear is quantized as it is read and no full-precision
copy of all of them ever exists.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from .adapter import LoraSpec, check_lora_fits, fresh_lora, module_path, read_adapter, require_directory
from .base_weights import checkpoint_reader, dense_or_nf4, required
from .decoder import MLP, PROJECTIONS, Attention, Block, Decoder, DecoderConfig
from .functional import FunctionalModel
from .layers import LoRALinear, RMSNorm

SUPPORTED_ROPE = ("default", "linear", "llama3", "yarn")
QUANTIZE_CHOICES = (None, "nf4")
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
HALF_DTYPES = (torch.bfloat16, torch.float16)


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
