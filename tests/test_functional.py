"""FunctionalModel: a pure function of the LoRA dict that every torch.func transform accepts."""

import pytest
import torch
from helpers import assert_not_trivial, dict_rel_err, random_direction, rel_err, token_logliks

from functional_probe.model import tiny_model

IDS = torch.randint(0, 512, (3, 16), generator=torch.Generator().manual_seed(0))
MASK = torch.ones(3, 16, dtype=torch.bool)
MASK[2, :5] = False


@pytest.fixture(scope="module")
def nf4_f64():
    """The NF4 model computing in float64, so finite differences can check it tightly."""
    return tiny_model(seed=0, quantize="nf4", dtype=torch.float64)


def loss_of(model):
    return lambda lora: token_logliks(model(lora, IDS, MASK), IDS, MASK).sum()


def dot(a, b):
    return sum((a[k] * b[k]).sum() for k in a)


def test_transforms_agree_with_each_other_and_finite_differences(nf4_f64):
    model, lora = nf4_f64, nf4_f64.lora
    f = loss_of(model)
    v = {k: x.double() for k, x in random_direction(lora, seed=1).items()}
    g = torch.func.grad(f)(lora)
    _, pullback = torch.func.vjp(f, lora)
    g_vjp = pullback(torch.ones((), dtype=torch.float64))[0]
    _, jv = torch.func.jvp(f, (lora,), (v,))
    h = 1e-5
    fd = (f({k: lora[k] + h * v[k] for k in lora}) - f({k: lora[k] - h * v[k] for k in lora})) / (2 * h)
    assert_not_trivial(g)
    assert dict_rel_err(g_vjp, g) <= 1e-12
    assert rel_err(jv, dot(g, v)) <= 1e-10
    assert rel_err(fd, jv) <= 1e-7


def test_vmap_grad_equals_per_row_grad(nf4_f64):
    model, lora = nf4_f64, nf4_f64.lora

    def row_loss(lora, ids, mask):
        return token_logliks(model(lora, ids[None], mask[None]), ids[None], mask[None]).sum()

    per = torch.func.vmap(torch.func.grad(row_loss), in_dims=(None, 0, 0))(lora, IDS, MASK)
    for i in range(3):
        row = torch.func.grad(row_loss)(lora, IDS[i], MASK[i])
        assert dict_rel_err({k: t[i] for k, t in per.items()}, row) <= 1e-10


def test_grad_of_vjp_is_the_alpha_trick(nf4_f64):
    """∂/∂α <vjp(α), v> equals the per-row projections <∇L_i, v> (differentiating NF4 twice)."""
    model, lora = nf4_f64, nf4_f64.lora
    v = {k: x.double() for k, x in random_direction(lora, seed=2).items()}

    def rows(lora):
        return token_logliks(model(lora, IDS, MASK), IDS, MASK)

    _, pullback = torch.func.vjp(rows, lora)
    s = torch.func.grad(lambda a: dot(pullback(a)[0], v))(torch.ones(3, dtype=torch.float64))
    loop = torch.stack([dot(torch.func.grad(lambda p, i=i: rows(p)[i])(lora), v) for i in range(3)])
    assert rel_err(s, loop) <= 1e-10


def test_calls_are_pure(tiny_nf4):
    lora = tiny_nf4.lora
    before = {k: v.clone() for k, v in lora.items()}
    buffers = {k: b.clone() for k, b in tiny_nf4.named_buffers()}
    other = {k: v + 0.1 for k, v in lora.items()}
    a = tiny_nf4(lora, IDS, MASK)
    tiny_nf4(other, IDS, MASK)
    torch.func.grad(loss_of(tiny_nf4))(other)
    assert torch.equal(tiny_nf4(lora, IDS, MASK), a)
    assert all(torch.equal(lora[k], before[k]) for k in lora)
    assert all(torch.equal(tiny_nf4.lora[k], before[k]) for k in lora)
    assert all(torch.equal(b, buffers[k]) for k, b in tiny_nf4.named_buffers())
    assert not torch.equal(tiny_nf4(other, IDS, MASK), a)


def test_only_lora_factors_are_parameters(tiny_nf4):
    names = [n for n, _ in tiny_nf4.named_parameters()]
    assert names and all(n.endswith(("lora_A", "lora_B")) for n in names)
    assert len(tiny_nf4.lora) == len(names)
    assert all("lora_" not in n for n, _ in tiny_nf4.named_buffers())


def test_unexpected_key_is_named(tiny_nf4):
    lora = {"module." + k: v for k, v in tiny_nf4.lora.items()}
    with pytest.raises(ValueError, match="missing 'base_model"):
        tiny_nf4(lora, IDS)
    lora = dict(tiny_nf4.lora, extra=torch.zeros(1))
    with pytest.raises(ValueError, match="key 'extra'"):
        tiny_nf4(lora, IDS)


def test_mask_shape_mismatch_raises(tiny_nf4):
    with pytest.raises(ValueError, match="attention_mask shape"):
        tiny_nf4(tiny_nf4.lora, IDS, MASK[:, :3])


def test_default_positions_ignore_left_padding(tiny_fp32):
    """A left-padded row gives the same logits on its real tokens as the row alone."""
    ids = IDS[:1, 5:]
    alone = tiny_fp32(tiny_fp32.lora, ids)
    padded = torch.cat([torch.zeros(1, 5, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 5, dtype=torch.bool), torch.ones_like(ids, dtype=torch.bool)], 1)
    assert rel_err(tiny_fp32(tiny_fp32.lora, padded, mask)[:, 5:], alone) <= 1e-6
