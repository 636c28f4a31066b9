"""The no-grad fast primal against the plain forward (autograd path) and transformers + PEFT."""

import pytest
import torch
from helpers import peft_sequence_logprob, random_direction, random_rollouts, rel_err
from test_dual import ARCHITECTURES

import functional_probe as fp
from functional_probe import logprobs
from functional_probe.model.fast_primal import fast_sequence_logprobs
from functional_probe.testing import peft_twin


def ragged_batch(vocab: int, seed: int = 0):
    """3 prompts x 2 responses of unequal lengths: left-padded prompts, right-padded responses."""
    prompts, responses, _ = random_rollouts(3, 2, vocab, seed=seed)
    return fp.make_batch(prompts, responses), prompts, responses


def plain_S(model, lora, batch, temperature=1.0):
    """S through the plain forward: grad mode on, so `sequence_logprobs` takes the autograd path."""
    with torch.enable_grad():
        return fp.sequence_logprobs(model, lora, batch, temperature=temperature).detach()


def fast_S(model, lora, batch, temperature=1.0, **blocks):
    with torch.no_grad():
        b = batch
        return fast_sequence_logprobs(
            model, lora, b.input_ids, b.attention_mask, b.position_ids, b.response_mask,
            prompt_end=b.prompt_end, temperature=temperature, chunk_tokens=5, **blocks,
        )  # fmt: skip


@pytest.mark.parametrize("blocks", [{}, {"block_q": 5, "block_k": 3}], ids=["default", "q5k3"])
@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_fast_primal_equals_plain_forward(arch, blocks):
    model = ARCHITECTURES[arch]()
    batch, _, _ = ragged_batch(model.vocab_size, seed=1)
    assert not batch.attention_mask.all()  # padded on both sides
    for temperature in (1.0, 0.7):
        got, ref = (
            fast_S(model, model.lora, batch, temperature, **blocks),
            plain_S(model, model.lora, batch, temperature),
        )
        assert got.shape == ref.shape == (3, 2) and got.dtype == torch.float32
        assert rel_err(got, ref) <= 1e-5


@pytest.mark.parametrize("which", ["tiny_fp32", "tiny_nf4"])
def test_sequence_logprobs_without_derivatives_takes_the_fast_path_and_equals_peft(request, which, monkeypatch):
    model = request.getfixturevalue(which)
    batch, prompts, responses = ragged_batch(model.vocab_size, seed=2)
    calls = []
    monkeypatch.setattr(
        logprobs, "fast_sequence_logprobs", lambda *a, **k: calls.append(1) or fast_sequence_logprobs(*a, **k)
    )
    S = fp.sequence_logprobs(model, model.lora, batch, derivatives=False)
    assert calls == [1]
    with torch.no_grad():
        fp.sequence_logprobs(model, model.lora, batch)  # no_grad alone is no request for it
    assert calls == [1]
    twin = peft_twin(model)
    with torch.no_grad():
        ref = torch.stack(
            [
                torch.stack([peft_sequence_logprob(twin, p, r) for r in rs])
                for p, rs in zip(prompts, responses, strict=True)
            ]
        )
    assert rel_err(S, ref) <= 1e-5


def test_fast_primal_is_pure(tiny_fp32):
    lora = tiny_fp32.lora
    before = {k: v.clone() for k, v in lora.items()}
    batch, _, _ = ragged_batch(tiny_fp32.vocab_size)
    assert torch.equal(fast_S(tiny_fp32, lora, batch), fast_S(tiny_fp32, lora, batch))
    assert all(torch.equal(v, before[k]) for k, v in lora.items())
    with pytest.raises(ValueError, match="missing"):
        fast_S(tiny_fp32, dict(list(lora.items())[1:]), batch)


def test_transforms_under_no_grad_still_get_their_derivatives(tiny_fp32):
    """Inside torch.func transforms the fast primal must not be taken, no_grad or not."""
    lora, direction = tiny_fp32.lora, random_direction(tiny_fp32.lora, seed=3)
    batch, _, _ = ragged_batch(tiny_fp32.vocab_size, seed=4)
    S_of = lambda lo: fp.sequence_logprobs(tiny_fp32, lo, batch)  # noqa: E731
    _, ref_dot = torch.func.jvp(S_of, (lora,), (direction,))
    with torch.no_grad():
        _, dot = torch.func.jvp(S_of, (lora,), (direction,))
        vmapped = torch.func.vmap(lambda d: torch.func.jvp(S_of, (lora,), (d,))[1])(
            {k: torch.stack([v, 2 * v]) for k, v in direction.items()}
        )
    assert ref_dot.abs().max() > 1e-3
    assert rel_err(dot, ref_dot) <= 1e-6
    assert rel_err(vmapped[1], 2 * ref_dot) <= 1e-5


def test_no_derivatives_under_a_transform_is_refused(tiny_fp32):
    batch, _, _ = ragged_batch(tiny_fp32.vocab_size)
    S_of = lambda lo: fp.sequence_logprobs(tiny_fp32, lo, batch, derivatives=False)  # noqa: E731
    with pytest.raises(ValueError, match="derivatives=False"):
        torch.func.jvp(S_of, (tiny_fp32.lora,), (tiny_fp32.lora,))
