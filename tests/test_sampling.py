"""The sampler against the enumerated softmax, transformers' warpers and teacher-forced entropies, and
its common random numbers (the KV cache against the full forward: test_cached_decoder.py)."""

import math
from collections import Counter

import pytest
import torch
from enumerable import PROMPTS, enumerable_model, exact_logprobs, random_step, shifted
from helpers import rel_err
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

import functional_probe as fp
from functional_probe.entropy import sequence_statistics
from functional_probe.sampling import crn_uniforms, draw, row_keys, sample


def chi2_pvalue(counts: list[int], probs: torch.Tensor, min_expected: float = 5.0) -> float:
    """Pearson χ² p-value of observed counts against cell probabilities (upper regularized Γ);
    cells expecting fewer than `min_expected` draws are pooled into one, as the test requires."""
    n = sum(counts)
    expected = probs.double() * n
    observed = torch.tensor(counts, dtype=torch.float64)
    small = expected < min_expected
    if bool(small.any()):
        expected = torch.cat([expected[~small], expected[small].sum()[None]])
        observed = torch.cat([observed[~small], observed[small].sum()[None]])
    stat = float(((observed - expected) ** 2 / expected).sum())
    dof = len(observed) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(stat / 2)))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_responses_follow_the_enumerated_softmax(temperature):
    model = enumerable_model()
    eos, length, draws = 2, 2, 4000
    responses, S = exact_logprobs(model, model.lora, PROMPTS[:2], length, eos, temperature)
    samples = sample(model, model.lora, PROMPTS[:2], samples_per_prompt=draws, max_new_tokens=length,
                     eos_token_id=eos, temperature=temperature, seed=3)  # fmt: skip
    index = {tuple(r): i for i, r in enumerate(responses)}
    for n, drawn in enumerate(samples.responses()):
        counts = Counter(index[tuple(r)] for r in drawn)
        assert chi2_pvalue([counts[i] for i in range(len(responses))], S[n].exp()) > 1e-4
    # and the per-response S the sampler returns is the teacher-forced one
    batch = fp.make_batch(PROMPTS[:2], samples.responses(), max_lengths=[length] * 2)
    assert rel_err(samples.stats.logp, fp.sequence_logprobs(model, model.lora, batch, temperature=temperature)) < 1e-10


def test_top_k_top_p_sample_as_transformers_warpers():
    model = enumerable_model()
    top_k, top_p, temperature, draws = 4, 0.75, 0.8, 4000
    ids = torch.tensor([PROMPTS[1]])
    scores = model(model.lora, ids)[:, -1].float() / temperature
    warped = TopPLogitsWarper(top_p)(ids, TopKLogitsWarper(top_k)(ids, scores))
    probs = warped.softmax(-1)[0]
    kept = probs > 0
    assert 1 < int(kept.sum()) < top_k  # both filters bite
    samples = sample(model, model.lora, [PROMPTS[1]], samples_per_prompt=draws, max_new_tokens=1,
                     temperature=temperature, top_k=top_k, top_p=top_p, seed=5)  # fmt: skip
    counts = Counter(int(t) for t in samples.tokens[0, :, 0])
    assert set(counts) <= set(kept.nonzero()[:, 0].tolist())
    assert chi2_pvalue([counts[int(v)] for v in kept.nonzero()[:, 0]], probs[kept]) > 1e-4
    logq = probs.double().log()[samples.tokens[0, :, 0]]
    assert torch.allclose(samples.stats.logq[0], logq, atol=1e-6)


def test_common_random_numbers_couple_the_draws():
    model = enumerable_model()
    lora, step = model.lora, random_step(model.lora)
    kw = dict(samples_per_prompt=40, max_new_tokens=3, eos_token_id=2, seed=11)
    base = sample(model, lora, PROMPTS, **kw)
    same = sample(model, {k: v.clone() for k, v in lora.items()}, PROMPTS, **kw, max_rows=7)
    assert torch.equal(base.tokens, same.tokens) and torch.equal(base.lengths, same.lengths)
    assert torch.allclose(base.stats.entropy, same.stats.entropy, rtol=1e-12)  # matmul shapes differ
    # a prompt's draws do not depend on which other prompts are sampled with it
    alone = sample(model, lora, [PROMPTS[3]], prompt_keys=[3], **kw)
    assert torch.equal(alone.tokens[0], base.tokens[3])

    def differing(s: float) -> float:
        other = sample(model, shifted(lora, step, s), PROMPTS, **kw)
        return float((other.tokens != base.tokens).any(-1).double().mean())

    other_seed = sample(model, lora, PROMPTS, **{**kw, "seed": 12})
    independent = float((other_seed.tokens != base.tokens).any(-1).double().mean())
    small, large = differing(0.02), differing(1.0)
    assert small < 0.1 * independent and small < large < independent


def test_uniforms_depend_only_on_seed_prompt_sample_position_token():
    keys = row_keys(7, [0, 1, 0, 5], [2, 2, 2, 9], 4)
    u = crn_uniforms(keys, 50)
    assert torch.equal(u[0], u[2]) and not torch.equal(u[0], u[1])
    assert torch.equal(crn_uniforms(row_keys(7, [5], [9], 4), 50), u[3:])
    assert not torch.equal(crn_uniforms(row_keys(7, [5], [9], 5), 50), u[3:])
    many = crn_uniforms(row_keys(0, [0] * 400, list(range(400)), 0), 50).flatten()
    assert ((many > 0) & (many < 1)).all()
    counts = torch.histc(many, bins=10, min=0, max=1).tolist()
    assert chi2_pvalue([int(c) for c in counts], torch.full((10,), 0.1)) > 1e-4


def test_shared_gumbels_couple_tokens_nearly_as_well_as_the_best_coupling():
    """Per token, P(y ≠ y') under shared noise is at most 2·TV/(1 + TV) (TV: the best any coupling
    can do), on the same contexts at θ and at θ + s·Δθ."""
    model = fp.tiny_model(quantize=None)
    lora, step = model.lora, random_step(model.lora, scale=0.01)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.vocab_size, (64, 12), generator=gen)
    h0 = model.hidden_states(lora, ids).reshape(-1, 64)
    h1 = model.hidden_states(shifted(lora, step, 1.0), ids).reshape(-1, 64)
    keys = row_keys(0, list(range(h0.shape[0])), [0] * h0.shape[0], 0)
    y0, _ = draw(h0, model.head_weight, keys, temperature=1.0, top_k=None, top_p=None)
    y1, _ = draw(h1, model.head_weight, keys, temperature=1.0, top_k=None, top_p=None)
    p0, p1 = ((h @ model.head_weight.T).double().softmax(-1) for h in (h0, h1))
    tv = 0.5 * (p1 - p0).abs().sum(-1)
    bound = float((2 * tv / (1 + tv)).mean())
    differ = float((y0 != y1).double().mean())
    assert 0 < differ <= bound + 3 * math.sqrt(bound / len(y0))  # binomial slack
    assert differ >= 0.5 * float(tv.mean()) - 3 * math.sqrt(bound / len(y0))  # and not degenerate


def test_sampler_entropies_equal_teacher_forced_ones():
    model = fp.tiny_model(quantize="nf4")
    prompts = [[5, 9, 100], [7], [300, 2, 2, 8, 1]]
    samples = sample(model, model.lora, prompts, samples_per_prompt=3, max_new_tokens=6, eos_token_id=[3, 4],
                     temperature=0.9, top_p=0.9, seed=1)  # fmt: skip
    batch = fp.make_batch(prompts, samples.responses(), max_lengths=[6] * 3)
    ref = sequence_statistics(model, model.lora, batch, temperature=0.9, top_p=0.9)
    for got, want in ((samples.stats.logp, ref.logp), (samples.stats.logq, ref.logq),
                      (samples.stats.entropy, ref.entropy)):  # fmt: skip
        assert rel_err(got, want) <= 1e-5


def test_eos_ends_a_response_and_max_new_tokens_bounds_it():
    model = enumerable_model()
    samples = sample(model, model.lora, PROMPTS, samples_per_prompt=30, max_new_tokens=4, eos_token_id=2, seed=2)
    lengths = samples.lengths.flatten().tolist()
    assert min(lengths) >= 1 and max(lengths) == 4 and min(lengths) < 4
    for group in samples.responses():
        for r in group:
            assert 2 not in r[:-1] and (r[-1] == 2 or len(r) == 4)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(samples_per_prompt=0), "samples_per_prompt=0"),
        (dict(max_new_tokens=-1), "max_new_tokens=-1"),
        (dict(temperature=0.0), "temperature=0.0"),
        (dict(top_p=1.5), "top_p=1.5"),
        (dict(top_k=-2), "top_k=-2"),
        (dict(eos_token_id=6), "eos_token_id 6"),
        (dict(seed=-1), "seed=-1"),
        (dict(prompts=[[1], [9]]), "prompt 1"),
        (dict(prompts=[[1], []]), "prompt 1"),
        (dict(prompt_keys=[0]), "prompt_keys"),
        (dict(max_rows=0), "max_rows=0"),
    ],
)
def test_sampler_rejects_bad_arguments(kwargs, match):
    model = enumerable_model()
    args = dict(prompts=[[1], [2]], samples_per_prompt=2, max_new_tokens=2) | kwargs
    with pytest.raises(ValueError, match=match):
        sample(model, model.lora, args.pop("prompts"), **args)


def test_sampling_needs_no_gradient_and_leaves_lora_alone():
    model = enumerable_model()
    lora = {k: v.clone().requires_grad_() for k, v in model.lora.items()}
    samples = sample(model, lora, PROMPTS[:2], samples_per_prompt=2, max_new_tokens=2)
    assert not samples.stats.logp.requires_grad
    assert all(math.isfinite(v) for v in samples.stats.entropy.flatten().tolist())
