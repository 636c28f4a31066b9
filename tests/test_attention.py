"""SDPA attention against the plain-ops attention, incl. fully masked (left-pad) query rows."""

import pytest
import torch

from functional_probe.model.attention import attention_allowed, plain_attention, sdpa_attention, sdpa_bias

B, H, K, T, d = 3, 4, 2, 20, 8


@pytest.fixture(scope="module")
def qkv_mask():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, n, T, d, generator=gen) for n in (H, K, K))
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, :6] = False  # left pad: queries 0..5 see no key at all
    mask[2, 15:] = False  # right pad
    return q, k, v, mask


def real(x, mask):
    """x [B, H, T, d] at real query positions only -> [n_real, H, d]."""
    return x.transpose(1, 2)[mask]


def test_sdpa_equals_plain_on_real_tokens_with_left_and_right_padding(qkv_mask):
    q, k, v, mask = qkv_mask
    got = sdpa_attention(q, k, v, sdpa_bias(mask, q.dtype))
    want = plain_attention(q, k, v, attention_allowed(mask))
    assert torch.isfinite(got).all()
    torch.testing.assert_close(real(got, mask), real(want, mask), rtol=1e-5, atol=1e-6)


def test_sdpa_gradients_equal_plain_under_grad_and_vmap(qkv_mask):
    q, k, v, mask = qkv_mask
    w = torch.randn(B, H, T, d, generator=torch.Generator().manual_seed(1)) * mask[:, None, :, None]

    def loss(attn, m):
        return lambda q, k, v, w, m=m: (w * attn(q, k, v, m)).sum()

    sdpa, plain = loss(sdpa_attention, sdpa_bias(mask, q.dtype)), loss(plain_attention, attention_allowed(mask))
    got = torch.func.grad(sdpa, argnums=(0, 1, 2))(q, k, v, w)
    want = torch.func.grad(plain, argnums=(0, 1, 2))(q, k, v, w)
    assert all(torch.isfinite(g).all() for g in got) and min(g.norm() for g in want) > 1e-2
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    per = lambda f, m: torch.func.vmap(  # noqa: E731  one row per vmapped call
        torch.func.grad(lambda q, k, v, w, m: f(q[None], k[None], v[None], w[None], m[None]), argnums=(0, 1, 2))
    )(q, k, v, w, m)
    torch.testing.assert_close(per(sdpa, sdpa_bias(mask, q.dtype)), per(plain, attention_allowed(mask)),
                               rtol=1e-5, atol=1e-6)  # fmt: skip


def test_causal_only_equals_the_key_mask_when_padding_is_on_the_right(qkv_mask):
    q, k, v, mask = qkv_mask
    right = mask.clone()
    right[1] = True  # rows 0 and 2: no pad before a real token
    got = sdpa_attention(q, k, v, None)
    torch.testing.assert_close(real(got, right), real(plain_attention(q, k, v, attention_allowed(right)), right),
                               rtol=1e-5, atol=1e-6)  # fmt: skip
