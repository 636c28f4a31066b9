"""The SmolLM2 arithmetic demo: problems, verifier, prompts, advantages, training and the pipeline
(on the tiny model with a stand-in tokenizer; the real model runs in bench/, not here)."""

import math
import random
import re
import statistics

import pytest
import torch
from helpers import dict_rel_err, torch_step_delta

import functional_probe as fp
from functional_probe.demos.smollm2 import (
    Problem,
    adamw_steps,
    arithmetic_problems,
    batches,
    chat_prompt,
    exact_step,
    final_number,
    grpo_advantages,
    rollout,
    run_demo,
    verify,
)
from functional_probe.fetch import cache_dir


class DigitTokenizer:
    """A stand-in for a HF tokenizer on the tiny model (vocab 512): characters are their code
    points, 500 is EOS; decode writes each token t as the digit t % 10, space-separated, so the
    verifier's last integer is the last token's digit."""

    eos_token_id = 500

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert tokenize is False
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + (
            "<assistant>" * add_generation_prompt
        )

    def encode(self, text, add_special_tokens):
        return [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens):
        return " ".join(str(t % 10) for t in ids if t != self.eos_token_id)


def digit_problems(count, seed):
    """Problems whose answer is one digit: the stand-in's responses hit it about 1 time in 10."""
    rng = random.Random(seed)
    return [Problem(f"What is {d} + 0?", d) for d in (rng.randrange(10) for _ in range(count))]


@pytest.mark.parametrize(
    "text, number",
    [("The answer is 42.", 42), ("3 + 4 = 7", 7), ("so it is -15", -15), ("1,024 in all", 1024),
     ("12 apples, then 13", 13), ("no number here", None), ("", None)],
)  # fmt: skip
def test_final_number_is_the_last_integer(text, number):
    assert final_number(text) == number


def test_verifier_rewards_only_the_right_final_number():
    assert verify("7 * 6 = 42", 42) == 1.0
    assert verify("42, no wait, 41", 42) == 0.0
    assert verify("I do not know", 42) == 0.0
    assert verify("-4", -4) == 1.0


def test_arithmetic_problems_answers_are_the_expressions_values():
    problems = arithmetic_problems(60, seed=3)
    assert problems == arithmetic_problems(60, seed=3) and problems != arithmetic_problems(60, seed=4)
    ops = set()
    for p in problems:
        a, op, b = re.match(r"What is (\d+) ([-+*]) (\d+)\?", p.question).groups()
        ops.add(op)
        assert p.answer == {"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op]
    assert ops == {"+", "-", "*"}
    for bad in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="count"):
            arithmetic_problems(bad)


def test_chat_prompt_is_the_template_text_tokenized():
    tok = DigitTokenizer()
    ids = chat_prompt(tok, "What is 2 + 3?")
    assert "".join(map(chr, ids)) == "<user>What is 2 + 3?<assistant>"


@pytest.mark.skipif(
    not (cache_dir() / "smollm2-135m" / ".complete").exists(), reason="smollm2-135m not fetched"
)
def test_chat_prompt_with_the_smollm2_template():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(cache_dir() / "smollm2-135m"))
    ids = chat_prompt(tok, "What is 2 + 3?")
    assert tok.decode(ids) == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
                               "Face<|im_end|>\n<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n")  # fmt: skip
    assert ids[-4:] == tok.encode("<|im_start|>assistant\n", add_special_tokens=False)


def test_grpo_advantages_match_a_per_group_loop():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]])
    adv = grpo_advantages(rewards)
    for n, row in enumerate(rewards.tolist()):
        mean, std = statistics.fmean(row), statistics.stdev(row)
        for g, r in enumerate(row):
            assert math.isclose(adv[n, g], (r - mean) / (std + 1e-4), rel_tol=1e-6, abs_tol=1e-7)
    assert adv[0].abs().min() > 0.8  # not all trivially zero
    for bad in (torch.zeros(4), torch.zeros(3, 1)):
        with pytest.raises(ValueError, match="rewards must be"):
            grpo_advantages(bad)


def test_rollout_is_the_sampler_draws_verified(tiny_fp32):
    tok, problems = DigitTokenizer(), digit_problems(3, seed=1)
    out = rollout(tiny_fp32, tiny_fp32.lora, tok, problems, samples=4, max_new_tokens=6, seed=5)
    prompts = [[ord(c) for c in f"<user>{p.question}<assistant>"] for p in problems]
    drawn = fp.sample(tiny_fp32, tiny_fp32.lora, prompts, samples_per_prompt=4, max_new_tokens=6,
                      eos_token_id=500, seed=5)  # fmt: skip
    expected = fp.make_batch(prompts, drawn.responses(), max_lengths=[6] * 3)
    assert torch.equal(out.batch.input_ids, expected.input_ids)
    assert torch.equal(out.batch.max_lengths, torch.full((3,), 6.0))
    for n, group in enumerate(drawn.responses()):
        for g, r in enumerate(group):
            last = [t for t in r if t != 500][-1:]
            assert out.rewards[n, g] == float(bool(last) and last[0] % 10 == problems[n].answer)
    assert torch.allclose(out.batch.advantages, grpo_advantages(out.rewards))


def adamw_by_hand(theta, grads, lr, steps, betas=(0.9, 0.999), eps=1e-8, wd=1e-2):
    """torch.optim.AdamW's update written out: decoupled decay, bias-corrected moments."""
    m = {k: torch.zeros_like(v) for k, v in theta.items()}
    v2 = {k: torch.zeros_like(v) for k, v in theta.items()}
    for t in range(1, steps + 1):
        g = grads(theta, t - 1)
        new = {}
        for k, p in theta.items():
            m[k] = betas[0] * m[k] + (1 - betas[0]) * g[k]
            v2[k] = betas[1] * v2[k] + (1 - betas[1]) * g[k] ** 2
            m_hat, v_hat = m[k] / (1 - betas[0] ** t), v2[k] / (1 - betas[1] ** t)
            new[k] = p * (1 - lr * wd) - lr * m_hat / (v_hat.sqrt() + eps)
        theta = new
    return theta


def test_adamw_steps_are_adamw_on_fresh_on_policy_batches(tiny_fp32):
    draw = batches(
        tiny_fp32, DigitTokenizer(), prompts=3, samples=4, max_new_tokens=5, seed=2, problems=digit_problems
    )
    opt, params, rewards = adamw_steps(tiny_fp32, tiny_fp32.lora, draw, steps=2, lr=1e-2)
    grads = lambda th, i: {k: -v for k, v in fp.mean_grad(tiny_fp32, th, draw(th, i).batch, loss="y").items()}  # noqa: E731
    expected = adamw_by_hand(dict(tiny_fp32.lora), grads, lr=1e-2, steps=2)
    start = tiny_fp32.lora
    moves = {k: p.detach() - start[k] for k, p in params.items()}
    assert dict_rel_err(moves, {k: v - start[k] for k, v in expected.items()}) < 1e-5
    assert max(float(v.abs().max()) for v in moves.values()) > 1e-3
    assert len(rewards) == 2 and any(r > 0 for r in rewards)


def test_exact_step_is_the_step_adamw_takes(tiny_fp32):
    draw = batches(
        tiny_fp32, DigitTokenizer(), prompts=3, samples=4, max_new_tokens=5, seed=2, problems=digit_problems
    )
    opt, params, _ = adamw_steps(tiny_fp32, tiny_fp32.lora, draw, steps=2, lr=1e-2)
    theta = {k: p.detach().clone() for k, p in params.items()}
    U = draw(theta, 7).batch
    step = exact_step(tiny_fp32, theta, U, opt, params)
    g = fp.mean_grad(tiny_fp32, theta, U, loss="y")
    assert dict_rel_err(step, torch_step_delta(opt, params, {k: -v for k, v in g.items()}, theta)) < 1e-5
    assert max(float(v.abs().max()) for v in step.values()) > 1e-4


def test_run_demo_end_to_end_on_the_tiny_model(tiny_fp32):
    out = run_demo(tiny_fp32, DigitTokenizer(), prompts=3, samples=4, max_new_tokens=5, steps=2, lr=1e-2, seed=2,
                   check=True, scales=(0.5, 1.0, 2.0), problems=digit_problems)  # fmt: skip
    r = out.probe
    assert r.step == "optimizer" and r.B_E == 3 and r.B_U == 3
    assert math.isfinite(r.delta_h1) and r.se > 0
    # δH₁ = <μX over E, the exact next step> from the same batches, recomputed outside the probe
    draw = batches(
        tiny_fp32, DigitTokenizer(), prompts=3, samples=4, max_new_tokens=5, seed=2, problems=digit_problems
    )
    opt, params, _ = adamw_steps(tiny_fp32, tiny_fp32.lora, draw, steps=2, lr=1e-2)
    theta = {k: p.detach() for k, p in params.items()}
    step = exact_step(tiny_fp32, theta, draw(theta, 3).batch, opt, params)
    mu_x = fp.mean_grad(tiny_fp32, theta, draw(theta, 2).batch, loss="x")
    expected = sum(float((mu_x[k].double() * step[k].double()).sum()) for k in step)
    assert abs(expected) > 1e-8 and math.isclose(r.delta_h1, expected, rel_tol=1e-4)
    c = out.check
    assert [p.scale for p in c.points] == [0.5, 1.0, 2.0] and c.delta_h1 == r.delta_h1
    for p in c.points:
        assert math.isclose(p.predicted, p.scale * r.delta_h1, rel_tol=1e-12)
        assert all(math.isfinite(p.realized[e]) and p.realized_se[e] >= 0 for e in c.estimators)
