"""d²H/ds² by nested forward mode against finite differences of the exactly enumerated entropy."""

import math

import pytest
import torch
from enumerable import (
    EOS,
    LENGTH,
    PROMPTS,
    draw_from_exact,
    exact_entropy,
    exact_logprobs,
    random_step,
    shifted,
)
from helpers import random_rollouts, rel_err

import functional_probe as fp
from functional_probe.curvature import curvature, entropy_derivatives, step_derivatives
from functional_probe.grads import dot64
from functional_probe.stats import moments


def exact_derivatives(model, lora, step, prompts):
    """(d1_n, d2_n) from the formula with exact weights π over every response."""
    responses, S = exact_logprobs(model, lora, prompts, LENGTH, EOS)
    batch = fp.make_batch(prompts, [responses] * len(prompts), max_lengths=[LENGTH] * len(prompts))
    S_, S_dot, S_ddot = step_derivatives(model, lora, step, batch)
    assert rel_err(S_, S) < 1e-12
    return entropy_derivatives(S_, S_dot, S_ddot, batch.max_lengths, weights=S_.exp())


def test_second_derivative_equals_finite_differences_of_the_enumerated_entropy(enumerable_setup):
    model, lora, step = enumerable_setup
    d1, d2 = exact_derivatives(model, lora, step, PROMPTS)
    h = 1e-3
    H = {s: exact_entropy(model, shifted(lora, step, s), PROMPTS, LENGTH, EOS) for s in (-h, 0.0, h)}
    fd2 = (H[h] - 2 * H[0.0] + H[-h]) / h**2
    fd1 = (H[h] - H[-h]) / (2 * h)
    assert fd2.abs().min() > 1e-3 and fd1.abs().min() > 1e-3
    assert ((d2 - fd2).abs() / fd2.abs()).max() < 1e-3
    assert ((d1 - fd1).abs() / fd1.abs()).max() < 1e-5


def test_a_step_keyed_in_another_order_gives_the_same_derivatives(enumerable_setup):
    """An optimizer registered in another order gives its step dict in that order (AdamState.step):
    the derivatives are those of the same step in the LoRA dict's order (finite differences above)."""
    model, lora, step = enumerable_setup
    batch = fp.make_batch(PROMPTS, [[[1, 2], [3, 2]]] * len(PROMPTS))
    swapped = dict(reversed(list(step.items())))
    assert list(swapped) != list(lora)
    for got, want in zip(step_derivatives(model, lora, swapped, batch), step_derivatives(model, lora, step, batch),
                         strict=True):  # fmt: skip
        assert torch.equal(got, want) and float(want.abs().max()) > 0


def test_first_derivative_is_the_gradient_of_the_enumerated_entropy_along_the_step(enumerable_setup):
    model, lora, step = enumerable_setup
    d1, _ = exact_derivatives(model, lora, step, PROMPTS)

    def mean_entropy(theta):  # differentiable enumeration, reverse mode
        responses = exact_logprobs(model, lora, PROMPTS, LENGTH, EOS)[0]
        batch = fp.make_batch(PROMPTS, [responses] * len(PROMPTS), max_lengths=[LENGTH] * len(PROMPTS))
        S = fp.sequence_logprobs(model, theta, batch)
        return (-(S.exp() * S).sum(1) / LENGTH).mean()

    grad = torch.func.grad(mean_entropy)(lora)
    assert math.isclose(dot64(grad, step), float(d1.mean()), rel_tol=1e-9)


def test_first_derivative_estimate_is_the_x_loss_along_the_step(enumerable_setup):
    model, lora, step = enumerable_setup
    prompts, responses, _ = random_rollouts(4, 3, model.vocab_size, seed=5)
    E = fp.make_batch(prompts, responses)
    res = curvature(model, lora, step, E)
    mu_x = fp.mean_grad(model, lora, E, loss="x")  # reverse mode, LOO coefficients: DESIGN §1
    assert abs(res.d1) > 1e-3
    assert math.isclose(res.d1, dot64(mu_x, step), rel_tol=1e-9)


@pytest.mark.parametrize("prompt", [0, 3])
def test_monte_carlo_curvature_converges_to_the_exact_one(enumerable_setup, prompt):
    model, lora, step = enumerable_setup
    prompts = [PROMPTS[prompt]] * 24  # copies with independent draws: the SE is a pure Monte-Carlo SE
    responses, S = exact_logprobs(model, lora, prompts[:1], LENGTH, EOS)
    drawn = draw_from_exact(responses, S.expand(24, -1), 16, seed=prompt)
    E = fp.make_batch(prompts, drawn, max_lengths=[LENGTH] * 24)
    res = curvature(model, lora, step, E, fraction=0.1, microbatch=7)
    d1, d2 = (float(t[0]) for t in exact_derivatives(model, lora, step, prompts[:1]))
    assert abs(res.d1 - d1) < 4 * res.d1_se and abs(res.d2 - d2) < 4 * res.d2_se
    assert res.d2_se < abs(d2)  # resolved at this size
    value, se = res.delta_h2(res.s_star)
    assert math.isclose(abs(value), 0.1 * abs(res.s_star * res.d1), rel_tol=1e-12)
    assert se == pytest.approx(0.5 * res.s_star**2 * res.d2_se)
    # the jackknife SE of s* against the delta method: Var(log s*) ≈ v1/d1² + v2/d2² − 2 c12/(d1 d2)
    m = moments(torch.tensor(res.d1_per_prompt), torch.tensor(res.d2_per_prompt))
    delta = res.s_star * math.sqrt(res.d1_se**2 / res.d1**2 + res.d2_se**2 / res.d2**2
                                   - 2 * m.cov_of_means() / (res.d1 * res.d2))  # fmt: skip
    assert res.s_star_se == pytest.approx(delta, rel=0.5)  # equal to first order; measured 1.01x and 1.27x


def test_nested_jvp_through_nf4_matches_the_dual_forward_tangent():
    model = fp.tiny_model(quantize="nf4")
    lora, step = model.lora, random_step(model.lora, scale=0.1)
    prompts, responses, _ = random_rollouts(3, 2, model.vocab_size, seed=1)
    E = fp.make_batch(prompts, responses)
    S, S_dot, S_ddot = step_derivatives(model, lora, step, E, temperature=0.9)
    S_ref, S_dot_ref = fp.sequence_logprobs_and_tangent(model, lora, step, E, temperature=0.9)
    assert rel_err(S, S_ref) < 1e-5 and rel_err(S_dot, S_dot_ref) < 1e-4
    assert torch.isfinite(S_ddot).all() and S_ddot.abs().max() > 1e-3


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(fraction=0.0), "fraction"),
        (dict(E="one"), "at least 2 prompts"),
        (dict(E="g1"), "G = 1"),
        (dict(step="shape"), r"step\[.*\] has shape"),
    ],
)
def test_bad_arguments_raise_naming_them(enumerable_setup, change, match):
    model, lora, step = enumerable_setup
    E = fp.make_batch(PROMPTS[:3], [[[1, 2], [3]]] * 3)
    k0 = next(iter(step))
    edits = {"one": E[:1], "g1": fp.make_batch(PROMPTS[:2], [[[1]], [[2]]]), "shape": {**step, k0: step[k0][:1]}}
    args = dict(step=step, E=E) | {k: edits.get(v, v) if isinstance(v, str) else v for k, v in change.items()}
    with pytest.raises(ValueError, match=match):
        curvature(model, lora, args.pop("step"), args.pop("E"), **args)
