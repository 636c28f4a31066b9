"""The real-model demo: SmolLM2-135M-Instruct learning arithmetic, probed before its next step.

Pipeline (`run_demo`): arithmetic questions through the chat template; G responses per prompt
sampled by the model itself (`sampling.sample`, temperature 1, EOS = <|im_end|>); reward 1 when
the last integer in the response equals the answer (`verify`); GRPO advantages (r − mean_g) /
(std_g + 1e-4) (`trl_rows.trl_advantages`); `steps` real torch AdamW steps on the LoRA dict, each
on a fresh on-policy batch; then, at the trained θ, the exact next AdamW step's δH₁ ± SE
(`probe(optimizer=...)`) on fresh E and U, and optionally the entropy check (`entropy_check`):
predicted against realized ΔH along θ + s·Δθ. Lmax[n] = `max_new_tokens` for every prompt (the
Dr. GRPO normaliser of a trainer with max_completion_length = max_new_tokens).

The tokenizer is duck-typed (`apply_chat_template(messages, tokenize=False,
add_generation_prompt=True)`, `encode(text, add_special_tokens=False)`, `decode(ids,
skip_special_tokens=True)`, `eos_token_id`), so the pipeline also runs on the tiny model with a
stand-in tokenizer (tests).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ..batch import Batch, make_batch
from ..entropy_check import EntropyCheck, entropy_check
from ..grads import mean_grad
from ..model import FunctionalModel
from ..optim_step import next_step
from ..probe import ProbeResult, probe
from ..sampling import sample
from ..trl_rows import trl_advantages

OPERATORS = ("+", "-", "*")
LAST_INTEGER = re.compile(r"-?\d+")
CHECK_SCALES = (0.25, 0.5, 1.0, 2.0, 4.0)  # multiples of the exact next step


@dataclass(frozen=True)
class Problem:
    question: str
    answer: int


def arithmetic_problems(count: int, seed: int = 0) -> list[Problem]:
    """`count` questions "What is a op b?" with a, b in [2, 20] and op in + − ×, seeded."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count={count!r}; expected a positive int (the number of problems)")
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        a, b, op = rng.randint(2, 20), rng.randint(2, 20), rng.choice(OPERATORS)
        answer = a + b if op == "+" else a - b if op == "-" else a * b
        out.append(Problem(f"What is {a} {op} {b}? Give the final answer as a number.", answer))
    return out


def chat_prompt(tokenizer, question: str) -> list[int]:
    """Token ids of one user turn through the chat template, ending with the assistant header."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                         add_generation_prompt=True)  # fmt: skip
    return list(tokenizer.encode(text, add_special_tokens=False))


def final_number(text: str) -> int | None:
    """The last integer in `text` (thousands separators dropped), None if it has none."""
    found = LAST_INTEGER.findall(text.replace(",", ""))
    return int(found[-1]) if found else None


def verify(text: str, answer: int) -> float:
    """The verifier's reward: 1.0 if the response's last integer is `answer`, else 0.0."""
    return float(final_number(text) == answer)


def grpo_advantages(rewards: Tensor) -> Tensor:
    """GRPO advantages [N, G] (float32) from rewards [N, G]: (r − mean_g r) / (std_g r + 1e-4),
    std unbiased within each prompt's group (TRL's scale_rewards="group")."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be [N, G] with G >= 2, got shape {tuple(rewards.shape)}")
    n, g = rewards.shape
    return trl_advantages(rewards.reshape(-1), torch.arange(n).repeat_interleave(g)).reshape(n, g)


@dataclass(frozen=True)
class Rollout:
    """One sampled batch: `batch` (with advantages, Lmax = max_new_tokens) and rewards [N, G]."""

    batch: Batch
    rewards: Tensor


def rollout(model: FunctionalModel, lora: Mapping[str, Tensor], tokenizer, problems: Sequence[Problem], *,
            samples: int, max_new_tokens: int, seed: int) -> Rollout:  # fmt: skip
    """`samples` responses per problem from the model at `lora`, verified and turned into a Batch."""
    prompts = [chat_prompt(tokenizer, p.question) for p in problems]
    drawn = sample(model, lora, prompts, samples_per_prompt=samples, max_new_tokens=max_new_tokens,
                   eos_token_id=tokenizer.eos_token_id, seed=seed)  # fmt: skip
    responses = drawn.responses()
    rewards = torch.tensor([[verify(tokenizer.decode(r, skip_special_tokens=True), p.answer) for r in group]
                            for p, group in zip(problems, responses, strict=True)])  # fmt: skip
    batch = make_batch(
        prompts, responses, advantages=grpo_advantages(rewards), max_lengths=[max_new_tokens] * len(prompts)
    )
    return Rollout(batch, rewards)


def adamw_steps(model: FunctionalModel, lora: Mapping[str, Tensor], draw: Callable[[dict, int], Rollout], *,
                steps: int, lr: float) -> tuple[torch.optim.AdamW, dict[str, torch.nn.Parameter], list[float]]:  # fmt: skip
    """`steps` torch AdamW steps minimising −mean Ly, each on `draw(θ, step)` sampled at the current θ.
    Returns the optimizer, its named parameters (θ after the steps) and each batch's mean reward."""
    params = {k: torch.nn.Parameter(v.detach().clone()) for k, v in lora.items()}
    opt = torch.optim.AdamW(params.values(), lr=lr)
    rewards = []
    for i in range(steps):
        theta = {k: p.detach() for k, p in params.items()}
        batch = draw(theta, i)
        rewards.append(float(batch.rewards.mean()))
        g = mean_grad(model, theta, batch.batch, loss="y")
        for k, p in params.items():
            p.grad = -g[k]  # the trainer minimises −Ly
        opt.step()
    return opt, params, rewards


@dataclass
class DemoResult:
    probe: ProbeResult
    check: EntropyCheck | None
    train_rewards: list[float]  # mean reward of each training batch
    eval_reward: float  # mean reward of E at the probed θ
    update_reward: float


def batches(model: FunctionalModel, tokenizer, *, prompts: int, samples: int, max_new_tokens: int, seed: int,
            problems: Callable[[int, int], list[Problem]] = arithmetic_problems) -> Callable[[dict, int], Rollout]:  # fmt: skip
    """draw(θ, i): batch i, `prompts` problems (`problems(prompts, seed')`) × `samples` responses at θ,
    seed' = seed·100003 + i for both the problems and the sampler (distinct i: independent batches)."""

    def draw(theta: Mapping[str, Tensor], i: int) -> Rollout:
        key = seed * 100_003 + i
        return rollout(model, theta, tokenizer, problems(prompts, key), samples=samples,
                       max_new_tokens=max_new_tokens, seed=key)  # fmt: skip

    return draw


def run_demo(model: FunctionalModel, tokenizer, *, prompts: int = 8, samples: int = 4, max_new_tokens: int = 32,
             steps: int = 3, lr: float = 1e-3, seed: int = 0, check: bool = False,
             scales: Sequence[float] = CHECK_SCALES, problems: Callable[[int, int], list[Problem]] = arithmetic_problems,
             progress: Callable[[str], None] | None = None) -> DemoResult:  # fmt: skip
    """The demo's pipeline (module docstring): train `steps` AdamW steps on batches of `prompts`
    problems × `samples` responses, then probe the next step on fresh E and U of the same size."""
    say = progress or (lambda _: None)
    draw = batches(model, tokenizer, prompts=prompts, samples=samples, max_new_tokens=max_new_tokens, seed=seed,
                   problems=problems)  # fmt: skip
    say(f"{steps} AdamW steps, each on {prompts} fresh problems × {samples} sampled responses")
    opt, params, train_rewards = adamw_steps(model, model.lora, draw, steps=steps, lr=lr)
    theta = {k: p.detach() for k, p in params.items()}
    say("fresh E and U sampled at the trained θ")
    E, U = draw(theta, steps), draw(theta, steps + 1)
    result = probe(model, theta, E.batch, U.batch, optimizer=opt, named_params=params, progress=say)
    entropy = None
    if check:
        say("entropy check: realized ΔH along θ + s·Δθ (fresh coupled samples)")
        step = exact_step(model, theta, U.batch, opt, params)
        entropy = entropy_check(model, theta, step, E.batch, scales, delta_h1=result.delta_h1, delta_h1_se=result.se_conditional,
                                samples_per_prompt=samples, max_new_tokens=max_new_tokens,
                                eos_token_id=tokenizer.eos_token_id, seed=seed + 7)  # fmt: skip
    return DemoResult(result, entropy, train_rewards, float(E.rewards.mean()), float(U.rewards.mean()))


def exact_step(model: FunctionalModel, theta: Mapping[str, Tensor], U: Batch, opt: torch.optim.Optimizer,
               params: Mapping[str, torch.nn.Parameter]) -> dict[str, Tensor]:  # fmt: skip
    """Δθ that `opt.step()` takes next with p.grad = −mean ∇Ly over U (the probe's step)."""
    g = mean_grad(model, theta, U, loss="y")
    return next_step(opt, params, {k: -v for k, v in g.items()})
