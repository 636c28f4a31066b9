"""Is the reported SE of δH₁ calibrated? R independent replicate batches E_r, U_r sampled from the
model itself, one probe each: χ² = Σ_r (δH₁_r − mean)² / SE_r² must lie in the two-sided 99.9%
band of χ² on R − 1 degrees of freedom, for `se` and `se_jackknife`, with either X estimator.

The model is tests/enumerable.py's (float64, V = 6). Prompts are drawn afresh per replicate (2-4
random tokens, distinct, none shared by E and U: the SE counts prompts as independent draws),
G = 4 responses each by `fp.sample` (EOS or 5 tokens), Lmax = 5; U's rewards come from a fixed toy
verifier (1 if the response contains token 4) as Dr. GRPO advantages A = r − mean_g r. The step is
the exact next step of one AdamW state (3 real steps at lr 1e-2 on a batch of its own), the same
for every replicate: the replicate spread is that of E's and U's sampling, what the SE estimates.
"""

import math

import pytest
import torch
from enumerable import EOS

import functional_probe as fp

R, B, G, L, LR = 30, 12, 4, 5, 1e-2
FIELDS = ("se", "se_jackknife")


def chi2_band(dof: int, level: float = 0.999) -> tuple[float, float]:
    """Two-sided `level` quantiles of χ²(dof) by Wilson–Hilferty, q ≈ k(1 − 2/(9k) + z·sqrt(2/(9k)))³
    (within 1.5% of the exact quantiles at k = 29: 10.13 vs 10.23, 60.87 vs 60.73)."""
    z = float(torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(0.5 + level / 2, dtype=torch.float64)))
    c = 2 / (9 * dof)
    return tuple(dof * (1 - c + sign * z * math.sqrt(c)) ** 3 for sign in (-1, 1))


def random_prompts(gen: torch.Generator, n: int, vocab: int, avoid: set = frozenset()) -> list[list[int]]:
    out: list[list[int]] = []
    while len(out) < n:
        p = torch.randint(0, vocab, (int(torch.randint(2, 5, (1,), generator=gen)),), generator=gen).tolist()
        if tuple(p) not in avoid and p not in out:
            out.append(p)
    return out


def sampled_batch(model, lora, prompts, *, seed: int, keys: list[int], rewarded: bool) -> fp.Batch:
    """G responses per prompt by fp.sample; with `rewarded`, Dr. GRPO advantages of the toy verifier."""
    responses = fp.sample(model, lora, prompts, samples_per_prompt=G, max_new_tokens=L, eos_token_id=EOS,
                          seed=seed, prompt_keys=keys).responses()  # fmt: skip
    advantages = None
    if rewarded:
        rewards = [[float(4 in y) for y in group] for group in responses]
        advantages = [[x - sum(row) / G for x in row] for row in rewards]
    return fp.make_batch(prompts, responses, advantages=advantages, max_lengths=[L] * len(prompts))


@pytest.fixture(scope="module")
def replicates(enumerable_setup):
    """{x_estimator: [ProbeResult] * R} over the same R replicate (E_r, U_r)."""
    model = enumerable_setup[0]
    gen = torch.Generator().manual_seed(0)
    train = sampled_batch(model, model.lora, random_prompts(gen, B, model.vocab_size), seed=999,
                          keys=list(range(B)), rewarded=True)  # fmt: skip
    params = {k: torch.nn.Parameter(v.clone()) for k, v in model.lora.items()}
    opt = torch.optim.AdamW(params.values(), lr=LR)
    for _ in range(3):
        g = fp.mean_grad(model, {k: p.detach() for k, p in params.items()}, train, loss="y")
        for k, p in params.items():
            p.grad = -g[k]
        opt.step()
    state, lora = fp.AdamState.from_optimizer(opt, params), {k: p.detach() for k, p in params.items()}
    out: dict[str, list] = {"loo": [], "rb": []}
    for r in range(R):
        gen = torch.Generator().manual_seed(100 + r)
        pe = random_prompts(gen, B, model.vocab_size)
        pu = random_prompts(gen, B, model.vocab_size, avoid={tuple(p) for p in pe})
        E = sampled_batch(model, lora, pe, seed=2 * r, keys=[10_000 * r + i for i in range(B)], rewarded=False)
        U = sampled_batch(model, lora, pu, seed=2 * r + 1, keys=[10_000 * r + B + i for i in range(B)], rewarded=True)
        for est, results in out.items():
            results.append(fp.probe(model, lora, E, U, optimizer=state, x_estimator=est))
    return out


def chi2_of(results, field: str) -> float:
    d = torch.tensor([r.delta_h1 for r in results], dtype=torch.float64)
    se = torch.tensor([getattr(r, field) for r in results], dtype=torch.float64)
    return float(((d - d.mean()) ** 2 / se**2).sum())


@pytest.mark.parametrize("field", FIELDS)
@pytest.mark.parametrize("estimator", ["loo", "rb"])
def test_reported_se_matches_the_replicate_spread(replicates, estimator, field):
    results = replicates[estimator]
    assert all(r.shared_prompts == 0 and r.B_E == B and r.B_U == B for r in results)
    chi2, (lo, hi) = chi2_of(results, field), chi2_band(R - 1)
    d = torch.tensor([r.delta_h1 for r in results], dtype=torch.float64)
    se = torch.tensor([getattr(r, field) for r in results], dtype=torch.float64)
    pooled = float(d.var() / se.square().mean())  # the spread over the mean reported variance
    print(f"{estimator} {field}: χ²/dof = {chi2 / (R - 1):.3f} (band {lo / (R - 1):.3f}-{hi / (R - 1):.3f}), "
          f"pooled {pooled:.3f}; replicate SD {float(d.std()):.4g}, mean reported SE {float(se.mean()):.4g}, "
          f"mean δH₁ {float(d.mean()):+.4g}")  # fmt: skip
    assert lo <= chi2 <= hi


def test_the_band_rejects_an_se_without_the_update_batch(replicates):
    """Power: se_conditional (E's sampling only) leaves out U's variance; for rb, where E's share is
    small, the band rejects it."""
    chi2 = chi2_of(replicates["rb"], "se_conditional")
    print(f"rb se_conditional: χ²/dof = {chi2 / (R - 1):.3f}")
    assert chi2 > chi2_band(R - 1)[1]
