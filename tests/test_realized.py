"""SNIS, CRN and RB estimates of the realized entropy change against exact enumeration."""

import json
import math

import pytest
import torch
from enumerable import (
    EOS,
    LENGTH,
    PROMPTS,
    all_responses,
    draw_from_exact,
    exact_entropy,
    exact_logprobs,
    shifted,
    z_score,
)

import functional_probe as fp
from functional_probe.entropy import sequence_statistics
from functional_probe.realized import EntropyEstimateWarning, RealizedEntropyChange, realized_entropy_change


def e_batch(model, lora, prompts, group, seed, eos=EOS):
    """E: G responses per prompt drawn from the exactly enumerated π (not by our sampler)."""
    responses, S = exact_logprobs(model, lora, prompts, LENGTH, eos)
    drawn = draw_from_exact(responses, S, group, seed)
    return fp.make_batch(prompts, drawn, max_lengths=[LENGTH] * len(prompts))


@pytest.mark.parametrize("prompt", [0, 4])
def test_every_estimator_converges_to_the_enumerated_change(enumerable_setup, prompt):
    """One prompt repeated N times (independent draws per copy): the SE over prompts is then a
    pure Monte-Carlo SE and the exact ΔH is that prompt's."""
    model, lora, step = enumerable_setup
    prompts = [PROMPTS[prompt]] * 24
    E = e_batch(model, lora, prompts, 32, seed=prompt)
    res = realized_entropy_change(model, lora, step, E, [0.3, 1.0], samples_per_prompt=32, seed=prompt + 1,
                                  eos_token_id=EOS, max_new_tokens=LENGTH)  # fmt: skip
    h0 = exact_entropy(model, lora, prompts[:1], LENGTH, EOS)
    for point in res.points:
        exact = float(exact_entropy(model, shifted(lora, step, point.scale), prompts[:1], LENGTH, EOS) - h0)
        assert abs(exact) > 0.01
        for name, est in point.estimates.items():
            assert z_score(est.value, est.se, exact) < 4, (name, point.scale, est.value, est.se, exact)
        assert point.estimates["rb"].se < point.estimates["crn"].se  # Rao–Blackwellization pays
        assert 0 < point.estimates["crn"].diagnostics["differing_fraction"] < 1


def test_standard_errors_are_calibrated_across_replicate_batches(enumerable_setup):
    """16 replicates (fresh E, fresh seed): mean z² of each estimator against the exact ΔH is
    χ²₁₆/16-like (0.25 .. 2.5 holds with probability > 0.998 for a calibrated SE)."""
    model, lora, step = enumerable_setup
    prompts = [PROMPTS[4]] * 24
    responses, S = exact_logprobs(model, lora, prompts[:1], LENGTH, EOS)
    h0 = exact_entropy(model, lora, prompts[:1], LENGTH, EOS)
    exact = float(exact_entropy(model, shifted(lora, step, 1.0), prompts[:1], LENGTH, EOS) - h0)
    z = {"snis": [], "crn": [], "rb": [], "rb_is": []}
    for r in range(16):
        drawn = draw_from_exact(responses, S.expand(24, -1), 8, seed=100 + r)
        E = fp.make_batch(prompts, drawn, max_lengths=[LENGTH] * 24)
        res = realized_entropy_change(model, lora, step, E, [1.0], samples_per_prompt=8, seed=200 + r,
                                      eos_token_id=EOS, max_new_tokens=LENGTH)  # fmt: skip
        for name, est in res.points[0].estimates.items():
            z[name].append((est.value - exact) / est.se)
    for name, zs in z.items():
        zs = torch.tensor(zs)
        assert 0.25 < float(zs.square().mean()) < 2.5, (name, zs)
        assert abs(float(zs.mean())) < 1.0, (name, zs)


def test_estimators_converge_over_different_prompts_with_many_samples(enumerable_setup):
    model, lora, step = enumerable_setup
    E = e_batch(model, lora, PROMPTS, 400, seed=7, eos=None)
    res = realized_entropy_change(model, lora, step, E, [1.0], samples_per_prompt=400, seed=8)
    exact_n = exact_entropy(model, shifted(lora, step, 1.0), PROMPTS, LENGTH) - exact_entropy(model, lora, PROMPTS, LENGTH)
    for name, est in res.points[0].estimates.items():
        assert z_score(est.value, est.se, float(exact_n.mean())) < 4, name
        assert len(est.per_prompt) == len(PROMPTS)
    assert res.baseline["rb"].value == pytest.approx(float(exact_entropy(model, lora, PROMPTS, LENGTH).mean()), abs=0.01)


def test_filtered_sampling_targets_the_filtered_entropy(enumerable_setup):
    """With top-k, H_n = E_q[−S_π] / L (q the filtered distribution); exact by enumeration with the
    filtered log q (checked against transformers' warpers in test_entropy)."""
    model, lora, step = enumerable_setup
    prompts, top_k = [PROMPTS[1]] * 24, 3

    def exact(theta):
        responses = all_responses(LENGTH, None, model.vocab_size)
        batch = fp.make_batch(prompts[:1], [responses], max_lengths=[LENGTH])
        st = sequence_statistics(model, theta, batch, top_k=top_k)
        assert math.isclose(float(st.logq.exp().sum()), 1.0, rel_tol=1e-9)
        return float(-(st.logq.exp() * st.logp).sum() / LENGTH), st

    h0, st0 = exact(lora)
    h1, _ = exact(shifted(lora, step, 1.0))
    idx = torch.multinomial(st0.logq.exp()[0], 32 * 24, replacement=True, generator=torch.Generator().manual_seed(3))
    responses = all_responses(LENGTH, None, model.vocab_size)
    drawn = [[responses[int(i)] for i in idx[n * 32 : (n + 1) * 32]] for n in range(24)]
    E = fp.make_batch(prompts, drawn, max_lengths=[LENGTH] * 24)
    res = realized_entropy_change(model, lora, step, E, [1.0], estimators=("crn", "rb"), samples_per_prompt=32,
                                  top_k=top_k, seed=4)  # fmt: skip
    assert abs(h1 - h0) > 0.01
    for name, est in res.points[0].estimates.items():
        assert z_score(est.value, est.se, h1 - h0) < 4, (name, est.value, est.se, h1 - h0)


def test_zero_scale_changes_nothing_and_the_report_round_trips(enumerable_setup):
    model, lora, step = enumerable_setup
    E = e_batch(model, lora, PROMPTS, 4, seed=1)
    res = realized_entropy_change(model, lora, step, E, [0.0, 0.5], samples_per_prompt=4, eos_token_id=EOS)
    for est in res.points[0].estimates.values():
        assert est.value == 0.0 and est.se == 0.0
    assert res.points[0].estimates["crn"].diagnostics["differing_fraction"] == 0.0
    assert res.points[1].relative_step == pytest.approx(0.5 * 0.3, rel=1e-6)  # random_step: 0.3 per tensor
    assert set(res.points[1].estimates) == {"snis", "crn", "rb", "rb_is"}
    assert res.points[1].step_rounding < 1e-12  # float64: the step is taken as given
    again = RealizedEntropyChange.from_json(res.to_json())
    assert again == res and json.loads(res.to_json())["points"][1]["estimates"]["snis"]["diagnostics"]["clip"] > 0


def test_collapsed_importance_weights_warn_and_are_clipped(enumerable_setup):
    model, lora, step = enumerable_setup
    E = e_batch(model, lora, PROMPTS, 16, seed=2)
    with pytest.warns(EntropyEstimateWarning, match="effective sample size"):
        res = realized_entropy_change(model, lora, step, E, [12.0], estimators=("snis",), ess_warn_fraction=0.5)
    diag = res.points[0].estimates["snis"].diagnostics
    assert diag["clipped"] > 0 and diag["ess_min"] < 8 and len(diag["ess_per_prompt"]) == len(PROMPTS)
    assert diag["clip"] == pytest.approx(0.5 * math.log(16))


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(scales=[]), "scales"),
        (dict(scales=[0.1, math.nan]), r"scales\[1\]"),
        (dict(estimators=("crn", "exact")), "estimators"),
        (dict(estimators=()), "estimators"),
        (dict(E="one"), "at least 2 prompts"),
        (dict(step="missing"), "step is missing"),
        (dict(step="shape"), r"step\[.*\] has shape"),
        (dict(step="nan"), "non-finite"),
        (dict(ess_warn_fraction=0.0), "ess_warn_fraction"),
        (dict(snis_clip=-1.0), "snis_clip"),
        (dict(E="g1"), "G = 1"),
        (dict(top_p=0.9), "snis needs unfiltered sampling"),
        (dict(top_p=0.9, estimators=("crn", "rb_is")), "rb_is needs unfiltered sampling"),
        (dict(samples_per_prompt=0), "samples_per_prompt=0"),
        (dict(eos_token_id=99), "eos_token_id 99"),
        (dict(temperature=0), "temperature=0"),
    ],
)
def test_bad_arguments_raise_naming_them(enumerable_setup, change, match):
    model, lora, step = enumerable_setup
    E = e_batch(model, lora, PROMPTS[:3], 2, seed=0)
    args = dict(step=dict(step), E=E, scales=[1.0])
    k0 = next(iter(step))
    edits = {
        "missing": lambda: {k: v for k, v in step.items() if k != k0},
        "shape": lambda: {**step, k0: step[k0][:1]},
        "nan": lambda: {**step, k0: step[k0] * math.nan},
        "one": lambda: E[:1],
        "g1": lambda: fp.make_batch(PROMPTS[:2], [[[1]], [[2]]]),
    }
    args |= {k: edits[v]() if isinstance(v, str) and v in edits else v for k, v in change.items()}
    args = dict(samples_per_prompt=2) | args
    with pytest.raises(ValueError, match=match):
        realized_entropy_change(model, lora, args.pop("step"), args.pop("E"), args.pop("scales"), **args)


def test_a_step_rounded_away_by_bf16_warns():
    # a bf16 LoRA dict (PEFT's default keeps fp32 factors on a bf16 base, which rounds nothing)
    model = fp.tiny_model(quantize=None, dtype=torch.bfloat16, autocast_adapter_dtype=False)
    lora = model.lora
    step = {k: (1e-4 * v.float()).to(torch.bfloat16) for k, v in lora.items()}  # 1e-4 of θ: below bf16's 2^-8
    E = fp.make_batch([[1, 2], [3]], [[[4, 5], [6]], [[7], [8, 9]]])
    with pytest.warns(EntropyEstimateWarning, match="rounds the step"):
        res = realized_entropy_change(model, lora, step, E, [1.0], estimators=("snis",))
    assert res.points[0].step_rounding > 0.5
