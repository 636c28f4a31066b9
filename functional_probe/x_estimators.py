"""The Rao–Blackwellized X loss (`x_estimator="rb"`): per-token entropies plus an entropy-to-go score term.

Target (DESIGN §1, dr_grpo): H_n(θ) = E_{y~π_θ}[−S(y)] / Lmax[n]. Per token, with
H_t(θ; y<t) = −Σ_v π(v|y<t) log π(v|y<t) the full-softmax entropy at response position t,
E[−log π(y_t|y<t) | y<t] = H_t, so (the response stops at EOS, a stopping time)

    E[−S] = E[Σ_t H_t(θ; y<t)]
    ∇E[−S] = E[Σ_t ∇H_t] + E[Σ_t H_t · ∇log π(y<t)] = E[Σ_t ∇H_t + Σ_t ∇log π(y_t|y<t) · R_t],

R_t = Σ_{t'>t} H_t' (the entropy-to-go from t+1: H_t' depends on y_t only for t' > t). Any b_t
independent of response g's tokens has E[∇log π(y_t|y<t) · b_t] = 0; b is the leave-one-out
mean of R_t over the prompt's other G − 1 responses (0 past a response's end; G = 1: b = 0).
The loss per prompt, with c = stopgrad((R − b)·keep):

    Lrb[n] = (1/Lmax[n]) · mean_g Σ_t [H_t + c_t · log π(y_t|y<t)]      so E[∇Lrb[n]] = ∇H_n,

the same expectation as the "loo" loss (`losses.x_loss_values`), whose gradient differentiates
only log π(y). Only the dr_grpo weighting has this form (per_token_avg divides by the response's
own length, which is no function of a prefix), so "rb" requires weighting="dr_grpo".
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from einops import rearrange
from torch import Tensor

from .head import logits, softmax_
from .model import FunctionalModel
from .model.kernels import PLAIN, Kernels

X_ESTIMATORS: tuple[str, ...] = ("loo", "rb")
DEFAULT_CHUNK = 1024


def check_x_estimator(x_estimator: str, weighting: str = "dr_grpo") -> None:
    """ValueError naming `x_estimator` unless it is "loo", or "rb" with the dr_grpo weighting."""
    if not isinstance(x_estimator, str) or x_estimator not in X_ESTIMATORS:
        raise ValueError(f"x_estimator={x_estimator!r}; expected one of {X_ESTIMATORS}")
    if x_estimator == "rb" and weighting != "dr_grpo":
        raise ValueError(f"x_estimator='rb' needs weighting='dr_grpo' (got {weighting!r}): "
                         "the per-token entropy sum has the fixed denominator Lmax only")  # fmt: skip


def check_rb_split(loss: str, x_estimator: str, response_microbatch: int | None) -> None:
    """The "rb" X loss is not linear in S, so its responses cannot be split over reverse passes."""
    if loss == "x" and x_estimator == "rb" and response_microbatch is not None:
        raise ValueError(f"response_microbatch={response_microbatch!r} needs x_estimator='loo' "
                         "(the 'rb' X loss is not linear in S; it takes a prompt's G responses at once)")  # fmt: skip


class _ChunkedEntropy(torch.autograd.Function):
    """(log π(y), H) per row from hidden [M, D], head W [V, D]; backward recomputes each chunk.

    With z = h Wᵀ/τ, p = softmax z: ∂log p_y/∂z = onehot(y) − p and ∂H/∂z_j = −p_j (log p_j + H),
    so the upstream (g₁, g₂) gives ∂z = g₁(onehot − p) − g₂ p (log p + H), then ∂h = ∂z W/τ,
    ∂W = ∂zᵀ h/τ. Nothing [M, V] is kept for backward."""

    generate_vmap_rule = True

    @staticmethod
    def forward(hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float, chunk: int):
        return plain_entropy_head(hidden, weight, targets, temperature, chunk)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        hidden, weight, targets, temperature, chunk = inputs
        ctx.temperature, ctx.chunk = temperature, chunk
        ctx.save_for_backward(hidden, weight, targets, output[1])

    @staticmethod
    @torch.no_grad()  # torch.func.grad runs backward with create_graph=True: record nothing
    def backward(ctx, g_logp: Tensor, g_ent: Tensor):
        hidden, weight, targets, ent = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[:2]
        acc = torch.promote_types(g_logp.dtype, g_ent.dtype)
        w = weight.to(acc)
        pieces, grad_w = [], None  # out of place: under vmap any of these may be batched
        for start in range(0, hidden.shape[0], ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            h, y = hidden[rows], targets[rows]
            p = softmax_(logits(h, weight, ctx.temperature, acc))  # [c, V]
            g1, g2 = g_logp[rows, None] / ctx.temperature, g_ent[rows, None] / ctx.temperature
            lp = p.clamp_min(torch.finfo(acc).tiny).log()
            dz = (-g1 * p - g2 * p * (lp + ent[rows, None].to(acc))).scatter_add(-1, y[:, None], g1)
            if need_h:
                pieces.append((dz @ w).to(hidden.dtype))
            if need_w:
                grad_w = dz.T @ h.to(acc) if grad_w is None else grad_w + dz.T @ h.to(acc)
        grad_h = torch.cat(pieces) if need_h else None
        return grad_h, None if grad_w is None else grad_w.to(weight.dtype), None, None, None


def plain_entropy_head(hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float,
                       chunk: int) -> tuple[Tensor, Tensor]:  # fmt: skip
    """The same (log π(y), H) [M] by plain ops (composes with jvp and double reverse; reverse
    mode keeps each chunk's [c, V])."""
    acc = torch.promote_types(hidden.dtype, torch.float32)
    logp, ent = [], []
    for start in range(0, hidden.shape[0], chunk):
        lp = logits(hidden[start : start + chunk], weight, temperature, acc).log_softmax(-1)
        logp.append(lp.gather(-1, targets[start : start + chunk, None])[:, 0])
        ent.append(-(lp.exp() * lp).sum(-1))
    return torch.cat(logp), torch.cat(ent)


def grouped_token_terms(
    model: FunctionalModel, lora: Mapping[str, Tensor], input_ids: Tensor, attention_mask: Tensor,
    position_ids: Tensor, response_mask: Tensor, *, prompt_end: int, temperature: float,
    kernels: Kernels = PLAIN, chunk: int = DEFAULT_CHUNK,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """(log π(y_t), H_t, keep) on the response columns: [..., G, T] inputs -> three [..., G, L]
    (L = T − prompt_end; keep = the response mask as ≥ fp32; logp and H are 0 where keep is 0).
    Static shapes (all columns, pads included), so it vmaps over prompts like `grouped_logprobs`."""
    lead = input_ids.shape[:-1]
    flat = lambda t: t.reshape(-1, t.shape[-1])  # noqa: E731  [(...·G), T]
    ids, response = flat(input_ids), flat(response_mask)
    hidden = model.hidden_states(lora, ids, flat(attention_mask), flat(position_ids), kernels=kernels)
    keep = response[:, prompt_end:]  # [R, L]
    targets = torch.where(keep, ids[:, prompt_end:], 0)  # pad ids may lie outside the vocabulary
    h = rearrange(hidden[:, prompt_end - 1 : -1], "r l d -> (r l) d")
    if kernels.head == "recompute":
        logp, ent = _ChunkedEntropy.apply(h, model.head_weight, targets.reshape(-1), float(temperature), chunk)
    else:
        logp, ent = plain_entropy_head(h, model.head_weight, targets.reshape(-1), temperature, chunk)
    k = keep.to(logp.dtype)
    shape = (*lead, keep.shape[-1])
    return (logp.reshape(keep.shape) * k).reshape(shape), (ent.reshape(keep.shape) * k).reshape(shape), k.reshape(shape)


def rb_loss_values(logp: Tensor, ent: Tensor, keep: Tensor, max_lengths: Tensor) -> Tensor:
    """Lrb [N] from logp, H, keep [N, G, L] (masked) and Lmax [N] (module doc):
    R_t = Σ_{t'>t} H_t', b = leave-one-out mean of R over g, c = stopgrad((R − b)·keep)."""
    group = ent.shape[1]
    to_go = ent.flip(-1).cumsum(-1).flip(-1) - ent  # [N, G, L] Σ_{t'>t} H_t'
    baseline = (to_go.sum(1, keepdim=True) - to_go) / max(group - 1, 1)
    c = ((to_go - baseline) * keep).detach()
    per_response = (ent + c * logp).sum(-1)  # [N, G]
    return per_response.mean(1) / max_lengths.to(ent.device, ent.dtype)
