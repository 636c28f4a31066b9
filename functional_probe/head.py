"""The output head's log-probabilities with a backward that recomputes logits chunk by chunk.

logp[m] = log softmax(h_m Wᵀ / τ)[y_m], for hidden rows h [M, D], head W [V, D], targets y [M].
Reverse mode: ∂logp/∂h = (W[y] − softmax(z) W) / τ and ∂logp/∂W = (onehot(y) − softmax(z))ᵀ h / τ,
so backward needs only h, W and y: it recomputes each chunk's logits z instead of saving them.
What is kept for backward is therefore [M, D] (the hidden rows, which exist anyway), never
[M, V]; the largest transient is one chunk's [chunk, V] logits and softmax, in ≥ fp32.

A `torch.autograd.Function` with `setup_context` and `generate_vmap_rule`, so it runs under
`torch.func.grad`, `vjp` and `vmap(grad)`. First order only (no jvp, backward not
differentiable): forward mode and double reverse use `logprobs.token_logprobs` (plain ops).
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import Tensor


class _ChunkedLogprobs(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float, chunk: int) -> Tensor:
        acc = torch.promote_types(hidden.dtype, torch.float32)
        out = []
        for start in range(0, hidden.shape[0], chunk):
            z = logits(hidden[start : start + chunk], weight, temperature, acc)  # [c, V]
            y = targets[start : start + chunk, None]  # [c, 1]
            top = z.amax(-1, keepdim=True)
            z_y = z.gather(-1, y) - top
            # log-sum-exp in place: one [c, V] buffer per chunk, not two
            out.append((z_y - z.sub_(top).exp_().sum(-1, keepdim=True).log())[:, 0])
        return torch.cat(out)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        hidden, weight, targets, temperature, chunk = inputs
        ctx.temperature, ctx.chunk = temperature, chunk
        ctx.save_for_backward(hidden, weight, targets)

    @staticmethod
    @torch.no_grad()  # torch.func.grad runs backward with create_graph=True: record nothing
    def backward(ctx, grad_out: Tensor):
        hidden, weight, targets = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        acc = grad_out.dtype
        w = weight.to(acc)
        pieces, grad_w = [], None  # out of place throughout: under vmap any of these may be batched
        for start in range(0, hidden.shape[0], ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            h, y, g = hidden[rows], targets[rows], grad_out[rows, None] / ctx.temperature  # g [c, 1]
            p = softmax_(logits(h, weight, ctx.temperature, acc))  # [c, V]
            if need_h:
                pieces.append((g * (w[y] - p @ w)).to(hidden.dtype))
            if need_w:
                dz = (-g * p).scatter_add(-1, y[:, None], g)  # ∂(g·logp)/∂z = g·(onehot(y) − p)
                grad_w = dz.T @ h.to(acc) if grad_w is None else grad_w + dz.T @ h.to(acc)
        grad_h = torch.cat(pieces) if need_h else None
        return grad_h, None if grad_w is None else grad_w.to(weight.dtype), None, None, None


def softmax_(z: Tensor) -> Tensor:
    """softmax over the last dim, in place in z (a fresh [c, V] buffer)."""
    z.sub_(z.amax(-1, keepdim=True)).exp_()
    return z.div_(z.sum(-1, keepdim=True))


def logits(h: Tensor, weight: Tensor, temperature: float, acc: torch.dtype) -> Tensor:
    """z = h Wᵀ / τ in `acc` (≥ fp32): h [c, D], W [V, D] -> [c, V]."""
    z = (h @ weight.T).to(acc)
    return z / temperature if temperature != 1.0 else z


def chunked_logprobs(
    hidden: Tensor, weight: Tensor, targets: Tensor, *, temperature: float = 1.0, chunk_tokens: int = 1024
) -> Tensor:
    """log softmax(h Wᵀ / τ)[y]: hidden [..., D], weight [V, D], targets [...] int64 -> [...] in ≥ fp32.

    `chunk_tokens` rows of logits exist at a time, in forward and again in backward.
    """
    lead = targets.shape
    flat_h = rearrange(hidden, "... d -> (...) d")
    out = _ChunkedLogprobs.apply(flat_h, weight, targets.reshape(-1), float(temperature), int(chunk_tokens))
    return out.reshape(lead)
