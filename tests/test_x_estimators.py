"""x_estimators: the "rb" X loss against the exact entropy gradient by enumeration, transforms, refusals."""

import pytest
import torch
from enumerable import EOS, LENGTH, PROMPTS, draw_from_exact, exact_logprobs
from torch.func import grad

import functional_probe as fp
from functional_probe.alpha import alpha_projections
from functional_probe.grads import per_sample_grads, prompt_losses


def exact_grad_and_singletons(model, prompt):
    """∇H for one prompt by enumeration (autograd) and the batch of every response as G = 1 rows."""

    def H(p):
        _, S = exact_logprobs(model, p, [prompt], LENGTH, EOS)
        return -(S.exp() * S).sum() / LENGTH

    responses, S = exact_logprobs(model, model.lora, [prompt], LENGTH, EOS)
    batch = fp.make_batch(
        [prompt] * len(responses), [[r] for r in responses], max_lengths=[LENGTH] * len(responses)
    )
    return grad(H)(dict(model.lora)), S.exp()[0], batch


@pytest.mark.parametrize("estimator", ["rb", "loo"])
def test_expectation_equals_exact_entropy_gradient(enumerable_setup, estimator):
    # The leave-one-out baseline is independent of the response, so E[∇L] is the G = 1 one:
    # Σ_y π(y) ∇L(y) over all 156 responses must equal ∇H_n exactly.
    model = enumerable_setup[0]
    exact, pi, batch = exact_grad_and_singletons(model, PROMPTS[1])
    per = per_sample_grads(model, model.lora, batch, loss="x", x_estimator=estimator)
    for k in exact:
        torch.testing.assert_close(torch.einsum("n...,n->...", per[k], pi), exact[k], atol=1e-9, rtol=1e-6)


@pytest.mark.parametrize("method", ["jvp", "vjp", "vmap"])
def test_rb_projections_match_an_autograd_loop(enumerable_setup, method):
    model, lora, step = enumerable_setup
    responses, S = exact_logprobs(model, lora, PROMPTS[:3], LENGTH, EOS)
    groups = draw_from_exact(responses, S, group=4, seed=0)
    batch = fp.make_batch(PROMPTS[:3], groups, max_lengths=[LENGTH] * 3)
    s = alpha_projections(model, lora, batch, step, method=method, x_estimator="rb")
    loop = [
        sum((g[k] * step[k]).sum() for k in g)
        for g in (
            grad(lambda p, n=n: prompt_losses(model, p, batch[n], x_estimator="rb")[0])(dict(lora))
            for n in range(3)
        )
    ]
    torch.testing.assert_close(s, torch.stack(loop), atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(x_estimator="rbb"), "x_estimator='rbb'"),
        (dict(x_estimator="rb", weighting="per_token_avg"), "x_estimator='rb' needs weighting='dr_grpo'"),
    ],
)
def test_bad_x_estimator_raises(enumerable_setup, kw, match):
    model = enumerable_setup[0]
    batch = fp.make_batch(PROMPTS[:2], [[[1, EOS]], [[3, EOS]]], max_lengths=[LENGTH] * 2)
    with pytest.raises(ValueError, match=match):
        fp.mean_grad(model, model.lora, batch, distributed=False, **kw)
