"""nf4_matmul.py: the NF4 product under grad, vjp, jvp, vmap(grad), vjp-of-vjp and jvp-of-grad,
against a dense twin on the dequantized weight (and central finite differences), and what its
backward saves (the packed bytes, never W). Run through NF4Linear, the module that calls it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_nf4 import rel_err
from torch import nn
from torch.func import functional_call, grad, jvp, vjp, vmap

from functional_probe.nf4 import NF4Linear

# --- 1. torch.func transforms on x and on a LoRA dict -------------------------------------


class Dense(nn.Module):
    """The twin: F.linear on NF4Linear's dequantized weight, all buffers."""

    def __init__(self, nf4: NF4Linear):
        super().__init__()
        self.register_buffer("weight", nf4.dequantized_weight())
        self.register_buffer("bias", nf4.bias)

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class LoRA(nn.Module):
    """base(x) + s · x Aᵀ Bᵀ with A [r, in], B [out, r]."""

    def __init__(self, base, in_f, out_f, r, g, dtype):
        super().__init__()
        self.base = base
        self.A = nn.Parameter(0.3 * torch.randn(r, in_f, generator=g, dtype=dtype))
        self.B = nn.Parameter(0.3 * torch.randn(out_f, r, generator=g, dtype=dtype))

    def forward(self, x):
        return self.base(x) + 0.5 * (x @ self.A.T) @ self.B.T


class TwoLayer(nn.Module):
    def __init__(self, l1, l2):
        super().__init__()
        self.l1, self.l2 = l1, l2

    def forward(self, x):  # x [..., 80] -> [..., 24]
        return self.l2(torch.tanh(self.l1(x)))


def build_pair(dtype):
    """NF4 model and its dense twin with identical LoRA params; in_features 80 (not k·64)."""
    g = torch.Generator().manual_seed(2)
    w1, b1 = torch.randn(40, 80, generator=g) / 9, torch.randn(40, generator=g)
    w2 = torch.randn(24, 40, generator=g) / 6
    n1 = NF4Linear.from_weight(w1, b1, compute_dtype=dtype)
    n2 = NF4Linear.from_weight(w2, compute_dtype=dtype)
    gl = torch.Generator().manual_seed(3)
    nf4 = TwoLayer(LoRA(n1, 80, 40, 4, gl, dtype), LoRA(n2, 40, 24, 4, gl, dtype))
    gl = torch.Generator().manual_seed(3)
    dense = TwoLayer(LoRA(Dense(n1), 80, 40, 4, gl, dtype), LoRA(Dense(n2), 40, 24, 4, gl, dtype))
    params = {k: v.detach() for k, v in nf4.named_parameters()}
    x = torch.randn(5, 80, generator=g, dtype=dtype)
    return nf4, dense, params, x


def per_sample_losses(model, params, x):
    """Input-dependent per-sample scalar: logsumexp of the outputs, [N]."""
    return torch.logsumexp(functional_call(model, params, (x,)), dim=-1)


def total_loss(model):
    return lambda params, x: per_sample_losses(model, params, x).sum()


def rand_like_dict(d, seed):
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g, dtype=v.dtype) for k, v in d.items()}


TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
DTYPES = [torch.float32, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES)
def test_grad_over_x_and_lora_matches_dense_twin(dtype):
    nf4, dense, params, x = build_pair(dtype)
    gp, gx = grad(total_loss(nf4), argnums=(0, 1))(params, x)
    rp, rx = grad(total_loss(dense), argnums=(0, 1))(params, x)
    assert rel_err(gp, rp) < TOL[dtype] and rel_err(gx, rx) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_vjp_matches_dense_twin(dtype):
    nf4, dense, params, x = build_pair(dtype)
    u = torch.randn(5, dtype=dtype, generator=torch.Generator().manual_seed(4))
    out, f = vjp(lambda p, x: per_sample_losses(nf4, p, x), params, x)
    rout, rf = vjp(lambda p, x: per_sample_losses(dense, p, x), params, x)
    (gp, gx), (rp, rx) = f(u), rf(u)
    assert rel_err(out, rout) < TOL[dtype]
    assert rel_err(gp, rp) < TOL[dtype] and rel_err(gx, rx) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_jvp_matches_dense_twin(dtype):
    nf4, dense, params, x = build_pair(dtype)
    tp, tx = rand_like_dict(params, 5), torch.randn_like(x)
    _, t = jvp(lambda p, x: per_sample_losses(nf4, p, x), (params, x), (tp, tx))
    _, rt = jvp(lambda p, x: per_sample_losses(dense, p, x), (params, x), (tp, tx))
    assert rel_err(t, rt) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_vmap_grad_per_sample_matches_dense_twin_and_loop(dtype):
    nf4, dense, params, x = build_pair(dtype)

    def one(model):
        return lambda p, xi: per_sample_losses(model, p, xi[None]).squeeze(0)

    per = vmap(grad(one(nf4), argnums=(0, 1)), in_dims=(None, 0))(params, x)
    ref = vmap(grad(one(dense), argnums=(0, 1)), in_dims=(None, 0))(params, x)
    assert rel_err(per[0], ref[0]) < TOL[dtype] and rel_err(per[1], ref[1]) < TOL[dtype]
    for n in range(x.shape[0]):  # the slow loop, autograd-free reference per sample
        gp, gx = grad(one(nf4), argnums=(0, 1))(params, x[n])
        assert rel_err({k: v[n] for k, v in per[0].items()}, gp) < TOL[dtype]
        assert rel_err(per[1][n], gx) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
def test_grad_of_vjp_alpha_trick_matches_twin_and_per_sample_projection(dtype):
    """s = ∂/∂α <∇θ Σ α_n L_n, μ> (double reverse) equals per-sample <∇θ L_n, μ>."""
    nf4, dense, params, x = build_pair(dtype)
    mu = rand_like_dict(params, 6)

    def s_alpha(model):
        def h(alpha):
            _, f = vjp(lambda p: per_sample_losses(model, p, x), params)
            (g,) = f(alpha)
            return sum((g[k] * mu[k]).sum() for k in g)

        return grad(h)(torch.ones(x.shape[0], dtype=dtype))

    s, s_ref = s_alpha(nf4), s_alpha(dense)
    per = vmap(
        grad(lambda p, xi: per_sample_losses(nf4, p, xi[None]).squeeze(0)), in_dims=(None, 0)
    )(params, x)
    s_per = sum((per[k] * mu[k]).flatten(1).sum(1) for k in per)
    assert rel_err(s, s_ref) < TOL[dtype] and rel_err(s, s_per) < TOL[dtype]

    # Second order in x too: grad_x <vjp_x(u), v> through the transposed product.
    u, v = torch.randn(5, dtype=dtype), torch.randn_like(x)

    def hx(model):
        def h(x):
            _, f = vjp(lambda x: per_sample_losses(model, params, x), x)
            return (f(u)[0] * v).sum()

        return grad(h)(x)

    assert rel_err(hx(nf4), hx(dense)) < TOL[dtype]


def test_grad_and_jvp_match_central_finite_differences_float64():
    nf4, _, params, x = build_pair(torch.float64)
    dp, dx = rand_like_dict(params, 7), torch.randn_like(x)
    f = total_loss(nf4)
    eps = 1e-6
    with torch.no_grad():
        plus = f({k: params[k] + eps * dp[k] for k in params}, x + eps * dx)
        minus = f({k: params[k] - eps * dp[k] for k in params}, x - eps * dx)
    fd = (plus - minus) / (2 * eps)
    gp, gx = grad(f, argnums=(0, 1))(params, x)
    directional = sum((gp[k] * dp[k]).sum() for k in gp) + (gx * dx).sum()
    _, t = jvp(f, (params, x), (dp, dx))
    assert rel_err(directional, fd) < 1e-7
    assert rel_err(t, fd) < 1e-7


@pytest.mark.parametrize("dtype", DTYPES)
def test_forward_over_reverse_hvp_matches_dense_twin(dtype):
    """jvp of grad (Hessian-vector product) runs the transposed product's jvp."""
    nf4, dense, params, x = build_pair(dtype)
    tp, tx = rand_like_dict(params, 13), torch.randn_like(x)

    def hvp(model):
        return jvp(grad(total_loss(model), argnums=(0, 1)), (params, x), (tp, tx))[1]

    (hp, hx), (rp, rx) = hvp(nf4), hvp(dense)
    assert rel_err(hp, rp) < TOL[dtype] and rel_err(hx, rx) < TOL[dtype]


# --- 2. what backward keeps -------------------------------------------------------------


def test_backward_saves_packed_bytes_not_dequantized_weight():
    g = torch.Generator().manual_seed(8)
    m = NF4Linear.from_weight(torch.randn(64, 128, generator=g), torch.randn(64, generator=g))
    x = torch.randn(4, 128, generator=g, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        m(x).square().sum().backward()
    assert max(t.numel() for t in saved) < m.out_features * m.in_features
    assert any(t.data_ptr() == m.weight_packed.data_ptr() and t.dtype == torch.uint8 for t in saved)
    ref = 2 * F.linear(x, m.dequantized_weight(), m.bias) @ m.dequantized_weight()
    assert rel_err(x.grad, ref) < 1e-6
