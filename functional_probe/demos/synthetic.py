"""Synthetic rollouts for the demo: responses sampled from the model itself, a toy reward."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from ..model import FunctionalModel
from ..rollouts import Rollouts


def confident_rollouts(
    model: FunctionalModel,
    lora: Mapping[str, Tensor],
    *,
    num_prompts: int,
    group_size: int,
    prompt_length: int = 8,
    response_length: int = 12,
    seed: int = 0,
) -> Rollouts:
    """Random prompts, G responses each drawn from π_θ itself by `sampling.sample` (temperature
    1, no EOS: every response has `response_length` tokens, so the batch's Lmax is that length),
    reward = the response's own mean token log-probability S/L, centred per prompt into GRPO
    advantages. This confidence reward sharpens the policy: its policy gradient is
    Cov(S, ∇S)/L² = −∇H per prompt, so the step it drives should lower the entropy at first
    order, and the realized-entropy check has something to resolve. Draws from π are what the
    realized change is measured on (a truncated or filtered E would describe another distribution)."""
    from ..sampling import sample

    gen = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, model.vocab_size, (num_prompts, prompt_length), generator=gen).tolist()
    drawn = sample(model, lora, prompts, samples_per_prompt=group_size, max_new_tokens=response_length, seed=seed)
    reward = drawn.stats.logp / response_length  # [N, G]
    adv = reward - reward.mean(1, keepdim=True)
    return Rollouts(prompts=prompts, responses=drawn.responses(), advantages=adv.tolist())
