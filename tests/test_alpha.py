"""Projections s_n = <∇L[n], v> by every method against PEFT + autograd, finite differences, numpy."""

import functools

import numpy as np
import pytest
import torch
from helpers import peft_prompt_grads, proj_rel_err, random_direction, random_rollouts

import functional_probe as fp
from functional_probe.model import tiny_model
from functional_probe.testing import peft_twin

N, G = 5, 3


@pytest.fixture(scope="module")
def rollouts(tiny_fp32):
    return random_rollouts(N, G, tiny_fp32.vocab_size, seed=7)


def reference_s(model, rollouts, direction, loss, weighting):
    grads = peft_prompt_grads(peft_twin(model), *rollouts, loss, weighting)
    return torch.stack([sum((g[k] * direction[k]).sum() for k in g) for g in grads])


@pytest.mark.parametrize("which", ["tiny_fp32", "tiny_nf4"])
@pytest.mark.parametrize("loss,weighting", [("x", "dr_grpo"), ("x", "per_token_avg"), ("y", "dr_grpo")])
def test_all_methods_equal_peft_autograd_loop(request, rollouts, which, loss, weighting):
    model = request.getfixturevalue(which)
    batch = fp.make_batch(rollouts[0], rollouts[1], advantages=rollouts[2])
    direction = random_direction(model.lora, seed=1)
    ref = reference_s(model, rollouts, direction, loss, weighting)
    assert ref.abs().max() > 1e-3
    for method in fp.METHODS:
        s = fp.alpha_projections(
            model, model.lora, batch, direction, loss=loss, weighting=weighting, method=method
        )
        assert s.shape == (N,)
        assert proj_rel_err(s, ref) <= 1e-5, method


@pytest.mark.parametrize("method", fp.METHODS)
def test_microbatching_changes_nothing(tiny_nf4, rollouts, method):
    batch = fp.make_batch(rollouts[0], rollouts[1], advantages=rollouts[2])
    d = random_direction(tiny_nf4.lora, seed=2)
    whole = fp.alpha_projections(tiny_nf4, tiny_nf4.lora, batch, d, method=method)
    parts = fp.alpha_projections(tiny_nf4, tiny_nf4.lora, batch, d, method=method, microbatch=2)
    assert proj_rel_err(parts, whole) <= 1e-5


@pytest.fixture(scope="module")
def tiny_f64():
    return tiny_model(seed=0, quantize=None, dtype=torch.float64)


def test_s_equals_finite_differences_of_frozen_coefficient_surrogate(tiny_f64, rollouts):
    model, lora = tiny_f64, tiny_f64.lora
    batch = fp.make_batch(rollouts[0], rollouts[1], advantages=rollouts[2])
    d = random_direction(lora, seed=3)
    d = {k: v.double() for k, v in d.items()}
    S0 = fp.sequence_logprobs(model, lora, batch)
    lmax = batch.max_lengths.double()[:, None]
    w = S0 / lmax
    c = w - (w.sum(1, keepdim=True) - w) / (G - 1)  # frozen at θ

    def frozen(eps):
        S = fp.sequence_logprobs(model, {k: lora[k] + eps * d[k] for k in lora}, batch)
        return -(c * S).mean(1)

    def unfrozen(eps):
        return fp.x_losses(fp.sequence_logprobs(model, {k: lora[k] + eps * d[k] for k in lora}, batch), batch)

    h = 1e-4
    fd = (frozen(h) - frozen(-h)) / (2 * h)
    fd_unfrozen = (unfrozen(h) - unfrozen(-h)) / (2 * h)
    for method in fp.METHODS:
        s = fp.alpha_projections(model, lora, batch, d, method=method)
        assert proj_rel_err(s, fd) <= 1e-3, method
    # without the stop-gradient, dr_grpo's difference quotient is exactly twice s
    assert proj_rel_err(fd_unfrozen, 2 * fd) <= 1e-3


def test_alpha_variance_statistics_equal_numpy(tiny_nf4, rollouts):
    batch = fp.make_batch(rollouts[0], rollouts[1], advantages=rollouts[2])
    d = random_direction(tiny_nf4.lora, seed=4)
    eta = 3e-4
    r = fp.alpha_variance(tiny_nf4.lora, batch, model=tiny_nf4, direction=d, eta=eta)
    s = r.s.double().numpy()
    assert r.n == N
    assert r.mean == pytest.approx(s.mean(), rel=1e-12)
    assert r.sample_var == pytest.approx(np.var(s, ddof=1), rel=1e-10)
    assert r.delta == pytest.approx(eta * s.mean(), rel=1e-12)
    assert r.var == pytest.approx(eta**2 * np.var(s, ddof=1) / N, rel=1e-10)
    assert r.se == pytest.approx(eta * np.sqrt(np.var(s, ddof=1) / N), rel=1e-10)


def test_alpha_variance_of_near_identical_prompts_keeps_its_digits(tiny_nf4):
    """Large mean, tiny spread: Σs² − n·s̄² in float32 would return noise (or a negative)."""
    prompt, responses = [1, 2, 3], [[4, 5, 6], [7, 8]]
    batch = fp.make_batch([prompt] * 6, [responses] * 6, advantages=[[1.0, -1.0]] * 6)
    d = {k: 1e3 * v for k, v in random_direction(tiny_nf4.lora, seed=5).items()}
    r = fp.alpha_variance(tiny_nf4.lora, batch, model=tiny_nf4, direction=d, method="vjp")
    s = r.s.double().numpy()
    assert abs(r.mean) > 1.0
    assert r.sample_var == pytest.approx(np.var(s, ddof=1), rel=1e-9, abs=1e-300)
    assert r.sample_var >= 0.0
    s32 = r.s.float()
    naive = ((s32**2).sum() - len(s32) * s32.mean() ** 2) / (len(s32) - 1)
    assert r.sample_var <= 1e-6 * r.mean**2  # identical prompts: spread is rounding only
    assert naive.item() != pytest.approx(np.var(s, ddof=1), rel=1e-2, abs=1e-12) or naive.item() == 0


def test_research_script_call_with_partial(tiny_nf4, rollouts):
    batch = fp.make_batch(rollouts[0], rollouts[1], advantages=rollouts[2])
    d = random_direction(tiny_nf4.lora, seed=6)
    probe = functools.partial(fp.alpha_variance, model=tiny_nf4, direction=d, eta=1e-3)
    r = probe(tiny_nf4.lora, batch)
    loop = fp.alpha_projections(tiny_nf4, tiny_nf4.lora, batch, d, method="loop")
    assert proj_rel_err(r.s, loop) <= 1e-5


def test_vmap_over_a_stack_of_directions(tiny_fp32, rollouts):
    batch = fp.make_batch(rollouts[0], rollouts[1], advantages=rollouts[2])
    dirs = [random_direction(tiny_fp32.lora, seed=k) for k in range(3)]
    stacked = {k: torch.stack([d[k] for d in dirs]) for k in dirs[0]}
    s = torch.func.vmap(
        lambda d: fp.alpha_projections(tiny_fp32, tiny_fp32.lora, batch, d, method="func_jvp")
    )(stacked)
    for k, d in enumerate(dirs):
        assert (
            proj_rel_err(s[k], fp.alpha_projections(tiny_fp32, tiny_fp32.lora, batch, d, method="loop"))
            <= 1e-5
        )


def test_fewer_than_two_prompts_raise(tiny_nf4, rollouts):
    batch = fp.make_batch(rollouts[0][:1], rollouts[1][:1])
    with pytest.raises(ValueError, match="at least 2 prompts"):
        fp.alpha_variance(tiny_nf4.lora, batch, model=tiny_nf4, direction=tiny_nf4.lora)


def test_direction_mismatch_names_the_key(tiny_nf4, rollouts):
    batch = fp.make_batch(*rollouts[:2])
    d = dict(tiny_nf4.lora)
    key = sorted(d)[0]
    d[key] = d[key][:1]
    with pytest.raises(ValueError, match=f"direction\\['{key}'\\] has shape"):
        fp.alpha_projections(tiny_nf4, tiny_nf4.lora, batch, d)
    del d[key]
    with pytest.raises(ValueError, match=f"direction is missing '{key}'"):
        fp.alpha_projections(tiny_nf4, tiny_nf4.lora, batch, d)


def test_unknown_method_raises(tiny_nf4, rollouts):
    with pytest.raises(ValueError, match="method='fast'"):
        fp.alpha_projections(
            tiny_nf4, tiny_nf4.lora, fp.make_batch(*rollouts[:2]), tiny_nf4.lora, method="fast"
        )


@pytest.mark.parametrize("loss,weighting", [("x", "dr_grpo"), ("y", "dr_grpo")])
def test_loop_with_split_responses_equals_peft(tiny_fp32, rollouts, loss, weighting):
    batch = fp.make_batch(rollouts[0], rollouts[1], advantages=rollouts[2])
    d = random_direction(tiny_fp32.lora, seed=4)
    ref = reference_s(tiny_fp32, rollouts, d, loss, weighting)
    for size in (1, 2):
        s = fp.alpha_projections(tiny_fp32, tiny_fp32.lora, batch, d, loss=loss, method="loop", response_microbatch=size)
        assert proj_rel_err(s, ref) <= 1e-5, size


def test_alpha_variance_passes_response_microbatch(tiny_fp32, rollouts):
    batch = fp.make_batch(rollouts[0], rollouts[1], advantages=rollouts[2])
    d = random_direction(tiny_fp32.lora, seed=5)
    ref = reference_s(tiny_fp32, rollouts, d, "x", "dr_grpo")
    av = fp.alpha_variance(tiny_fp32.lora, batch, model=tiny_fp32, direction=d, method="loop", response_microbatch=1)
    assert proj_rel_err(av.s, ref) <= 1e-5


@pytest.mark.parametrize("method,size", [("vjp", 2), ("vmap", 1), ("loop", 0)])
def test_unsupported_response_microbatch_raises(tiny_fp32, rollouts, method, size):
    batch = fp.make_batch(rollouts[0], rollouts[1], advantages=rollouts[2])
    d = random_direction(tiny_fp32.lora, seed=5)
    with pytest.raises(ValueError, match="response_microbatch="):
        fp.alpha_projections(tiny_fp32, tiny_fp32.lora, batch, d, method=method, response_microbatch=size)
