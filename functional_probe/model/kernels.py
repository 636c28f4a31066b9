"""How the decoder and the head compute: plain differentiable ops, or the first-order reverse kernels.

`PLAIN` composes with every torch.func transform (forward mode, double reverse, vmap): attention
in plain ops, a chunked head that saves its logits, no checkpointing. A first-order reverse pass
(`grad`, `vjp` followed by one pullback, `vmap(grad)`) uses `first_order_kernels`: SDPA attention
(flash / memory-efficient; no [T, T] scores saved), a head whose backward recomputes each chunk's
logits, and per-layer activation checkpointing past `CHECKPOINT_MIN_TOKENS`. Those kernels have no
forward-mode rule (SDPA on CPU has none) and are not twice differentiable, so callers pick them
explicitly; nothing is global.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

ATTENTIONS = ("plain", "sdpa")
HEADS = ("plain", "recompute")

# Rows × columns of one pass from which every decoder layer is checkpointed. Measured on the
# SmolLM2-135M-shaped random model of bench/long_sequences.py cut to 8 layers, 4 rows, fp32,
# mean_grad, fresh process each, 2 cores shared with other jobs (so times are noisy):
#   4 × 128 tokens: peak 738 MB without checkpointing, 145 MB with;
#   4 × 256 tokens: 1556 MB without, 364 MB with; time with/without, alternated in one
#   process, 3 runs each: median ratio 1.00 (16.2 s both; the recompute's extra forward of the
#   layers is offset by touching ~1.2 GB less memory).
# Without it, what a layer keeps grows like tokens × (a few × hidden + MLP width); below about
# 512 tokens per pass that is small next to the model, so checkpointing is off there.
CHECKPOINT_MIN_TOKENS = 512


@dataclass(frozen=True)
class Kernels:
    """Which implementation each part of the forward uses.

    attention: "plain" (einsum + softmax in ≥ fp32; every transform) or "sdpa"
        (`F.scaled_dot_product_attention`: flash / memory-efficient kernels; first-order reverse).
    causal_only: with "sdpa", no row has a padding token before a real one (right padding at
        most), so the causal mask alone hides every pad key from every real query and the kernel
        may skip the masked half (`is_causal`). Left-padded batches must leave it False.
    head: "plain" (chunked log-softmax whose reverse mode saves each chunk's logits) or
        "recompute" (`functional_probe.head.chunked_logprobs`: saves nothing of size [tokens × V]).
    checkpoint: recompute each decoder layer's activations in backward (keeps only layer inputs).
    """

    attention: str = "plain"
    causal_only: bool = False
    head: str = "plain"
    checkpoint: bool = False

    def __post_init__(self) -> None:
        if self.attention not in ATTENTIONS:
            raise ValueError(f"Kernels.attention={self.attention!r}; expected one of {ATTENTIONS}")
        if self.head not in HEADS:
            raise ValueError(f"Kernels.head={self.head!r}; expected one of {HEADS}")
        if self.causal_only and self.attention != "sdpa":
            raise ValueError("Kernels.causal_only applies to attention='sdpa' only")

    @property
    def layer(self) -> Kernels:
        """The kernels one layer runs with inside a checkpoint (which must not nest)."""
        return Kernels(self.attention, self.causal_only, self.head, checkpoint=False)


PLAIN = Kernels()


def first_order_kernels(rows: int, columns: int, *, left_padded: bool, checkpoint: bool | None = None) -> Kernels:
    """The kernels of a first-order reverse pass over `rows` sequences of `columns` tokens.

    `left_padded`: some row has a pad before a real token (then the key mask is passed to SDPA).
    `checkpoint=None` checkpoints from `CHECKPOINT_MIN_TOKENS` rows × columns on.
    """
    if checkpoint is None:
        checkpoint = rows * columns >= CHECKPOINT_MIN_TOKENS
    return Kernels("sdpa", causal_only=not left_padded, head="recompute", checkpoint=bool(checkpoint))


def transform_active(*dicts: Mapping[str, Tensor]) -> bool:
    """True under a torch.func transform (grad, vjp, jvp, vmap) or when a tensor of `dicts` carries a
    forward-AD tangent: then only the plain ops compose, and a no-graph fast path must not run."""
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return True
    return any(fwAD.unpack_dual(t).tangent is not None for d in dicts for t in d.values())
