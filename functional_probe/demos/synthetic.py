"""Synthetic rollouts for the demo: responses sampled from the model itself, a toy reward."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from einops import repeat
from torch import Tensor

from ..model import FunctionalModel
from ..rollouts import Rollouts


@torch.no_grad()
def sample_rollouts(
    model: FunctionalModel,
    lora: Mapping[str, Tensor],
    *,
    num_prompts: int,
    group_size: int,
    prompt_length: int = 8,
    response_length: int = 12,
    temperature: float = 1.0,
    seed: int = 0,
) -> Rollouts:
    """Random prompts, G responses each sampled from the model (no KV cache: it is tiny),
    truncated at random lengths; reward = share of response tokens in the lower half of the
    vocabulary, centred per prompt into advantages as in GRPO."""
    gen = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, model.vocab_size, (num_prompts, prompt_length), generator=gen)
    ids = repeat(prompts, "n t -> (n g) t", g=group_size).to(model.device)
    for _ in range(response_length):
        logits = model(lora, ids)[:, -1].float().cpu() / temperature  # [N·G, V]
        nxt = torch.multinomial(logits.softmax(-1), 1, generator=gen)
        ids = torch.cat([ids, nxt.to(ids.device)], dim=1)
    lengths = torch.randint(
        response_length // 2, response_length + 1, (num_prompts * group_size,), generator=gen
    )
    rows = ids[:, prompt_length:].cpu().tolist()
    responses = [rows[i][: int(lengths[i])] for i in range(len(rows))]
    rewards = torch.tensor([sum(t < model.vocab_size // 2 for t in r) / len(r) for r in responses])
    adv = rewards.reshape(num_prompts, group_size)
    adv = adv - adv.mean(1, keepdim=True)
    group = lambda xs, n: xs[n * group_size : (n + 1) * group_size]  # noqa: E731
    return Rollouts(
        prompts=prompts.tolist(),
        responses=[group(responses, n) for n in range(num_prompts)],
        advantages=adv.tolist(),
    )


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
