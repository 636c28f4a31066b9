"""The no-graph head: log-probs (and their tangents) streamed over rows and vocabulary chunks.

For rows h [M, D] at target positions, head W [V, D], targets y [M], temperature τ:
    z = h Wᵀ/τ,  logp = z_y − logsumexp(z),  logp_dot = ḣ·(W[y] − pᵀW)/τ  with p = softmax(z)
(the tangent logits ż = ḣ Wᵀ/τ are never formed). Rows go in equal chunks of at most `chunk_size`; each row chunk
meets the vocabulary `vocab_chunk` entries at a time with an online softmax (running max m,
Σ e^{z − m} and Σ e^{z − m} W_v, rescaled when m grows), so the one logits buffer is
[chunk, vocab_chunk], never [chunk, V]. Why: [1024, 49152] fp32 is 201 MB, above glibc's 32 MB
mmap ceiling, so a full-vocabulary buffer is fresh pages page-faulted on every call; the
[1024, 4096] one is 16 MB (SmolLM2 head alone, 1258 rows: 0.89 -> 0.80-0.83 s).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..validation import check_positive_ints

VOCAB_CHUNK = 4096


def streamed_softmax(h: Tensor, weight: Tensor, buf: Tensor, vocab_chunk: int, with_mean: bool):
    """For rows h [c, D] (already divided by τ), weight [V, D], buf [≥c, ≥vocab_chunk] scratch:
    (log Σ_v e^{z_v} [c], pᵀW [c, D] or None) with z = h Wᵀ, streamed over vocabulary chunks."""
    c = h.shape[0]
    top = h.new_full((c, 1), -torch.inf)
    total = h.new_zeros(c, 1)
    p_w = h.new_zeros(c, weight.shape[1]) if with_mean else None
    for start in range(0, weight.shape[0], vocab_chunk):
        w = weight[start : start + vocab_chunk]
        z = torch.matmul(h, w.T, out=buf[:c, : w.shape[0]])
        new_top = torch.maximum(top, z.amax(-1, keepdim=True))
        scale = (top - new_top).exp_()  # 0 at the first chunk (top = -inf)
        z.sub_(new_top).exp_()
        total.mul_(scale).add_(z.sum(-1, keepdim=True))
        if p_w is not None:
            p_w.mul_(scale).addmm_(z, w)
        top = new_top
    log_z = (top + total.log())[:, 0]
    return log_z, None if p_w is None else p_w.div_(total)


def check_rows(hidden: Tensor, hidden_dot: Tensor | None, head_weight: Tensor, targets: Tensor) -> None:
    """hidden [M, D], hidden_dot None or like hidden, head_weight [V, D], targets [M] ids in [0, V);
    a ValueError names what is not. The range costs one aminmax: negative ids would index
    W[y] silently, and this function is reachable without a Batch's vocabulary check."""
    shapes_ok = (
        hidden.dim() == 2 and head_weight.dim() == 2 and head_weight.shape[1] == hidden.shape[1]
        and targets.shape == hidden.shape[:1] and (hidden_dot is None or hidden_dot.shape == hidden.shape)
    )  # fmt: skip
    if not shapes_ok:
        named = {"hidden": hidden, "hidden_dot": hidden_dot, "head_weight": head_weight, "targets": targets}
        got = ", ".join(f"{k} {tuple(t.shape)}" for k, t in named.items() if t is not None)
        raise ValueError(
            f"expected hidden [M, D], hidden_dot like hidden, head_weight [V, D], targets [M]; got {got}"
        )
    if targets.numel():
        low, high = (int(v) for v in torch.aminmax(targets))
        if low < 0 or high >= head_weight.shape[0]:
            raise ValueError(f"targets range over [{low}, {high}]; expected ids in [0, {head_weight.shape[0]})")


def head_logprobs(
    hidden: Tensor, head_weight: Tensor, targets: Tensor,
    *, temperature: float = 1.0, chunk_size: int = 1024, vocab_chunk: int = VOCAB_CHUNK,
) -> Tensor:  # fmt: skip
    """log softmax(h Wᵀ/τ)[y]: hidden [M, D] (normed rows), head_weight [V, D], targets [M] -> [M]
    in ≥ fp32 (see the module docstring for the chunking). No grad."""
    return head_logprobs_tangent(
        hidden, None, head_weight, targets, temperature=temperature, chunk_size=chunk_size, vocab_chunk=vocab_chunk
    )[0]


def head_logprobs_tangent(
    hidden: Tensor, hidden_dot: Tensor | None, head_weight: Tensor, targets: Tensor,
    *, temperature: float = 1.0, chunk_size: int = 1024, vocab_chunk: int = VOCAB_CHUNK,
) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    """hidden, hidden_dot [M, D] (rows at target positions), head_weight [V, D], targets [M]
    -> (logp [M], logp_dot [M]) in ≥ fp32; hidden_dot None -> (logp, None). No grad.

    logp = z_y − logsumexp(z), logp_dot = ḣ·(W[y] − pᵀW)/τ, z = h Wᵀ/τ (module docstring)."""
    check_rows(hidden, hidden_dot, head_weight, targets)
    check_positive_ints(chunk_size=chunk_size, vocab_chunk=vocab_chunk)
    with torch.no_grad():
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        weight = head_weight.to(dtype)
        m = hidden.shape[0]
        logp = hidden.new_empty(m, dtype=dtype)
        logp_dot = None if hidden_dot is None else hidden.new_empty(m, dtype=dtype)
        step = -(-m // -(-m // chunk_size)) if m else 1  # equal row chunks: no small last one
        buf = hidden.new_empty(min(step, m), min(vocab_chunk, weight.shape[0]), dtype=dtype)
        for start in range(0, m, step):
            rows = slice(start, min(start + step, m))
            h = hidden[rows].to(dtype)
            h = h / temperature if temperature != 1.0 else h
            w_y = weight[targets[rows]]  # [c, D]
            log_z, p_w = streamed_softmax(h, weight, buf, vocab_chunk, logp_dot is not None)
            logp[rows] = (h * w_y).sum(-1) - log_z
            if logp_dot is not None:
                logp_dot[rows] = (hidden_dot[rows].to(dtype) * (w_y - p_w)).sum(-1) / temperature
        return logp, logp_dot
