"""The baselines, written the way the seed wrote them on a plain PEFT model with torch.autograd."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from functional_probe.batch import Batch

# ----------------------------------------------------------------------------- baselines


BASELINES = ("autograd_alpha", "autograd_loop", "opacus")
FORWARDS = ("forward_eager", "forward_sdpa")


def flat_rows(batch: Batch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """input_ids, attention_mask (long), position_ids, response_mask as [N·G, T]."""
    n, g, t = batch.input_ids.shape
    flat = lambda x: x.reshape(n * g, t)  # noqa: E731
    return (flat(batch.input_ids), flat(batch.attention_mask).long(), flat(batch.position_ids),
            flat(batch.response_mask))  # fmt: skip


def peft_logits(peft_model, batch: Batch) -> Tensor:
    """The PEFT model's logits [N·G, T, V] on the padded batch (positions from the batch)."""
    ids, mask, pos, _ = flat_rows(batch)
    return peft_model(input_ids=ids, attention_mask=mask, position_ids=pos).logits


def peft_sequence_logprobs(peft_model, batch: Batch) -> Tensor:
    """S [N, G] the seed's way: full logits, full log_softmax, gather, masked sum."""
    ids, _, _, response = flat_rows(batch)
    logp = peft_logits(peft_model, batch)[:, :-1].float().log_softmax(-1)
    logp = logp.gather(-1, ids[:, 1:, None])[..., 0]
    return (logp * response[:, 1:]).sum(-1).reshape(batch.num_prompts, batch.group_size)


def seed_x_losses(S: Tensor, batch: Batch) -> Tensor:
    """DESIGN §1 transcribed (dr_grpo): w = S/Lmax, leave-one-out b, c = stopgrad(w − b),
    Lx[n] = −mean_g(c·S)."""
    G = S.shape[1]
    w = S / batch.max_lengths[:, None]
    b = (w.sum(1, keepdim=True) - w) / max(G - 1, 1)
    c = (w - b).detach()
    return -(c * S).mean(1)


def trainable(peft_model) -> dict[str, Tensor]:
    """The PEFT model's trainable parameters (its LoRA factors) by name."""
    return {n: p for n, p in peft_model.named_parameters() if p.requires_grad}


def autograd_alpha(peft_model, batch: Batch, direction: Mapping[str, Tensor]) -> Tensor:
    """The seed's α-trick with `torch.autograd.grad` (double reverse)."""
    params = trainable(peft_model)
    alpha = torch.ones(batch.num_prompts, requires_grad=True)
    L = (alpha * seed_x_losses(peft_sequence_logprobs(peft_model, batch), batch)).sum()
    g = torch.autograd.grad(L, list(params.values()), create_graph=True)
    h = sum((gk * direction[k]).sum() for k, gk in zip(params, g, strict=True))
    return torch.autograd.grad(h, alpha)[0].detach()


def autograd_loop(peft_model, batch: Batch, direction: Mapping[str, Tensor]) -> Tensor:
    """One forward and `torch.autograd.grad` per prompt (its G rows, padding trimmed)."""
    params = trainable(peft_model)
    out = []
    for n in range(batch.num_prompts):
        one = batch[n]
        Lx = seed_x_losses(peft_sequence_logprobs(peft_model, one), one)[0]
        g = torch.autograd.grad(Lx, list(params.values()))
        out.append(sum((gk * direction[k]).sum() for k, gk in zip(params, g, strict=True)).detach())
    return torch.stack(out)


def opacus_module(peft_model):
    """Opacus `GradSampleModule` around a PEFT model (per-row gradients, loss_reduction='sum')."""
    from opacus import GradSampleModule

    return GradSampleModule(peft_model, batch_first=True, loss_reduction="sum")


def opacus_projections(gsm, batch: Batch, direction: Mapping[str, Tensor]) -> Tensor:
    """Per-row gradients of Σ_n Lx[n] by Opacus hooks, summed per prompt, contracted with μY."""
    gsm.zero_grad(set_to_none=True)
    S = peft_sequence_logprobs(gsm, batch)
    seed_x_losses(S, batch).sum().backward()
    n, g = batch.num_prompts, batch.group_size
    s = torch.zeros(n)
    for name, p in gsm.named_parameters():
        if p.requires_grad:
            key = name.removeprefix("_module.")
            rows = p.grad_sample.reshape(n * g, -1) @ direction[key].reshape(-1)
            s += rows.reshape(n, g).sum(1)
    gsm.zero_grad(set_to_none=True)
    return s


def plain_forward(peft_model, batch: Batch) -> Tensor:
    """The PEFT model's forward of the whole batch under no_grad (the '× forward' denominator)."""
    with torch.no_grad():
        return peft_logits(peft_model, batch)
