"""method="jvp" composes with torch.func transforms and autograd (issue 17.3), against finite
differences of the eager dual and per-direction eager calls."""

import pytest
import torch
from helpers import proj_rel_err, random_direction, random_rollouts

import functional_probe as fp


@pytest.fixture(scope="module")
def setup():
    model = fp.tiny_model(quantize=None, dtype=torch.float64)
    prompts, responses, adv = random_rollouts(3, 2, model.vocab_size, seed=5)
    batch = fp.make_batch(prompts, responses, advantages=adv)
    lora = model.lora
    direction = random_direction(lora, seed=6)
    return model, lora, batch, direction


def projections(setup, lora, direction, loss="x"):
    model, _, batch, _ = setup
    return fp.alpha_projections(model, lora, batch, direction, loss=loss, method="jvp")


@pytest.mark.parametrize("loss", ["x", "y"])
def test_jvp_under_vmap_over_directions_equals_one_call_per_direction(setup, loss):
    _, lora, _, direction = setup
    dirs = [random_direction(lora, seed=s) for s in (7, 8, 9)]
    stacked = {k: torch.stack([d[k] for d in dirs]) for k in lora}
    got = torch.func.vmap(lambda d: projections(setup, lora, d, loss))(stacked)
    ref = torch.stack([projections(setup, lora, d, loss) for d in dirs])  # eager: the dual forward
    assert got.shape == ref.shape == (3, 3) and ref.abs().max() > 1e-3
    assert proj_rel_err(got, ref) <= 1e-10


def finite_difference(setup, u, eps=1e-5):
    """d/dε Σ_n s_n(lora + ε u) for the Y loss by central differences of the eager dual (float64).
    (The X loss's coefficient is under stop-gradient, which differences cannot see.)"""
    _, lora, _, direction = setup
    shifted = lambda e: {k: v + e * u[k] for k, v in lora.items()}  # noqa: E731
    s = lambda e: projections(setup, shifted(e), direction, "y").sum()  # noqa: E731
    return (s(eps) - s(-eps)) / (2 * eps)


@pytest.fixture(scope="module")
def along(setup):
    """(u, total, fd): a second direction u, θ ↦ Σ_n s_n(θ) of the Y loss, and its FD derivative along u."""
    _, lora, _, direction = setup
    u = random_direction(lora, seed=10)
    fd = finite_difference(setup, u)
    assert fd.abs() > 1e-3
    return u, (lambda lo: projections(setup, lo, direction, "y").sum()), fd


def test_jvp_under_torch_func_grad_equals_finite_differences(setup, along):
    u, total, fd = along
    g = torch.func.grad(total)(setup[1])
    assert abs(sum((g[k] * u[k]).sum() for k in g) - fd) <= 1e-6 * fd.abs()


def test_jvp_under_torch_func_jvp_equals_finite_differences(setup, along):
    u, total, fd = along
    _, tangent = torch.func.jvp(total, (setup[1],), (u,))
    assert abs(tangent - fd) <= 1e-6 * fd.abs()


def test_jvp_under_autograd_equals_finite_differences(setup, along):
    """Plain reverse mode: the dual runs eagerly (DualProjections), its backward is the composable path's."""
    u, total, fd = along
    tracked = {k: v.clone().requires_grad_() for k, v in setup[1].items()}
    value = total(tracked)
    nodes, seen = [value.grad_fn], set()
    while nodes:  # the autograd graph reaches the dual's Function, not a recorded func_jvp
        node = nodes.pop()
        seen.add(type(node).__name__)
        nodes += [f for f, _ in node.next_functions if f is not None]
    assert "DualProjectionsBackward" in seen
    auto = torch.autograd.grad(value, list(tracked.values()))
    assert abs(sum((a * u[k]).sum() for a, k in zip(auto, tracked, strict=True)) - fd) <= 1e-6 * fd.abs()
