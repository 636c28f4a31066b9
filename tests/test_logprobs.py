"""S (teacher-forced sequence log-probs) against transformers + PEFT run per sequence."""

import pytest
import torch
from helpers import peft_sequence_logprob, random_rollouts, rel_err
from hypothesis import given, settings
from hypothesis import strategies as st

import functional_probe as fp
from functional_probe.testing import peft_twin


def reference_S(peft_model, prompts, responses, temperature=1.0):
    with torch.no_grad():
        return torch.stack([
            torch.stack([peft_sequence_logprob(peft_model, p, r, temperature) for r in rs])
            for p, rs in zip(prompts, responses, strict=True)
        ])  # fmt: skip


@pytest.mark.parametrize("which", ["tiny_fp32", "tiny_nf4"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_S_equals_peft_per_sequence_unpadded(request, which, temperature):
    model = request.getfixturevalue(which)
    prompts, responses, _ = random_rollouts(5, 3, model.vocab_size, seed=1)
    batch = fp.make_batch(prompts, responses)
    S = fp.sequence_logprobs(model, model.lora, batch, temperature=temperature)
    assert S.shape == (5, 3) and S.dtype == torch.float32
    ref = reference_S(peft_twin(model), prompts, responses, temperature)
    assert rel_err(S, ref) <= 1e-5


def test_chunk_size_does_not_change_S(tiny_fp32):
    prompts, responses, _ = random_rollouts(4, 2, tiny_fp32.vocab_size, seed=2)
    batch = fp.make_batch(prompts, responses)
    whole = fp.sequence_logprobs(tiny_fp32, tiny_fp32.lora, batch, chunk_tokens=10**6)
    for chunk in (1, 7, 64):
        assert (
            rel_err(fp.sequence_logprobs(tiny_fp32, tiny_fp32.lora, batch, chunk_tokens=chunk), whole) < 1e-6
        )


@settings(max_examples=15, deadline=None)
@given(
    n=st.integers(1, 4),
    g=st.integers(1, 3),
    seed=st.integers(0, 10_000),
    pad=st.integers(0, 600),
)
def test_each_row_S_equals_the_row_alone(tiny_fp32, n, g, seed, pad):
    """Batch invariance: S of a row does not depend on its neighbours or its padding."""
    prompts, responses, _ = random_rollouts(n, g, tiny_fp32.vocab_size, seed=seed)
    batch = fp.make_batch(prompts, responses, pad_token_id=pad % tiny_fp32.vocab_size)
    S = fp.sequence_logprobs(tiny_fp32, tiny_fp32.lora, batch)
    for i in range(n):
        for j in range(g):
            alone = fp.sequence_logprobs(
                tiny_fp32, tiny_fp32.lora, fp.make_batch([prompts[i]], [[responses[i][j]]])
            )
            assert rel_err(S[i, j], alone[0, 0]) <= 1e-5


def test_responses_containing_the_pad_id_are_scored(tiny_fp32):
    prompts, responses = [[5, 6, 7]], [[[0, 0, 9], [4]]]
    S = fp.sequence_logprobs(tiny_fp32, tiny_fp32.lora, fp.make_batch(prompts, responses, pad_token_id=0))
    ref = reference_S(peft_twin(tiny_fp32), prompts, responses)
    assert rel_err(S, ref) <= 1e-5


def test_pad_positions_give_no_nan_in_forward_grad_jvp_vmap(tiny_nf4):
    # long left and right pads: rows whose first queries see no real key at all
    batch = fp.make_batch([[1, 2, 3, 4, 5, 6, 7, 8], [9]], [[[3], [4, 5, 6, 7, 8, 9, 10]], [[1], [2]]])
    lora = tiny_nf4.lora
    d = {k: torch.randn_like(v) for k, v in lora.items()}
    S = fp.sequence_logprobs(tiny_nf4, lora, batch)
    grads = torch.func.grad(lambda p: fp.sequence_logprobs(tiny_nf4, p, batch).sum())(lora)
    _, tangent = torch.func.jvp(lambda p: fp.sequence_logprobs(tiny_nf4, p, batch), (lora,), (d,))
    per = fp.per_sample_grads(tiny_nf4, lora, batch)
    hidden = tiny_nf4.hidden_states(lora, batch.input_ids[:, 0], batch.attention_mask[:, 0])
    for t in [S, tangent, hidden, *grads.values(), *per.values()]:
        assert torch.isfinite(t).all()


def test_dual_S_and_tangent_equal_sequence_logprobs_and_its_jvp(tiny_nf4):
    prompts, responses, _ = random_rollouts(3, 2, tiny_nf4.vocab_size, seed=3)
    batch = fp.make_batch(prompts, responses)
    lora = tiny_nf4.lora
    d = {k: torch.randn_like(v) for k, v in lora.items()}
    S, S_dot = fp.sequence_logprobs_and_tangent(tiny_nf4, lora, d, batch, temperature=0.8)
    ref, ref_dot = torch.func.jvp(
        lambda p: fp.sequence_logprobs(tiny_nf4, p, batch, temperature=0.8), (lora,), (d,)
    )
    assert rel_err(S, ref) <= 1e-5
    assert rel_err(S_dot, ref_dot) <= 1e-5


def test_token_ids_outside_the_vocabulary_raise(tiny_fp32):
    batch = fp.make_batch([[1, 2]], [[[3, tiny_fp32.vocab_size]]])
    with pytest.raises(ValueError, match=r"prompt 0, response 0.*outside the vocabulary"):
        fp.sequence_logprobs(tiny_fp32, tiny_fp32.lora, batch)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_temperature_raises(tiny_fp32, temperature):
    with pytest.raises(ValueError, match="temperature"):
        fp.sequence_logprobs(
            tiny_fp32, tiny_fp32.lora, fp.make_batch([[1]], [[[2]]]), temperature=temperature
        )
