"""rb_is: the prefix-weighted, leave-one-out controlled token-entropy estimator of the realized ΔH,
against a loop over positions, exact enumeration, and its SE ∝ s at small steps."""

import math

import pytest
import torch
from enumerable import EOS, LENGTH, PROMPTS, exact_entropy, shifted, z_score

import functional_probe as fp
from functional_probe.entropy import TokenStats
from functional_probe.realized import EntropyEstimateWarning, realized_entropy_change
from functional_probe.realized_is import rb_is_terms


def test_terms_equal_a_loop_over_prompts_responses_and_positions():
    """d_n = mean_g Σ_t [W_<t (C'_t − b_t) + b_t − C_t] / Lmax[n], W_<t = exp Σ_{u<t} ℓ_u,
    b_t = mean_{h≠g} C'_{h,t}, written out one number at a time (no cap: clip large)."""
    gen = torch.Generator().manual_seed(0)
    n, g, t = 3, 4, 5
    table = lambda: TokenStats(*(torch.randn(n, g, t, generator=gen, dtype=torch.float64) for _ in range(3)))  # noqa: E731
    base, moved = table(), table()
    lmax = torch.tensor([5.0, 6.0, 7.0], dtype=torch.float64)
    d, ess, clipped = rb_is_terms(base, moved, lmax, clip=1e9)
    assert clipped == 0
    for i in range(n):
        total = 0.0
        for k in range(g):
            log_w = 0.0
            for u in range(t):
                b = sum(float(moved.entropy[i, h, u]) for h in range(g) if h != k) / (g - 1)
                total += math.exp(log_w) * (float(moved.entropy[i, k, u]) - b) + b - float(base.entropy[i, k, u])
                log_w += float(moved.logp[i, k, u] - base.logp[i, k, u])
        assert float(d[i]) == pytest.approx(total / g / float(lmax[i]), rel=1e-12)
        w = [math.exp(float((moved.logp[i, k] - base.logp[i, k]).sum())) for k in range(g)]
        assert float(ess[i]) == pytest.approx(sum(w) ** 2 / sum(x * x for x in w), rel=1e-12)


def e_batch(prompts):
    """rb_is does not read E's responses (only its prompts and Lmax): any responses do."""
    return fp.make_batch(prompts, [[[1], [3]]] * len(prompts), max_lengths=[LENGTH] * len(prompts))


@pytest.mark.parametrize("prompt", [0, 4])
def test_small_steps_converge_to_the_enumerated_change_with_an_se_proportional_to_s(enumerable_setup, prompt):
    """One prompt repeated: the exact ΔH(s) by enumeration lies within 4 SE at every s, the SE
    shrinks ∝ s (ratio within 5% of the scale ratio) while crn's does not (its responses decouple),
    and no weight is clipped."""
    model, lora, step = enumerable_setup
    prompts = [PROMPTS[prompt]] * 24
    scales = [0.01, 0.02, 0.3]
    res = realized_entropy_change(model, lora, step, e_batch(prompts), scales, estimators=("crn", "rb_is"),
                                  samples_per_prompt=16, seed=prompt + 3, eos_token_id=EOS, max_new_tokens=LENGTH)  # fmt: skip
    h0 = exact_entropy(model, lora, prompts[:1], LENGTH, EOS)
    for p in res.points:
        exact = float(exact_entropy(model, shifted(lora, step, p.scale), prompts[:1], LENGTH, EOS) - h0)
        est = p.estimates["rb_is"]
        assert z_score(est.value, est.se, exact) < 4, (p.scale, est.value, est.se, exact)
        assert est.diagnostics["clipped"] == 0 and est.diagnostics["ess_min"] > 8
    small, double = (res.points[i].estimates["rb_is"].se for i in (0, 1))
    assert double / small == pytest.approx(2.0, rel=0.05)
    crn = [res.points[i].estimates["crn"].se / scales[i] for i in (0, 2)]
    assert crn[0] > 3 * crn[1]  # crn's SE per unit s blows up at small s; rb_is's does not
    assert small < res.points[0].estimates["crn"].se / 5


def test_a_collapsed_weight_set_warns_and_is_clipped(enumerable_setup):
    model, lora, step = enumerable_setup
    with pytest.warns(EntropyEstimateWarning, match="rb_is at scale 12.0: effective sample size"):
        res = realized_entropy_change(model, lora, step, e_batch(PROMPTS), [12.0], estimators=("rb_is",),
                                      samples_per_prompt=16, eos_token_id=EOS, ess_warn_fraction=0.5)  # fmt: skip
    diag = res.points[0].estimates["rb_is"].diagnostics
    assert diag["clipped"] > 0 and diag["clip"] == pytest.approx(0.5 * math.log(16))
    assert res.settings["rb_is_clip"] == diag["clip"] and len(diag["ess_per_prompt"]) == len(PROMPTS)


@pytest.mark.parametrize("kwargs, match", [
    (dict(samples_per_prompt=1), "rb_is needs samples_per_prompt >= 2"),
    (dict(top_k=3), "rb_is needs unfiltered sampling"),
])  # fmt: skip
def test_bad_arguments_raise_naming_them(enumerable_setup, kwargs, match):
    model, lora, step = enumerable_setup
    with pytest.raises(ValueError, match=match):
        realized_entropy_change(model, lora, step, e_batch(PROMPTS[:2]), [1.0], estimators=("rb_is",), **kwargs)
