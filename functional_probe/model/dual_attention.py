"""Block-causal attention with an online softmax, primal-only or carrying a tangent (DESIGN §3).

Queries go in blocks of `block_q` positions; each query block [i0, i1) meets only the keys
[0, i1) (the causally masked rest is never computed), `block_k` keys at a time, so the score
memory is O(block_q · block_k) per head, never [T, T]. Per query row, over key blocks:
    m = running max of s,  l = Σ e,  A = Σ e v,  with e = e^{s − m}  (rescaled when m grows)
and, with a tangent (ṡ the score tangent, v̇ the value tangent),
    Ȧ = Σ e (ṡ v + v̇),  c = Σ e ṡ;   o = A / l,  ȯ = Ȧ / l − (c / l) · o
(= Σ ṗ v + p v̇ with ṗ = p (ṡ − Σ p ṡ)). Masked scores get decoder.Attention's finite fill, so
a block a row cannot see adds e = 1 terms that the first visible block rescales by
e^{fill − m} = 0 exactly. A row that sees no key at all (a left pad) is, as in the plain
forward, the uniform average of all T values (and of their tangents).

Layouts (K kv heads, r = H / K query heads per kv head, pairs n = 0 primal / 1 tangent):
    q [n?, B, K, T, r, d] (already rotated and scaled by d^-½), k [n?, B·K, T, d],
    v [B·K, T, n·d] (the pair [v, v̇] side by side), key_mask [B, T] bool (1 = real token),
    out [n?, B, T, K, r, d] written in place.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Measured (attention_pair alone, SmolLM2 heads 9/3 x 64, 1 thread, medians of 5, shared machine):
# 16 rows x T=127: (block_q, block_k) = (128, 512) 84-93 ms, (64, 512) 60, (32, 128) 42-50;
# 4 rows x T=511: 119-129 ms, 107, 90-112. Smaller query blocks skip more of the masked half;
# below 32 the per-block overhead (a dozen small ops) wins.
BLOCK_Q = 32
BLOCK_K = 128


def block_mask(key_mask: Tensor, keys_real: list[bool], i0: int, i1: int, j0: int, j1: int) -> Tensor | None:
    """allowed [B, 1, bq, 1, bk] for queries [i0, i1) and keys [j0, j1), or None when all are allowed
    (keys_real[j]: key block j has no pad in any row)."""
    causal = j1 - 1 > i0
    if not causal and keys_real:
        return None
    allowed = key_mask[:, None, None, None, j0:j1]  # [B, 1, 1, 1, bk]
    if causal:
        q_pos = torch.arange(i0, i1, device=key_mask.device)[:, None, None]
        allowed = allowed & (torch.arange(j0, j1, device=key_mask.device) <= q_pos)  # [B, 1, bq, 1, bk]
    return allowed


def scores_float(s: Tensor, allowed: Tensor | None, shape: tuple[int, ...]) -> Tensor:
    """s [B·K, bq·r, bk] in the compute dtype -> [B, K, bq, r, bk] in ≥ fp32, masked with the fill."""
    s = s.view(shape).to(torch.promote_types(s.dtype, torch.float32))
    if allowed is not None:
        s.masked_fill_(~allowed, torch.finfo(s.dtype).min)
    return s


def rescale(m: Tensor | None, s: Tensor, state: list[Tensor]) -> Tensor:
    """New running max [.., 1] from block scores s [.., bk]; multiplies the accumulators in
    `state` by e^{m_old − m_new} in place (the online softmax step)."""
    m_blk = s.amax(-1, keepdim=True)
    if m is None:
        return m_blk
    m_new = torch.maximum(m, m_blk)
    scale = (m - m_new).exp_()
    for acc in state:
        acc.mul_(scale)
    return m_new


def weighted(e: Tensor, v: Tensor, rows: tuple[int, int], shape: tuple[int, ...]) -> Tensor:
    """Σ_j e_j v_j: e [B, K, bq, r, bk] (≥ fp32), v [B·K, bk, w] -> [B, K, bq, r, w] in e's dtype
    (the matmul runs in v's dtype, the accumulators stay in ≥ fp32)."""
    return (e.to(v.dtype).view(*rows, -1) @ v).view(*shape[:4], -1).to(e.dtype)


def live_rows(key_mask: Tensor) -> Tensor:
    """[B, T] bool: query t sees at least one real key (causal), i.e. it is not a left pad."""
    return key_mask.cumsum(-1) > 0


def attention_pair(
    q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor, out: Tensor,
    block_q: int = BLOCK_Q, block_k: int = BLOCK_K,
) -> None:  # fmt: skip
    """Primal and tangent attention: q [2, B, K, T, r, d], k [2, B·K, T, d], v [B·K, T, 2d]
    ([v, v̇]), key_mask [B, T] -> out [2, B, T, K, r, d] (see the module docstring)."""
    _, b, kh, t, r, d = q.shape
    live, v_mean = live_rows(key_mask), v.mean(1).view(b, kh, 1, 1, 2 * d)
    keys_real = [bool(key_mask[:, j : j + block_k].all()) for j in range(0, t, block_k)]
    for i0 in range(0, t, block_q):
        i1 = min(i0 + block_q, t)
        rows = (b * kh, (i1 - i0) * r)
        q0, q1 = (x[:, :, i0:i1].reshape(*rows, d) for x in q)
        m = l_sum = c_sum = acc = acc_s = None
        for j0 in range(0, i1, block_k):
            j1 = min(j0 + block_k, i1)
            k0, k1 = k[0, :, j0:j1], k[1, :, j0:j1]
            allowed = block_mask(key_mask, keys_real[j0 // block_k], i0, i1, j0, j1)
            shape = (b, kh, i1 - i0, r, j1 - j0)
            s = scores_float(q0 @ k0.mT, allowed, shape)
            s_dot = (q1 @ k0.mT).baddbmm_(q0, k1.mT).view(shape).to(s.dtype)
            m = rescale(m, s, [a for a in (l_sum, c_sum, acc, acc_s) if a is not None])
            e = s.sub_(m).exp_()  # [B, K, bq, r, bk]; masked entries 0 (or 1 while m is the fill)
            es = s_dot.mul_(e)
            block = [e.sum(-1, keepdim=True), es.sum(-1, keepdim=True)]
            block += [weighted(e, v[:, j0:j1], rows, shape), weighted(es, v[:, j0:j1, :d], rows, shape)]
            if acc is None:
                l_sum, c_sum, acc, acc_s = block
            else:
                for total, part in zip((l_sum, c_sum, acc, acc_s), block, strict=True):
                    total.add_(part)
        o = acc[..., :d] / l_sum
        o_dot = (acc[..., d:] + acc_s) / l_sum - (c_sum / l_sum) * o
        keep = live[:, None, i0:i1, None, None]
        for n, value in enumerate((o, o_dot)):
            dest = out[n][:, i0:i1].permute(0, 2, 1, 3, 4)  # [B, K, bq, r, d]
            dest.copy_(torch.where(keep, value, v_mean[..., n * d : (n + 1) * d]))


def attention_primal(
    q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor, out: Tensor,
    block_q: int = BLOCK_Q, block_k: int = BLOCK_K,
) -> None:  # fmt: skip
    """Primal-only attention: q [B, K, T, r, d], k [B·K, T, d], v [B·K, T, d], key_mask [B, T]
    -> out [B, T, K, r, d] (the primal half of `attention_pair`)."""
    b, kh, t, r, d = q.shape
    live, v_mean = live_rows(key_mask), v.mean(1).view(b, kh, 1, 1, d)
    keys_real = [bool(key_mask[:, j : j + block_k].all()) for j in range(0, t, block_k)]
    for i0 in range(0, t, block_q):
        i1 = min(i0 + block_q, t)
        rows = (b * kh, (i1 - i0) * r)
        q0 = q[:, :, i0:i1].reshape(*rows, d)
        m = l_sum = acc = None
        for j0 in range(0, i1, block_k):
            j1 = min(j0 + block_k, i1)
            allowed = block_mask(key_mask, keys_real[j0 // block_k], i0, i1, j0, j1)
            shape = (b, kh, i1 - i0, r, j1 - j0)
            s = scores_float(q0 @ k[:, j0:j1].mT, allowed, shape)
            m = rescale(m, s, [a for a in (l_sum, acc) if a is not None])
            e = s.sub_(m).exp_()
            l_blk = e.sum(-1, keepdim=True)
            acc_blk = weighted(e, v[:, j0:j1], rows, shape)
            if acc is None:
                l_sum, acc = l_blk, acc_blk
            else:
                l_sum.add_(l_blk)
                acc.add_(acc_blk)
        keep = live[:, None, i0:i1, None, None]
        out[:, i0:i1].permute(0, 2, 1, 3, 4).copy_(torch.where(keep, acc / l_sum, v_mean))
