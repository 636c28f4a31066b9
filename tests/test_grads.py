"""Mean and per-sample gradients against per-prompt torch.autograd on the PEFT twin."""

import pytest
import torch
from helpers import (
    assert_not_trivial,
    dict_rel_err,
    peft_prompt_grads,
    random_direction,
    random_rollouts,
    rel_err,
)  # fmt: skip

import functional_probe as fp
from functional_probe.testing import peft_twin

N, G = 4, 3


@pytest.fixture(scope="module")
def rollouts(tiny_fp32):
    return random_rollouts(N, G, tiny_fp32.vocab_size, seed=5)


def mean_of(dicts):
    return {k: torch.stack([d[k] for d in dicts]).mean(0) for k in dicts[0]}


@pytest.mark.parametrize("which", ["tiny_fp32", "tiny_nf4"])
@pytest.mark.parametrize("loss,weighting", [("x", "dr_grpo"), ("x", "per_token_avg"), ("y", "dr_grpo")])
def test_mean_grad_equals_peft_autograd_loop(request, rollouts, which, loss, weighting):
    model = request.getfixturevalue(which)
    prompts, responses, adv = rollouts
    batch = fp.make_batch(prompts, responses, advantages=adv)
    ref = mean_of(peft_prompt_grads(peft_twin(model), prompts, responses, adv, loss, weighting))
    got = fp.mean_grad(model, model.lora, batch, loss=loss, weighting=weighting)
    assert_not_trivial(ref)
    assert dict_rel_err(got, ref) <= 1e-5


@pytest.mark.parametrize("microbatch", [1, 3])
def test_mean_grad_does_not_depend_on_microbatch(tiny_nf4, rollouts, microbatch):
    batch = fp.make_batch(*rollouts[:2], advantages=rollouts[2])
    whole = fp.mean_grad(tiny_nf4, tiny_nf4.lora, batch, loss="y")
    assert (
        dict_rel_err(fp.mean_grad(tiny_nf4, tiny_nf4.lora, batch, loss="y", microbatch=microbatch), whole)
        <= 1e-5
    )


def test_preconditioned_mean_grad_equals_hand_formula_from_real_adamw(tiny_fp32, rollouts):
    prompts, responses, adv = rollouts
    batch = fp.make_batch(prompts, responses, advantages=adv)
    params = {k: torch.nn.Parameter(v.clone()) for k, v in tiny_fp32.lora.items()}
    opt = torch.optim.AdamW(params.values(), lr=1e-3, betas=(0.9, 0.99), eps=1e-6)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):  # real steps on gradients unrelated to the probe's, so P is not ~sign(g)
        for p in params.values():
            p.grad = torch.randn(p.shape, generator=gen) * 0.01
        opt.step()
    lora = {k: p.detach() for k, p in params.items()}
    pre = fp.AdamPreconditioner.from_optimizer(opt, params)
    got = fp.mean_grad(tiny_fp32, lora, batch, loss="y", preconditioner=pre)
    twin = peft_twin(tiny_fp32)
    with torch.no_grad():
        for name, p in twin.named_parameters():
            if name in lora:
                p.copy_(lora[name])
    raw = mean_of(peft_prompt_grads(twin, prompts, responses, adv, "y"))
    expected = {}
    for k, p in params.items():
        state = opt.state[p]
        v_hat = state["exp_avg_sq"] / (1 - 0.99 ** float(state["step"]))
        expected[k] = raw[k] / (v_hat.sqrt() + 1e-6)
    assert_not_trivial(expected)
    assert dict_rel_err(got, expected) <= 1e-5


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_per_sample_grads_equal_peft_autograd_per_prompt(tiny_nf4, rollouts, chunk_size):
    prompts, responses, adv = rollouts
    batch = fp.make_batch(prompts, responses, advantages=adv)
    per = fp.per_sample_grads(tiny_nf4, tiny_nf4.lora, batch, loss="x", chunk_size=chunk_size)
    ref = peft_prompt_grads(peft_twin(tiny_nf4), prompts, responses, adv, "x")
    for n in range(N):
        assert_not_trivial(ref[n])
        assert dict_rel_err({k: v[n] for k, v in per.items()}, ref[n]) <= 1e-5


def test_gram_equals_explicit_inner_products(tiny_fp32, rollouts):
    batch = fp.make_batch(*rollouts[:2], advantages=rollouts[2])
    px = fp.per_sample_grads(tiny_fp32, tiny_fp32.lora, batch, loss="x")
    py = fp.per_sample_grads(tiny_fp32, tiny_fp32.lora, batch[:2], loss="y")
    K = fp.gram(px, py)
    explicit = torch.tensor(
        [[sum((px[k][n].double() * py[k][m].double()).sum() for k in px) for m in range(2)] for n in range(N)]
    )
    assert K.shape == (N, 2)
    assert rel_err(K, explicit) <= 1e-12


def test_grad_under_outer_no_grad_equals_outside(tiny_nf4, rollouts):
    batch = fp.make_batch(*rollouts[:2])
    outside = fp.mean_grad(tiny_nf4, tiny_nf4.lora, batch)
    with torch.no_grad():
        inside = fp.mean_grad(tiny_nf4, tiny_nf4.lora, batch)
    assert dict_rel_err(inside, outside) == 0.0


def test_grad_under_inference_mode_equals_outside(tiny_nf4, rollouts):
    """torch.func builds its own graph even inside inference_mode: same gradients, not zeros."""
    batch = fp.make_batch(*rollouts[:2])
    outside = fp.mean_grad(tiny_nf4, tiny_nf4.lora, batch)
    d = random_direction(tiny_nf4.lora)
    s_out = fp.alpha_projections(tiny_nf4, tiny_nf4.lora, batch, d, method="vjp")
    with torch.inference_mode():
        inside = fp.mean_grad(tiny_nf4, tiny_nf4.lora, batch)
        s_in = fp.alpha_projections(tiny_nf4, tiny_nf4.lora, batch, d, method="vjp")
    assert_not_trivial(inside)
    assert dict_rel_err(inside, outside) <= 1e-6
    assert rel_err(s_in, s_out) <= 1e-5


def test_unknown_loss_raises(tiny_fp32, rollouts):
    with pytest.raises(ValueError, match="loss='z'"):
        fp.mean_grad(tiny_fp32, tiny_fp32.lora, fp.make_batch(*rollouts[:2]), loss="z")


def test_lora_dict_with_missing_key_is_named(tiny_fp32, rollouts):
    lora = dict(tiny_fp32.lora)
    key = sorted(lora)[3]
    del lora[key]
    with pytest.raises(ValueError, match=f"missing '{key}'"):
        fp.mean_grad(tiny_fp32, lora, fp.make_batch(*rollouts[:2]))


def test_long_rows_mean_grad_equals_peft_autograd_with_checkpointing_and_sdpa(tiny_fp32):
    """T ≈ 600 on the tiny model: SDPA, recompute head and per-layer checkpointing all active."""
    from functional_probe.grads import reverse_kernels

    gen = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, tiny_fp32.vocab_size, (40,), generator=gen).tolist()]
    responses = [[torch.randint(0, tiny_fp32.vocab_size, (n,), generator=gen).tolist() for n in (560, 430)]]
    batch = fp.make_batch(prompts, responses, advantages=[[0.5, -1.0]])
    kernels = reverse_kernels(batch)
    assert (kernels.attention, kernels.head, kernels.checkpoint) == ("sdpa", "recompute", True)
    for loss in ("x", "y"):
        ref = mean_of(peft_prompt_grads(peft_twin(tiny_fp32), prompts, responses, [[0.5, -1.0]], loss))
        got = fp.mean_grad(tiny_fp32, tiny_fp32.lora, batch, loss=loss)
        assert_not_trivial(ref)
        assert dict_rel_err(got, ref) <= 1e-4


@pytest.mark.parametrize("loss,weighting", [("x", "dr_grpo"), ("x", "per_token_avg"), ("y", "dr_grpo")])
@pytest.mark.parametrize("response_microbatch", [1, 2])
def test_response_microbatches_equal_unsplit_and_peft(tiny_fp32, rollouts, loss, weighting, response_microbatch):
    prompts, responses, adv = rollouts
    batch = fp.make_batch(prompts, responses, advantages=adv)
    kw = dict(loss=loss, weighting=weighting)
    whole = fp.mean_grad(tiny_fp32, tiny_fp32.lora, batch, **kw)
    split = fp.mean_grad(tiny_fp32, tiny_fp32.lora, batch, microbatch=3, response_microbatch=response_microbatch, **kw)
    ref = mean_of(peft_prompt_grads(peft_twin(tiny_fp32), prompts, responses, adv, loss, weighting))
    assert_not_trivial(ref)
    assert dict_rel_err(split, whole) <= 1e-5
    assert dict_rel_err(split, ref) <= 1e-5


@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_bad_response_microbatch_raises(tiny_fp32, rollouts, bad):
    with pytest.raises(ValueError, match="response_microbatch="):
        fp.mean_grad(tiny_fp32, tiny_fp32.lora, fp.make_batch(*rollouts[:2]), response_microbatch=bad)


def test_reverse_kernels_pass_the_key_mask_only_for_left_padded_batches(tiny_fp32):
    from functional_probe.grads import reverse_kernels

    right_only = fp.make_batch([[1, 2, 3]], [[[4, 5, 6, 7], [8]]])
    left = fp.make_batch([[1, 2, 3], [4]], [[[5]], [[6]]])
    assert reverse_kernels(right_only).causal_only and not reverse_kernels(left).causal_only
    assert not reverse_kernels(right_only).checkpoint
