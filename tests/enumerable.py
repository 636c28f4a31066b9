"""A model small enough to enumerate every response, and exact entropies by enumeration.

The reference the sampler and the realized/curvature estimators are tested against: every
response y of at most L tokens (ending at EOS, or at L), its exact log-probability from the
teacher-forced `fp.sequence_logprobs`, and H_n = −Σ_y π(y) S(y) / L.
"""

from __future__ import annotations

import itertools
import math

import torch

import functional_probe as fp
from functional_probe.model.base_weights import dense_or_nf4
from functional_probe.model.loading import build_model
from functional_probe.model.tiny import tiny_config, tiny_lora, tiny_state_dict

VOCAB = 6
LENGTH, EOS = 3, 2  # responses of at most 3 tokens, token 2 ends one: 156 per prompt
PROMPTS = [[1, 4], [2, 0, 5, 3], [5], [0, 3, 3], [4, 1, 2], [3, 5]]


def enumerable_model(seed: int = 0, dtype=torch.float64, quantize=None):
    """A random Qwen2 (GQA, q/k/v biases) with V = 6, hidden 32, two layers, LoRA on all projections."""
    config = tiny_config(vocab_size=VOCAB, hidden_size=32, num_layers=2)
    state = tiny_state_dict(config, seed)
    frozen = dense_or_nf4(state.get, quantize, dtype, "cpu")
    return build_model(config, state.get, frozen, tiny_lora(config, seed), dtype=dtype)


def all_responses(length: int, eos: int | None = None, vocab: int = VOCAB) -> list[list[int]]:
    """Every response a sampler with max_new_tokens = length (and this EOS id) can produce."""
    out = []
    for n in range(1, length + 1):
        for y in itertools.product(range(vocab), repeat=n):
            if eos is not None and eos in y[:-1]:
                continue
            if eos is not None and n < length and y[-1] != eos:
                continue
            if eos is None and n < length:
                continue
            out.append(list(y))
    return out


def exact_logprobs(model, lora, prompts, length, eos=None, temperature=1.0):
    """(responses, S [N, Y] float64) over all responses; Σ_y exp(S) = 1 is checked."""
    responses = all_responses(length, eos, model.vocab_size)
    batch = fp.make_batch(prompts, [responses] * len(prompts), max_lengths=[length] * len(prompts))
    S = fp.sequence_logprobs(model, lora, batch, temperature=temperature).double()
    total = S.exp().sum(1)
    assert torch.allclose(total, torch.ones_like(total), atol=1e-9), total
    return responses, S


def exact_entropy(model, lora, prompts, length, eos=None, temperature=1.0) -> torch.Tensor:
    """H_n = E_π[−S] / L for every prompt: [N] float64."""
    _, S = exact_logprobs(model, lora, prompts, length, eos, temperature)
    return -(S.exp() * S).sum(1) / length


def shifted(lora, step, s: float):
    return {k: lora[k] + s * step[k] for k in lora}


def random_step(lora, seed: int = 1, scale: float = 0.3):
    """A direction like lora with ‖Δθ_k‖ = scale·‖θ_k‖ per tensor (so ΔH is order 1e-2 at s = 1)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in lora.items():
        d = torch.randn(v.shape, generator=gen, dtype=v.dtype)
        out[k] = d * (scale * v.norm() / d.norm())
    return out


def draw_from_exact(responses, S, group: int, seed: int):
    """G responses per prompt drawn by torch.multinomial from the enumerated π (independent of
    the project's sampler): [N][G] token lists."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.multinomial(S.exp(), group, replacement=True, generator=gen)
    return [[responses[int(i)] for i in row] for row in idx]


def z_score(value: float, se: float, exact: float) -> float:
    assert se > 0 and math.isfinite(se)
    return abs(value - exact) / se
