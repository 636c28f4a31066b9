"""TRL's GRPOTrainer policy loss (trl 1.16, `GRPOTrainer._compute_loss`) as a pure function of the
LoRA dict, on rows in TRL's layout (`trl_rows.TrainerRows`).

Per token, with ρ = exp(logp − old) (token level) or exp(masked mean of logp − old) per row
(sequence level; on-policy old = stopgrad(logp), so ρ = 1 with gradient ∇logp):
    grpo, bnpo, dr_grpo, dapo, luspo:  ℓ = −min(min(ρ, δ)·A, clip(ρ, 1 − ε_low, 1 + ε_high)·A)
    cispo:  ℓ = −stopgrad(min(ρ, ε_high))·A·logp        sapo:  ℓ = −σ(τ_A(ρ − 1))·4/τ_A·A
    vespo:  ℓ = −stopgrad(φ(w))·A·logp, φ TRL's gamma weight of the sequence ratio w
    + β·(exp(ref − logp) − (ref − logp) − 1) (k3 KL; ×ρ with use_bias_correction_kl).
Every loss type is a sum of row terms r_i = w_i · Σ_t mask_it·ℓ_it with a weight w_i fixed by the
micro-batch (`row_weights`), which is what makes the per-prompt decomposition exact:
    grpo, sapo: 1/(B · max(len_i, 1) · GA)     bnpo: 1/(max(tokens of the micro-batch, 1) · GA)
    dr_grpo: 1/(B · max_completion_length · GA)     luspo: 1/(B · GA)
    dapo, cispo, vespo: 1/(max(num_items_in_batch, 1)/num_processes · GA/steps_per_generation)
(B = rows of the micro-batch.) The loss of a micro-batch equals TRL's `_compute_loss` in training
mode; a step's gradient in `p.grad` is the sum over its GA micro-batches, averaged over processes
by DDP, hence the 1/num_processes of the step-level functions here.

Log-probs run through our FunctionalModel like TRL's forward: logits / temperature, the
attention mask cat(prompt_mask, completion_mask), and position ids 0..T−1 over the padded row
(transformers' default when no position ids are passed: TRL's left padding shifts positions,
which rotary attention sees only through rounding; `sequence_logprobs` counts from the mask).
All in the model's compute dtype: under GRPOConfig's default bf16=True TRL autocasts its loss,
which no fp32 computation reproduces (see `TrainerLoss.from_config`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor
from torch.func import grad, vmap

from .grads import zero_sums
from .logprobs import token_logprobs
from .model import FunctionalModel
from .trl_config import LOSS_TYPES, TrainerLoss
from .trl_rows import TrainerRows

__all__ = ["LOSS_TYPES", "TrainerLoss", "trainer_grad", "trainer_group_grads", "trainer_loss",
           "trainer_prompt_losses", "trainer_token_logps"]  # fmt: skip

Dict = dict[str, Tensor]


# ------------------------------------------------------------------ per-token pieces


def trainer_token_logps(
    model: FunctionalModel,
    lora: Mapping[str, Tensor],
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    completion_ids: Tensor,
    completion_mask: Tensor,
    *,
    temperature: float,
) -> Tensor:
    """Per-token log softmax(z / τ)[y] [B, C] (≥ fp32) of the completion tokens, 0 where masked,
    as TRL's fused head computes them. [B, P] and [B, C] inputs; pure in `lora`, vmappable."""
    ids = torch.cat([prompt_ids, completion_ids], dim=-1)  # [B, T]
    mask = torch.cat([prompt_mask, completion_mask], dim=-1)
    positions = torch.arange(ids.shape[-1], device=ids.device).expand_as(ids)  # transformers' default
    hidden = model.hidden_states(lora, ids, mask, positions)  # [B, T, D]
    p = prompt_ids.shape[-1]
    targets = torch.where(completion_mask, completion_ids, 0)  # pad ids may lie outside the vocabulary
    logp = token_logprobs(hidden[:, p - 1 : -1], model.head_weight, targets, temperature=temperature)
    return logp * completion_mask


def token_losses(logp: Tensor, adv: Tensor, mask: Tensor, old: Tensor | None, ref: Tensor | None,
                 cfg: TrainerLoss) -> Tensor:  # fmt: skip
    """TRL's per-token loss ℓ [B, C] (module docstring) from logp [B, C], adv [B], mask [B, C]."""
    old = logp.detach() if old is None else old.to(logp.dtype)
    a = adv.to(logp.dtype)[:, None]  # [B, 1]
    maskf = mask.to(logp.dtype)
    log_ratio = logp - old
    if cfg.importance_sampling_level == "sequence":
        log_ratio_is = ((log_ratio * maskf).sum(-1) / maskf.sum(-1).clamp(min=1.0))[:, None]  # [B, 1]
    else:
        log_ratio_is = log_ratio
    ratio = torch.exp(log_ratio_is)  # TRL's coef_1 before the delta clamp
    if cfg.loss_type == "cispo":
        loss = -torch.clamp(ratio, max=cfg.eps_high).detach() * a * logp
    elif cfg.loss_type == "sapo":
        tau = torch.where(a > 0, cfg.sapo_temperature_pos, cfg.sapo_temperature_neg)
        loss = -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * a
    elif cfg.loss_type == "vespo":
        loss = -gamma_weights(a, log_ratio, maskf, cfg) * a * logp
    else:
        clipped = torch.clamp(ratio, 1 - cfg.eps_low, 1 + cfg.eps_high)
        capped = ratio if cfg.delta is None else torch.clamp(ratio, max=cfg.delta)
        loss = -torch.min(capped * a, clipped * a)
    if cfg.beta != 0.0:
        diff = ref.to(logp.dtype) - logp
        kl = torch.exp(diff) - diff - 1  # k3 estimator of KL(π‖π_ref)
        loss = loss + cfg.beta * (kl * ratio if cfg.use_bias_correction_kl else kl)
    return loss.expand_as(logp)


def gamma_weights(a: Tensor, log_ratio: Tensor, maskf: Tensor, cfg: TrainerLoss) -> Tensor:
    """VESPO's φ(w) = exp(λ + k·log w − λ·w) [B, 1], no gradient (TRL's `get_gamma_weights`
    without vLLM ratios): w the sequence ratio, k, λ by the sign of A."""
    log_ratio, low = log_ratio.detach(), math.log(1e-8)
    seq = (torch.clamp(log_ratio, -20.0, 20.0) * maskf).sum(-1, keepdim=True)
    log_w = torch.clamp(seq, low, 20.0)
    nonneg = a >= 0
    k = torch.where(nonneg, cfg.vespo_k_pos, cfg.vespo_k_neg)
    lam = torch.where(nonneg, cfg.vespo_lambda_pos, cfg.vespo_lambda_neg).clamp(min=1e-4)
    phi = torch.exp(lam + k * log_w - lam * torch.exp(log_w))
    return phi.nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def row_weights(rows: TrainerRows, cfg: TrainerLoss) -> Tensor:
    """w_i [B] (float32) such that TRL's micro-batch loss = Σ_i w_i Σ_t mask·ℓ (module docstring)."""
    b, ga = rows.num_rows, cfg.gradient_accumulation_steps
    lengths = rows.lengths.float()
    if cfg.loss_type in ("grpo", "sapo"):
        w = 1.0 / (b * lengths.clamp(min=1.0) * ga)
    elif cfg.loss_type == "bnpo":
        w = torch.full_like(lengths, 1.0 / (max(float(lengths.sum()), 1.0) * ga))
    elif cfg.loss_type == "dr_grpo":
        w = torch.full_like(lengths, 1.0 / (b * cfg.max_completion_length * ga))
    elif cfg.loss_type == "luspo":
        w = torch.full_like(lengths, 1.0 / (b * ga))
    else:  # dapo, cispo, vespo
        tokens = max(float(rows.num_items_in_batch), 1.0) / cfg.num_processes
        w = torch.full_like(lengths, 1.0 / (tokens * ga / cfg.spg))
    return w


# ------------------------------------------------------------------ losses and gradients


def checked(model: FunctionalModel, rows: TrainerRows, cfg: TrainerLoss, where: str) -> TrainerRows:
    """`rows` on the model's device after the checks TRL's loss needs, else ValueError naming `where`."""
    if cfg.beta != 0.0 and rows.ref_logps is None:
        raise ValueError(f"{where}: beta={cfg.beta} needs ref_logps (TRL's ref_per_token_logps)")
    if cfg.needs_old_logps and rows.old_logps is None:
        raise ValueError(f"{where}: GA={cfg.gradient_accumulation_steps}, steps_per_generation={cfg.spg}, "
                         f"num_iterations={cfg.num_iterations} make the step off-policy; it needs old_logps "
                         "(TRL's old_per_token_logps)")  # fmt: skip
    longest = int(rows.lengths.max())
    if longest > cfg.max_completion_length:
        raise ValueError(f"{where}: a completion has {longest} loss tokens, more than "
                         f"max_completion_length={cfg.max_completion_length}")  # fmt: skip
    real = torch.cat([rows.prompt_mask, rows.completion_mask], -1)
    ids = torch.cat([rows.prompt_ids, rows.completion_ids], -1)
    bad = real & ((ids < 0) | (ids >= model.vocab_size))
    if bool(bad.any()):
        row, col = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"{where}, row {row}: token id {int(ids[row, col])} outside the vocabulary "
                         f"[0, {model.vocab_size})")  # fmt: skip
    return rows.to(model.device)


def row_tensors(rows: TrainerRows, cfg: TrainerLoss) -> tuple[Tensor | None, ...]:
    """The per-row tensors `row_losses_on` takes, in order (the row weight last)."""
    return (rows.prompt_ids, rows.prompt_mask, rows.completion_ids, rows.completion_mask, rows.advantages,
            rows.old_logps, rows.ref_logps, row_weights(rows, cfg).to(rows.advantages.device))  # fmt: skip


def row_losses_on(model, lora, cfg: TrainerLoss, pid, pmask, cid, cmask, adv, old, ref, w) -> Tensor:
    """r_i = w_i Σ_t mask·ℓ [B] on plain [B, ...] tensors (vmappable over rows)."""
    logp = trainer_token_logps(model, lora, pid, pmask, cid, cmask, temperature=cfg.temperature)
    loss = token_losses(logp, adv, cmask, old, ref, cfg)
    return w.to(loss.dtype) * (loss * cmask).sum(-1)


def checked_micro_batches(
    model: FunctionalModel, lora: Mapping[str, Tensor], micro_batches: TrainerRows | Sequence[TrainerRows],
    loss: TrainerLoss,
) -> list[TrainerRows]:  # fmt: skip
    """The LoRA dict and every micro-batch checked against the model (ValueError naming the item)."""
    model.check_lora(lora)
    mbs = [micro_batches] if isinstance(micro_batches, TrainerRows) else list(micro_batches)
    if not mbs or not all(isinstance(m, TrainerRows) for m in mbs):
        raise ValueError("micro_batches must be a TrainerRows or a non-empty sequence of them")
    return [checked(model, m, loss, f"micro-batch {i}") for i, m in enumerate(mbs)]


def trainer_loss(model: FunctionalModel, lora: Mapping[str, Tensor], rows: TrainerRows, loss: TrainerLoss) -> Tensor:
    """TRL's `_compute_loss` (training mode) on one micro-batch: a scalar (≥ fp32), pure in `lora`."""
    model.check_lora(lora)
    rows = checked(model, rows, loss, "micro-batch")
    return row_losses_on(model, lora, loss, *row_tensors(rows, loss)).sum()


def trainer_prompt_losses(
    model: FunctionalModel,
    lora: Mapping[str, Tensor],
    micro_batches: TrainerRows | Sequence[TrainerRows],
    loss: TrainerLoss,
    *,
    num_groups: int | None = None,
) -> Tensor:
    """Per-prompt losses [N] (N = num_groups or 1 + the largest group index): Σ over the rows of
    prompt n of r_i / num_processes. Their sum is the step's loss, whose gradient is TRL's `p.grad`
    after the step's micro-batches (all of them, or one rank's share summed over ranks). Pure in
    `lora`, so `grad`, `vjp` and the α-trick apply."""
    mbs = checked_micro_batches(model, lora, micro_batches, loss)
    n = group_count(mbs, num_groups)
    out = None
    for mb in mbs:
        r = row_losses_on(model, lora, loss, *row_tensors(mb, loss)) / loss.num_processes
        out = r.new_zeros(n) if out is None else out
        out = out.index_add(0, mb.group, r)
    return out


def trainer_grad(
    model: FunctionalModel,
    lora: Mapping[str, Tensor],
    micro_batches: TrainerRows | Sequence[TrainerRows],
    loss: TrainerLoss,
) -> Dict:
    """∇θ of the step's loss (1/num_processes) Σ_mb TRL-loss(mb), one reverse pass per micro-batch:
    a dict like `lora` (≥ fp32) equal to what TRL's trainer leaves in the LoRA parameters' .grad."""
    mbs = checked_micro_batches(model, lora, micro_batches, loss)
    total = zero_sums(lora)
    for mb in mbs:
        tensors = row_tensors(mb, loss)
        g = grad(lambda p, t=tensors: row_losses_on(model, p, loss, *t).sum() / loss.num_processes)(lora)
        for k in total:
            total[k] += g[k]
    return total


def trainer_group_grads(
    model: FunctionalModel,
    lora: Mapping[str, Tensor],
    micro_batches: TrainerRows | Sequence[TrainerRows],
    loss: TrainerLoss,
    *,
    num_groups: int | None = None,
    chunk_size: int | None = None,
) -> Dict:
    """Per-prompt gradients ∇θ L[n] of `trainer_prompt_losses`: a dict of [N, *shape] tensors
    (≥ fp32) whose sum over n is `trainer_grad`. Per-row gradients by vmap(grad) over each
    micro-batch's rows (`chunk_size` rows at a time), added into their group."""
    mbs = checked_micro_batches(model, lora, micro_batches, loss)
    n = group_count(mbs, num_groups)
    total = {k: v.new_zeros((n, *v.shape), dtype=torch.promote_types(v.dtype, torch.float32))
             for k, v in lora.items()}  # fmt: skip

    def one(p, *t):  # one row: tensors without the row dimension -> scalar r_i / num_processes
        return row_losses_on(model, p, loss, *(None if x is None else x[None] for x in t))[0] / loss.num_processes

    for mb in mbs:
        tensors = row_tensors(mb, loss)
        in_dims = (None, *(None if t is None else 0 for t in tensors))
        per_row = vmap(grad(one), in_dims=in_dims, chunk_size=chunk_size)(lora, *tensors)
        for k in total:
            total[k].index_add_(0, mb.group, per_row[k].to(total[k].dtype))
    return total


def group_count(mbs: list[TrainerRows], num_groups: int | None) -> int:
    largest = max(int(m.group.max()) for m in mbs) + 1
    if num_groups is None:
        return largest
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < largest:
        raise ValueError(f"num_groups={num_groups!r}; expected an int ≥ {largest} (1 + the largest group index)")
    return num_groups
