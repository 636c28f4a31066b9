"""The streamed head against log_softmax + torch.func.jvp; row and vocabulary chunking change nothing."""

import pytest
import torch
from helpers import LargestOutput, rel_err

from functional_probe.model.head_stream import head_logprobs, head_logprobs_tangent

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}


def head_reference(h, h_dot, weight, y, temperature):
    def logp(hidden):
        return (hidden @ weight.T / temperature).log_softmax(-1).gather(-1, y[:, None])[:, 0]

    return torch.func.jvp(logp, (h,), (h_dot,))


def rows(m=37, d=16, v=211, dtype=torch.float32, seed=5):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(m, d, generator=gen, dtype=dtype)
    h_dot = torch.randn(m, d, generator=gen, dtype=dtype)
    weight = 2 * torch.randn(v, d, generator=gen, dtype=dtype)  # peaked softmaxes
    y = torch.randint(0, v, (m,), generator=gen)
    y[0], y[1] = 0, v - 1  # targets in the first and the last (partial) vocabulary chunk
    return h, h_dot, weight, y


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("chunk_size, vocab_chunk", [(1024, 4096), (8, 50), (5, 1), (37, 211)])
def test_head_tangent_equals_jvp_for_any_chunking(temperature, dtype, chunk_size, vocab_chunk):
    h, h_dot, weight, y = rows(dtype=dtype)
    ref, ref_dot = head_reference(h, h_dot, weight, y, temperature)
    logp, logp_dot = head_logprobs_tangent(
        h, h_dot, weight, y, temperature=temperature, chunk_size=chunk_size, vocab_chunk=vocab_chunk
    )
    assert logp.dtype == logp_dot.dtype == dtype
    assert rel_err(logp, ref) <= TOL[dtype] and rel_err(logp_dot, ref_dot) <= TOL[dtype]


@pytest.mark.parametrize("vocab_chunk", [4096, 50, 7])
def test_primal_head_equals_log_softmax(vocab_chunk):
    h, _, weight, y = rows(dtype=torch.float64)
    ref = (h @ weight.T / 0.7).log_softmax(-1).gather(-1, y[:, None])[:, 0]
    logp = head_logprobs(h, weight, y, temperature=0.7, chunk_size=8, vocab_chunk=vocab_chunk)
    assert rel_err(logp, ref) <= TOL[torch.float64]


def test_online_softmax_survives_logits_far_from_zero():
    # A running max that grows by ~1e3 between chunks: e^{z - m} without rescaling would overflow.
    h, h_dot, weight, y = rows(m=6, d=4, v=60, dtype=torch.float64)
    weight = weight * torch.linspace(1, 300, 60, dtype=torch.float64)[:, None]
    ref, ref_dot = head_reference(h, h_dot, weight, y, 1.0)
    logp, logp_dot = head_logprobs_tangent(h, h_dot, weight, y, vocab_chunk=7)
    assert torch.isfinite(logp).all() and torch.isfinite(logp_dot).all()
    torch.testing.assert_close(logp, ref, rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(logp_dot, ref_dot, rtol=1e-10, atol=1e-9)


def test_head_computes_in_fp32_for_bf16_rows():
    gen = torch.Generator().manual_seed(6)
    h, h_dot = torch.randn(5, 8, generator=gen), torch.randn(5, 8, generator=gen)
    weight, y = torch.randn(50, 8, generator=gen), torch.randint(0, 50, (5,), generator=gen)
    bf = [t.bfloat16() for t in (h, h_dot, weight)]
    logp, logp_dot = head_logprobs_tangent(*bf, y, vocab_chunk=16)
    ref, ref_dot = head_reference(*(t.float() for t in bf), y, 1.0)
    assert logp.dtype == logp_dot.dtype == torch.float32
    assert rel_err(logp, ref) <= 1e-6 and rel_err(logp_dot, ref_dot) <= 1e-6


def test_head_never_allocates_more_than_one_block_of_logits():
    m, d, v, chunk, vocab_chunk = 300, 8, 400, 16, 64
    h, h_dot = torch.randn(m, d), torch.randn(m, d)
    weight, y = torch.randn(v, d), torch.randint(0, v, (m,))
    with LargestOutput() as probe:
        head_logprobs_tangent(h, h_dot, weight, y, chunk_size=chunk, vocab_chunk=vocab_chunk, temperature=0.7)
    assert probe.largest <= max(chunk * vocab_chunk, v * d) < chunk * v


@pytest.mark.parametrize(
    "change, message",
    [
        (
            lambda a: {**a, "targets": a["targets"].clone().fill_(211)},
            r"targets range over \[211, 211\]; expected ids in \[0, 211\)",
        ),
        (lambda a: {**a, "targets": a["targets"][:3]}, r"targets \(3,\)"),
        (lambda a: {**a, "hidden_dot": a["hidden_dot"][:, :4]}, r"hidden_dot \(37, 4\)"),
        (lambda a: {**a, "head_weight": a["head_weight"][:, :4]}, r"head_weight \(211, 4\)"),
        (lambda a: {**a, "vocab_chunk": 0}, r"vocab_chunk=0; expected a positive int"),
        (lambda a: {**a, "chunk_size": 2.0}, r"chunk_size=2.0; expected a positive int"),
    ],
    ids=[
        "target-outside-vocab",
        "targets-length",
        "hidden_dot-shape",
        "weight-width",
        "vocab_chunk",
        "chunk_size",
    ],
)
def test_bad_inputs_raise_value_error_naming_them(change, message):
    h, h_dot, weight, y = rows()
    args = change({"hidden": h, "hidden_dot": h_dot, "head_weight": weight, "targets": y})
    with pytest.raises(ValueError, match=message):
        head_logprobs_tangent(**args)
