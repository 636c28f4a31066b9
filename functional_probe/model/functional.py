"""`FunctionalModel`: the decoder as a pure function of the LoRA dict.

`model(lora, input_ids)` runs `torch.func.functional_call(decoder, lora, ...)`; nothing is
mutated, so one model object serves any number of dicts, under any torch.func transform.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .decoder import Decoder
from .kernels import PLAIN, Kernels

PEFT_PREFIX = "base_model.model.model."


def peft_name(internal: str, adapter_name: str) -> str:
    """'layers.0.self_attn.q_proj.lora_A' -> PEFT's
    'base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight'."""
    return f"{PEFT_PREFIX}{internal}.{adapter_name}.weight"


class FunctionalModel(nn.Module):
    """A Llama-family decoder whose only differentiable state is the LoRA dict.

    `lora` maps PEFT parameter names to tensors (A [r, in], B [out, r]); everything else
    (embeddings, norms, output head, base or NF4 weights) is a buffer of `decoder`.
    """

    def __init__(self, decoder: Decoder, adapter_name: str = "default", hf_config=None) -> None:
        super().__init__()
        self.decoder = decoder
        self.adapter_name = adapter_name
        self.hf_config = hf_config
        self._internal = {peft_name(name, adapter_name): name for name, _ in decoder.named_parameters()}
        if not self._internal:
            raise ValueError("the model has no LoRA tensors: nothing to differentiate")
        self._shapes = {k: p.shape for k, p in self._lora_items()}

    def _lora_items(self):
        params = dict(self.decoder.named_parameters())
        return ((k, params[v]) for k, v in self._internal.items())

    @property
    def lora(self) -> dict[str, Tensor]:
        """A new dict of the current LoRA tensors (detached; keys = PEFT parameter names)."""
        return {k: p.detach() for k, p in self._lora_items()}

    @property
    def vocab_size(self) -> int:
        return self.decoder.cfg.vocab_size

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.embed_tokens.dtype

    @property
    def device(self) -> torch.device:
        return self.decoder.embed_tokens.device

    @property
    def head_weight(self) -> Tensor:
        """The output head [V, D] (a frozen buffer; tied to the embeddings where the config ties)."""
        return self.decoder.lm_head

    def check_lora(self, lora: Mapping[str, Tensor]) -> None:
        """Raise ValueError naming the first key missing, unexpected, or of the wrong shape."""
        check_same_keys_and_shapes(
            self._shapes, lora, what="LoRA dict", owner="the model",
            hint=" (a merged adapter, another adapter name, or a DDP 'module.' prefix?)",
        )  # fmt: skip

    def hidden_states(
        self,
        lora: Mapping[str, Tensor],
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        *,
        kernels: Kernels = PLAIN,
    ) -> Tensor:
        """Final normed hidden states [B, T, D] in the compute dtype; pure in `lora`.

        attention_mask [B, T] (1/True = real token) defaults to all ones; position ids
        default to `cumsum(mask) − 1` (0 on pads), so padding never shifts positions.
        `kernels` (model/kernels.py): PLAIN composes with every transform; first-order reverse
        passes may use `first_order_kernels` (SDPA, checkpointing; no forward mode).
        """
        self.check_lora(lora)
        mask = default_mask(input_ids, attention_mask)
        if position_ids is None:
            position_ids = positions_from_mask(mask)
        params = {self._internal[k]: v for k, v in lora.items()}
        return functional_call(self.decoder, params, (input_ids, position_ids, mask, kernels))

    def forward(
        self,
        lora: Mapping[str, Tensor],
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
    ) -> Tensor:
        """Logits [B, T, V] in the compute dtype; pure in `lora`. For long sequences and big
        vocabularies prefer `hidden_states` + a chunked head (see `sequence_logprobs`)."""
        hidden = self.hidden_states(lora, input_ids, attention_mask, position_ids)
        return hidden @ self.head_weight.T


def check_same_keys_and_shapes(
    expected: Mapping[str, torch.Size], given: Mapping[str, Tensor], *, what: str, owner: str, hint: str = ""
) -> None:
    """ValueError naming the first key of `expected` missing from `given`, of another shape, or
    the first key of `given` that `owner` does not have."""
    for key, shape in expected.items():
        if key not in given:
            raise ValueError(f"{what} is missing {key!r} (expected shape {tuple(shape)})")
        if given[key].shape != shape:
            raise ValueError(f"{what}[{key!r}] has shape {tuple(given[key].shape)}, expected {tuple(shape)}")
    extra = sorted(set(given) - set(expected))
    if extra:
        raise ValueError(f"{what} has key {extra[0]!r} that {owner} does not have{hint}")


def default_mask(input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
    """[B, T] bool mask; all True when none is given."""
    if attention_mask is None:
        return torch.ones_like(input_ids, dtype=torch.bool)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids "
            f"shape {tuple(input_ids.shape)}"
        )
    return attention_mask.bool()


def positions_from_mask(mask: Tensor) -> Tensor:
    """Position ids [B, T]: 0, 1, ... over real tokens, 0 on pads."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)
