"""Per-token entropies and filters against full log-softmaxes and transformers' own warpers."""

import math

import pytest
import torch
from helpers import LargestOutput, random_rollouts, rel_err
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

import functional_probe as fp
from functional_probe.entropy import filter_logits, sequence_statistics, token_statistics


@pytest.mark.parametrize("top_k, top_p", [(5, None), (None, 0.7), (7, 0.5), (3, 0.99)])
def test_filters_equal_transformers_warpers(top_k, top_p):
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(40, 30, generator=gen) * 2
    z[:, 10] = z[:, 11]  # ties at a boundary are kept by both
    ref, ids = z, torch.zeros(40, 1, dtype=torch.long)
    if top_k is not None:
        ref = TopKLogitsWarper(top_k)(ids, ref)
    if top_p is not None:
        ref = TopPLogitsWarper(top_p)(ids, ref)
    got = filter_logits(z, top_k, top_p)
    assert torch.equal(torch.isinf(got), torch.isinf(ref))
    assert 0 < int(torch.isinf(got).sum()) < z.numel() - 40
    assert torch.equal(got[~torch.isinf(got)], z[~torch.isinf(got)])


def direct(hidden, weight, targets, temperature, top_k=None, top_p=None):
    z = (hidden @ weight.T).double() / temperature
    log_pi = z.log_softmax(-1)
    q = filter_logits(z, top_k, top_p).softmax(-1)
    cross = -(q * torch.where(q > 0, log_pi, 0.0)).sum(-1)
    return log_pi.gather(-1, targets[:, None])[:, 0], q.log().gather(-1, targets[:, None])[:, 0], cross


@pytest.mark.parametrize("top_k, top_p", [(None, None), (20, 0.8)])
def test_token_statistics_equal_a_full_log_softmax_in_bounded_chunks(top_k, top_p):
    gen = torch.Generator().manual_seed(1)
    m, d, v, chunk = 200, 8, 300, 16
    hidden, weight = torch.randn(m, d, generator=gen), torch.randn(v, d, generator=gen)
    targets = torch.randint(0, v, (m,), generator=gen)
    if top_k is not None:  # targets inside the kept set, so log q is finite
        z = filter_logits((hidden @ weight.T).double() / 0.7, top_k, top_p)
        targets = z.argmax(-1)
    logp, logq, cross = direct(hidden, weight, targets, 0.7, top_k, top_p)
    with LargestOutput() as probe:
        got = token_statistics(hidden, weight, targets, temperature=0.7, top_k=top_k, top_p=top_p, chunk_rows=chunk)
    assert probe.largest <= chunk * v < m * v
    assert got.logp.dtype == got.entropy.dtype == torch.float64
    assert rel_err(got.logp, logp) < 1e-12 and rel_err(got.logq, logq) < 1e-12
    assert rel_err(got.entropy, cross) < 1e-12
    if top_k is None:  # unfiltered: C is the entropy of π and log q = log π
        p = ((hidden @ weight.T).double() / 0.7).softmax(-1)
        assert rel_err(got.entropy, -(p * p.log()).sum(-1)) < 1e-12
        assert torch.equal(got.logq, got.logp)
    else:
        assert (got.logq > got.logp).all()  # renormalised over fewer tokens


def test_sequence_statistics_sum_per_response_and_match_sequence_logprobs(tiny_nf4):
    prompts, responses, _ = random_rollouts(4, 3, tiny_nf4.vocab_size, seed=2)
    batch = fp.make_batch(prompts, responses)
    stats = sequence_statistics(tiny_nf4, tiny_nf4.lora, batch, temperature=0.8)
    S = fp.sequence_logprobs(tiny_nf4, tiny_nf4.lora, batch, temperature=0.8)
    assert rel_err(stats.logp, S) <= 1e-6
    split = sequence_statistics(tiny_nf4, tiny_nf4.lora, batch, temperature=0.8, microbatch=3, chunk_rows=5)
    assert rel_err(split.entropy, stats.entropy) <= 1e-6
    # per response, unpadded: Σ_t entropy of softmax(z_t / τ) over its response positions
    n, g = 2, 1
    ids = torch.tensor([prompts[n] + responses[n][g]])
    logits = tiny_nf4(tiny_nf4.lora, ids)[0, len(prompts[n]) - 1 : -1].double() / 0.8
    p = logits.softmax(-1)
    assert math.isclose(stats.entropy[n, g].item(), -(p * p.log()).sum().item(), rel_tol=1e-6)


def test_per_token_statistics_are_the_positions_of_each_response(tiny_nf4):
    """per_token: [N, G, T_r] with 0 past each end, summing to the per-response values; a
    microbatched call pads its trimmed parts back to the same table; one position against a
    direct softmax."""
    prompts, responses, _ = random_rollouts(4, 3, tiny_nf4.vocab_size, seed=3)
    batch = fp.make_batch(prompts, responses)
    sums = sequence_statistics(tiny_nf4, tiny_nf4.lora, batch)
    table = sequence_statistics(tiny_nf4, tiny_nf4.lora, batch, per_token=True)
    split = sequence_statistics(tiny_nf4, tiny_nf4.lora, batch, per_token=True, microbatch=3)
    width = max(len(r) for group in responses for r in group)
    assert table.entropy.shape == (4, 3, width) and split.entropy.shape == table.entropy.shape
    for field in ("logp", "logq", "entropy"):
        assert rel_err(getattr(table, field).sum(-1), getattr(sums, field)) <= 1e-12
        assert rel_err(getattr(split, field), getattr(table, field)) <= 1e-6
    n, g = 1, 2
    length = len(responses[n][g])
    assert bool((table.logp[n, g, length:] == 0).all()) and bool((table.entropy[n, g, :length] > 0).all())
    ids = torch.tensor([prompts[n] + responses[n][g]])
    logits = tiny_nf4(tiny_nf4.lora, ids)[0, len(prompts[n]) - 1 : -1].double()
    assert rel_err(table.logp[n, g, :length], logits.log_softmax(-1).gather(-1, ids[0, len(prompts[n]):, None])[:, 0]) < 1e-5


def test_bad_filters_are_rejected(tiny_fp32):
    batch = fp.make_batch([[1, 2]], [[[3], [4]]])
    for kw, match in ((dict(top_k=1.5), "top_k=1.5"), (dict(top_p=0.0), "top_p=0.0"), (dict(temperature=-1), "temperature")):
        with pytest.raises(ValueError, match=match):
            sequence_statistics(tiny_fp32, tiny_fp32.lora, batch, **kw)
