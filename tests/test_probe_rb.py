"""probe(x_estimator="rb") against a per-token autograd transcription, its expectation by enumeration, refusals."""

import importlib

import pytest
import torch
from enumerable import EOS, LENGTH, PROMPTS, draw_from_exact, exact_logprobs
from torch.func import grad

import functional_probe as fp
from functional_probe.grads import dot64
from functional_probe.probe import probe

ETA = 1e-3


@pytest.fixture(scope="module")
def rb_setting(enumerable_setup):
    """The enumerable float64 model, E (3 prompts × 4 responses drawn from the exact π), U (3 × 4,
    random advantages) and a random positive diagonal preconditioner."""
    model, lora, _ = enumerable_setup
    responses, S = exact_logprobs(model, lora, PROMPTS, LENGTH, EOS)
    groups = draw_from_exact(responses, S, group=4, seed=3)
    gen = torch.Generator().manual_seed(5)
    E = fp.make_batch(PROMPTS[:3], groups[:3], max_lengths=[LENGTH] * 3)
    U = fp.make_batch(PROMPTS[3:], groups[3:], advantages=torch.randn(3, 4, generator=gen).tolist(),
                      max_lengths=[LENGTH] * 3)  # fmt: skip
    scale = {k: torch.rand(v.shape, generator=gen, dtype=v.dtype) + 0.5 for k, v in lora.items()}
    return model, lora, E, U, lambda g: {k: scale[k] * v for k, v in g.items()}


def rb_loss_by_hand(model, lora, prompt, group, lmax):
    """(1/Lmax)·mean_g Σ_t [H_t + c_t·log π(y_t)], c_t = stopgrad(R_t − b_t), R_t = Σ_{t'>t} H_t',
    b_t the mean of R_t over the other responses (0 past their end), token by token from the
    model's logits on each unpadded sequence."""
    H, logp = [], []
    for y in group:
        lp = fp_logits(model, lora, prompt + y)[len(prompt) - 1 : -1].log_softmax(-1)  # [len(y), V]
        H.append(-(lp.exp() * lp).sum(-1))
        logp.append(lp[torch.arange(len(y)), torch.tensor(y)])
    to_go = [[h[t + 1 :].sum() for t in range(len(h))] for h in H]
    total = 0.0
    for g in range(len(group)):
        for t in range(len(H[g])):
            others = [to_go[o][t] if t < len(to_go[o]) else 0.0 for o in range(len(group)) if o != g]
            c = (to_go[g][t] - sum(others) / max(len(others), 1)).detach()
            total = total + H[g][t] + c * logp[g][t]
    return total / len(group) / lmax


def fp_logits(model, lora, ids):
    return model.forward(lora, torch.tensor([ids]))[0].double()


@pytest.mark.parametrize("method", ["jvp", "vjp", "loop"])
def test_rb_probe_equals_a_per_token_autograd_loop(rb_setting, method):
    model, lora, E, U, pre = rb_setting
    r = probe(model, lora, E, U, preconditioner=pre, eta=ETA, method=method, x_estimator="rb")
    mu_y = pre(fp.mean_grad(model, lora, U, loss="y"))
    X = []
    for n, prompt in enumerate(PROMPTS[:3]):
        group = [E.input_ids[n, g, E.response_mask[n, g]].tolist() for g in range(4)]
        leaves = {k: v.clone().requires_grad_() for k, v in lora.items()}
        g = torch.autograd.grad(rb_loss_by_hand(model, leaves, prompt, group, LENGTH), list(leaves.values()))
        X.append(dict(zip(leaves, g, strict=True)))
    s = torch.tensor([dot64(x, mu_y) for x in X], dtype=torch.float64)
    torch.testing.assert_close(torch.tensor(r.s, dtype=torch.float64), s, rtol=1e-8, atol=1e-12)
    assert r.bars_dot == pytest.approx(float(s.mean()), rel=1e-8)
    assert r.x_estimator == "rb" and r.delta_h1 == pytest.approx(ETA * r.bars_dot, rel=1e-12)
    loo = probe(model, lora, E, U, preconditioner=pre, eta=ETA, method=method)
    assert loo.x_estimator == "loo" and abs(loo.bars_dot - r.bars_dot) > 1e-6 * abs(r.bars_dot)  # other estimator


def test_rb_and_loo_delta_h1_have_the_exact_expectation(rb_setting):
    """E as every response of one prompt (156 prompts of G = 1, the leave-one-out baseline drops
    out in expectation): Σ_y π(y)·s_y is E[δH₁]/η for each estimator; both equal <∇H, μY> with
    ∇H by autograd of the enumerated entropy."""
    model, lora, _, U, pre = rb_setting
    prompt = PROMPTS[1]
    responses, S = exact_logprobs(model, lora, [prompt], LENGTH, EOS)
    pi = S.exp()[0]
    singles = fp.make_batch([prompt] * len(responses), [[y] for y in responses], max_lengths=[LENGTH] * len(responses))

    def H(p):
        _, S = exact_logprobs(model, p, [prompt], LENGTH, EOS)
        return -(S.exp() * S).sum() / LENGTH

    exact = dot64(grad(H)(dict(lora)), pre(fp.mean_grad(model, lora, U, loss="y")))
    expected = {}
    for est in ("rb", "loo"):
        r = probe(model, lora, singles, U, preconditioner=pre, eta=ETA, x_estimator=est)
        expected[est] = float((torch.tensor(r.s, dtype=torch.float64) * pi).sum())
    print(f"E[δH₁]/η: rb {expected['rb']:.10g}, loo {expected['loo']:.10g}, exact {exact:.10g}")
    assert expected["rb"] == pytest.approx(exact, rel=1e-7)
    assert expected["loo"] == pytest.approx(exact, rel=1e-7)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(x_estimator="rbb"), "x_estimator='rbb'"),
        (dict(x_estimator="rb", weighting="per_token_avg"), "x_estimator='rb' needs weighting='dr_grpo'"),
        (dict(x_estimator="rb", method="loop", response_microbatch=2), "response_microbatch=2 needs x_estimator='loo'"),
    ],
)
def test_bad_x_estimator_is_refused_before_any_gradient(rb_setting, monkeypatch, kw, match):
    model, lora, E, U, pre = rb_setting

    def no_gradients(*a, **k):
        raise AssertionError("a gradient was computed before x_estimator was checked")

    monkeypatch.setattr(importlib.import_module("functional_probe.probe"), "mean_grad", no_gradients)
    with pytest.raises(ValueError, match=match):
        probe(model, lora, E, U, preconditioner=pre, eta=ETA, **kw)
