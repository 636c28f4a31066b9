"""first_order_check: the linear prediction against the model re-evaluated at θ + η·μY."""

import pytest
import torch
from helpers import sample_rollouts

import functional_probe as fp
from functional_probe.first_order import etas_for_relative_steps, first_order_check
from functional_probe.grads import dot

RELATIVE_STEPS = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1]


@pytest.fixture(scope="module")
def entropy_raising_update(tiny_fp32):
    """Advantages = −(w − b): the update rewards surprise, so it moves along the entropy gradient."""
    model = tiny_fp32
    rollouts = sample_rollouts(model, model.lora, num_prompts=8, group_size=4, seed=1)
    batch = rollouts.to_batch()
    S = fp.sequence_logprobs(model, model.lora, batch).double()
    w = S / batch.max_lengths.double()[:, None]
    c = w - (w.sum(1, keepdim=True) - w) / (S.shape[1] - 1)
    batch = fp.make_batch(rollouts.prompts, rollouts.responses, advantages=(-c).tolist())
    params = {k: torch.nn.Parameter(v.clone()) for k, v in model.lora.items()}
    opt = torch.optim.AdamW(params.values(), lr=1e-3)
    for _ in range(3):
        g = fp.mean_grad(model, {k: p.detach() for k, p in params.items()}, batch, loss="y")
        for k, p in params.items():
            p.grad = -g[k]
        opt.step()
    lora = {k: p.detach() for k, p in params.items()}
    return model, lora, batch, fp.AdamPreconditioner.from_optimizer(opt, params)


def test_prediction_matches_within_one_percent_at_relative_step_1e_3(entropy_raising_update):
    model, lora, batch, pre = entropy_raising_update
    etas = etas_for_relative_steps(model, lora, batch, pre, RELATIVE_STEPS)
    check = first_order_check(model, lora, batch, batch, pre, etas)
    steps = [p.relative_step for p in check.points]
    assert steps == pytest.approx(RELATIVE_STEPS, rel=1e-6)
    at = check.points[RELATIVE_STEPS.index(1e-3)]
    assert abs(at.actual) > 1e-4
    assert at.ratio == pytest.approx(1.0, abs=0.01)
    assert all(p.predicted == pytest.approx(p.eta * check.bars_dot) for p in check.points)


def test_actual_change_is_the_model_at_the_shifted_dict(entropy_raising_update):
    """The 'actual' column is the frozen-coefficient surrogate re-evaluated, computed here by hand."""
    model, lora, batch, pre = entropy_raising_update
    eta = 1e-3
    check = first_order_check(model, lora, batch, batch, pre, [eta])
    mu_y = fp.mean_grad(model, lora, batch, loss="y", preconditioner=pre)
    # the same S path as first_order_check (the fast primal), so no 1e-7 offsets
    S0 = fp.sequence_logprobs(model, lora, batch, derivatives=False).double()
    S1 = fp.sequence_logprobs(model, {k: lora[k] + eta * mu_y[k] for k in lora}, batch, derivatives=False).double()
    w = S0 / batch.max_lengths.double()[:, None]
    c = w - (w.sum(1, keepdim=True) - w) / (S0.shape[1] - 1)
    expected = float((-(c * S1).mean(1) + (c * S0).mean(1)).mean())
    assert check.points[0].actual == pytest.approx(expected, rel=1e-9)
    assert check.bars_dot == pytest.approx(float(dot(fp.mean_grad(model, lora, batch), mu_y)), rel=1e-6)


def test_probed_eta_is_evaluated_like_any_other_point(entropy_raising_update):
    model, lora, batch, pre = entropy_raising_update
    etas = etas_for_relative_steps(model, lora, batch, pre, [1e-3])
    check = first_order_check(model, lora, batch, batch, pre, etas, probed_eta=etas[0])
    assert check.probed == check.points[0]
    assert check.holds(check.probed) and check.linear_range() == (etas[0], etas[0])


def test_noise_floor_is_one_fp32_rounding_of_the_surrogate_terms(entropy_raising_update):
    model, lora, batch, pre = entropy_raising_update
    check = first_order_check(model, lora, batch, batch, pre, [1e-3])
    S0 = fp.sequence_logprobs(model, lora, batch).double()
    w = S0 / batch.max_lengths.double()[:, None]
    c = w - (w.sum(1, keepdim=True) - w) / (S0.shape[1] - 1)
    terms = (c * S0).flatten().tolist()
    expected = 2.0**-23 * sum(x * x for x in terms) ** 0.5 / len(terms)
    assert check.noise_floor == pytest.approx(expected, rel=1e-9)
    assert check.noise_floor > 0


@pytest.mark.parametrize("eta", [0.0, -1e-3, float("nan")])
def test_step_sizes_that_are_not_positive_numbers_are_refused(entropy_raising_update, eta):
    model, lora, batch, pre = entropy_raising_update
    with pytest.raises(ValueError, match="first_order_check: eta .*expected a finite step size > 0"):
        first_order_check(model, lora, batch, batch, pre, [1e-3, eta])
    with pytest.raises(ValueError, match="first_order_check: probed_eta=.*expected a finite"):
        first_order_check(model, lora, batch, batch, pre, [1e-3], probed_eta=eta)
