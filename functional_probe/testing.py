"""Check a setup against an independent reference: a transformers + PEFT twin with the same weights.

`peft_twin(model)` rebuilds any `FunctionalModel` (`fp.load_model`, `fp.from_peft`,
`fp.tiny_model`) as a stock transformers causal LM with a PEFT LoRA adapter whose parameters
equal `model.lora` (same names, same values; NF4 base layers dequantized to the compute dtype,
the "fp32 twin"). Comparing the two on your own model and inputs checks that the weights, the
LoRA scaling and the attention mask were read the way transformers + PEFT read them:

    import torch
    import functional_probe as fp
    from functional_probe.testing import peft_twin

    model = fp.tiny_model(seed=0)                    # or fp.load_model(base_dir, adapter_dir)
    ids = torch.randint(0, model.vocab_size, (2, 12))  # [B, T] token ids
    with torch.no_grad():
        ours = model(model.lora, ids)                # logits [B, T, V]
        ref = peft_twin(model)(input_ids=ids).logits
    rel = ((ours - ref).norm() / ref.norm()).item()  # ~1e-6 in fp32; >1e-4 means a mismatch

The library's own tests and `bench/` compare every fast path against this twin run with
`torch.autograd`. `hf_twin` is the same model without LoRA; `base_state_dict` its weights.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from .model.adapter import module_path
from .model.decoder import PROJECTIONS
from .model.functional import FunctionalModel
from .model.layers import LoRALinear


def base_state_dict(model: FunctionalModel) -> dict[str, torch.Tensor]:
    """The frozen weights under transformers' names, NF4 layers dequantized."""
    dec = model.decoder
    state = {"model.embed_tokens.weight": dec.embed_tokens, "model.norm.weight": dec.norm.weight}
    if not dec.cfg.tie_word_embeddings:
        state["lm_head.weight"] = dec.lm_head
    for i, block in enumerate(dec.layers):
        modules = {**{p: getattr(block.self_attn, p) for p in PROJECTIONS[:4]},
                   **{p: getattr(block.mlp, p) for p in PROJECTIONS[4:]}}  # fmt: skip
        for proj, linear in modules.items():
            base = linear.base if isinstance(linear, LoRALinear) else linear
            path = module_path(i, proj)
            state[f"{path}.weight"] = base.dequantized_weight()
            if base.bias is not None:
                state[f"{path}.bias"] = base.bias
        for norm in ("input_layernorm", "post_attention_layernorm"):
            state[f"model.layers.{i}.{norm}.weight"] = getattr(block, norm).weight
        if dec.cfg.qk_norm:
            for norm in ("q_norm", "k_norm"):
                state[f"model.layers.{i}.self_attn.{norm}.weight"] = getattr(block.self_attn, norm).weight
    return {k: v.detach().clone() for k, v in state.items()}


def hf_twin(model: FunctionalModel, *, attn_implementation: str = "eager") -> nn.Module:
    """A transformers causal LM (no LoRA) with `model`'s frozen weights, in eval mode."""
    from transformers import AutoModelForCausalLM

    # a private config: from_config writes attn_implementation into the config it is given,
    # so twins sharing one config would switch each other's attention (measured).
    hf = AutoModelForCausalLM.from_config(
        copy.deepcopy(model.hf_config), attn_implementation=attn_implementation, dtype=model.dtype
    )
    missing, unexpected = hf.load_state_dict(base_state_dict(model), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and model.decoder.cfg.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"twin state mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return hf.to(model.device).eval()


def peft_twin(model: FunctionalModel, *, attn_implementation: str = "eager") -> nn.Module:
    """A PEFT `PeftModel` over `hf_twin(model)` whose LoRA parameters equal `model.lora`,
    LoRA dropout 0, in eval mode; its `named_parameters()` keys are `model.lora`'s keys."""
    from peft import LoraConfig, get_peft_model

    lora_modules = {name: m for name, m in model.decoder.named_modules() if isinstance(m, LoRALinear)}
    ranks = {f"model.{n}": m.lora_A.shape[0] for n, m in lora_modules.items()}
    scalings = {f"model.{n}": m.scaling for n, m in lora_modules.items()}
    r0 = next(iter(ranks.values()))
    alpha0 = next(iter(scalings.values())) * r0
    config = LoraConfig(
        r=r0,
        lora_alpha=alpha0,
        lora_dropout=0.0,
        target_modules=sorted({n.rsplit(".", 1)[-1] for n in lora_modules}),
        rank_pattern={k: v for k, v in ranks.items() if v != r0},
        alpha_pattern={k: scalings[k] * ranks[k] for k in ranks if scalings[k] * ranks[k] != alpha0},
        init_lora_weights=False,
    )
    peft_model = get_peft_model(hf_twin(model, attn_implementation=attn_implementation), config)
    lora = model.lora
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if name in lora:
                param.copy_(lora[name])
    adapter = {n for n, _ in peft_model.named_parameters() if ".lora_" in n}
    if adapter != set(lora):
        raise ValueError(f"PEFT twin parameters differ from model.lora: {sorted(adapter ^ set(lora))[:3]}")
    return peft_model.eval()
