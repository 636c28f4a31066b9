"""One layer's frozen projections as a few matmuls, LoRA merged or kept low-rank (DESIGN §3).

The no-graph paths (the fast primal, the dual forward, the sampler's cached decoder) need no
reverse-mode graph, so a projection group sharing one input (q/k/v, gate/up) runs as one matmul on
the rows of its projections, NF4 dequantized once per pass:
    merged:    y = x W'ᵀ + b,  W' = W + s·B A                  (fp32 / fp64: exact and cheapest)
    low-rank:  y = x Wᵀ + b + s·(x Aᵀ) Bᵀ on each LoRA projection's columns
In bf16/fp16 rounding W + s·B A to 8 bits of mantissa swallows the small steps the estimators
compare (measured: logit changes 75% wrong), so there the LoRA terms stay low-rank. `merge=None`
picks by the frozen weight's dtype; a caller may force either.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from itertools import accumulate

import torch
import torch.nn.functional as F
from torch import Tensor

from .layers import LoRALinear

MERGED_DTYPES = (torch.float32, torch.float64)

# group -> (parent module, projections sharing the group's input)
GROUPS = {
    "qkv": ("self_attn", ("q_proj", "k_proj", "v_proj")), "o": ("self_attn", ("o_proj",)),
    "gate_up": ("mlp", ("gate_proj", "up_proj")), "down": ("mlp", ("down_proj",)),
}  # fmt: skip


@dataclass(frozen=True)
class LoraTerm:
    """One LoRA projection of a group: its output columns, PEFT keys, factors A [r, in], B [out, r], s."""

    columns: slice
    keys: tuple[str, str]
    a: Tensor
    b: Tensor
    scaling: float


@dataclass(frozen=True)
class GroupLinear:
    """Projections sharing one input: weight [Σ out, in] (their rows, NF4 dequantized; LoRA folded in
    when `merged`), bias [Σ out] (zeros where a projection has none) or None, `sizes` the out_p,
    `loras` the LoRA projections (needed low-rank when not merged, and by the dual's tangent)."""

    weight: Tensor
    bias: Tensor | None
    sizes: tuple[int, ...]
    loras: tuple[LoraTerm, ...]
    merged: bool

    @property
    def bounds(self) -> list[int]:
        """Column offsets [0, out_0, out_0 + out_1, ...]."""
        return [0, *accumulate(self.sizes)]

    def add_low_rank(self, x: Tensor, y: Tensor) -> None:
        """y[..., cols] += s·(x Aᵀ) Bᵀ per LoRA term, when not merged (x [..., in], y [..., Σ out]).
        Formed in the factors' dtype and cast back, as `LoRALinear` (PEFT's autocast rule)."""
        if self.merged:
            return
        for t in self.loras:
            low_rank = F.linear(F.linear(x.to(t.a.dtype), t.a), t.b) * t.scaling
            y[..., t.columns] = (y[..., t.columns] + low_rank).to(y.dtype)

    def __call__(self, x: Tensor) -> Tensor:
        """x [..., in] -> [..., Σ out]."""
        y = F.linear(x, self.weight, self.bias)
        self.add_low_rank(x, y)
        return y


def group_linear(
    modules: list, names: list[str], keys: Mapping[str, str], lora: Mapping[str, Tensor], merge: bool | None = None
) -> GroupLinear:
    """GroupLinear of frozen or LoRA linears `modules` (internal names `names`, e.g.
    'layers.0.self_attn.q_proj'; `keys` maps internal LoRA names to the keys of `lora`).
    merge=None: merged iff the frozen weights are fp32/fp64. A merged weight is formed in the
    promoted dtype of W and B A and rounded once to W's dtype."""
    bases = [m.base if isinstance(m, LoRALinear) else m for m in modules]
    weights = [base.dequantized_weight() for base in bases]
    merged = weights[0].dtype in MERGED_DTYPES if merge is None else bool(merge)
    # one fresh [Σ out, in] buffer (a lone frozen weight is copied only when LoRA is merged into it)
    weight = torch.cat(weights) if len(weights) > 1 else weights[0]
    loras, start = [], 0
    for module, name, w in zip(modules, names, weights, strict=True):
        rows = slice(start, start + w.shape[0])
        if isinstance(module, LoRALinear):
            pair = (keys[f"{name}.lora_A"], keys[f"{name}.lora_B"])
            a, b = lora[pair[0]], lora[pair[1]]
            loras.append(LoraTerm(rows, pair, a, b, module.scaling))
            if merged:
                weight = weight.clone() if weight is w else weight
                merge_into(weight[rows], a, b, module.scaling)
        start = rows.stop
    bias = None
    if any(base.bias is not None for base in bases):
        bias = torch.cat([w.new_zeros(w.shape[0]) if base.bias is None else base.bias
                          for w, base in zip(weights, bases, strict=True)])  # fmt: skip
    return GroupLinear(weight, bias, tuple(w.shape[0] for w in weights), tuple(loras), merged)


def merge_into(rows: Tensor, a: Tensor, b: Tensor, scaling: float) -> None:
    """rows [out, in] (a view of the group's weight) += s·B A in place: one addmm when the dtypes
    agree (no B A temporary, no copy), else formed in the promoted dtype and rounded once."""
    if a.dtype == b.dtype == rows.dtype:
        rows.addmm_(b, a, alpha=scaling)
    else:
        rows.copy_(rows + scaling * (b @ a))


def layer_groups(
    model, index: int, lora: Mapping[str, Tensor], merge: bool | None = None
) -> dict[str, GroupLinear]:
    """The GroupLinears 'qkv', 'o', 'gate_up', 'down' of layer `index` of a FunctionalModel."""
    block = model.decoder.layers[index]
    keys = {internal: key for key, internal in model._internal.items()}
    out = {}
    for group, (parent, projections) in GROUPS.items():
        modules = [getattr(getattr(block, parent), p) for p in projections]
        names = [f"layers.{index}.{parent}.{p}" for p in projections]
        out[group] = group_linear(modules, names, keys, lora, merge)
    return out
