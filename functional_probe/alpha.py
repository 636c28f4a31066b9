"""Projections s_n = <∇θ L[n], v> for every prompt at once, and their variance (the α-trick).

Four methods, all pure in the LoRA dict and equal to 1e-5 in fp32 (DESIGN §1):
- "vjp": L(α) = Σ α_n L[n]; g(α) = ∇θ L (a vjp); s = ∂/∂α <g(α), v> — two reverse passes.
- "jvp": forward mode, s = J v with J = ∂L/∂θ, via the dual forward (primal and tangent
  carried together through our own decoder); "func_jvp" is the same through `torch.func.jvp`,
  the reference the dual must equal and the one that composes with other transforms.
- "vmap": per-sample gradients by `vmap(grad)`, contracted with v.
- "loop": one `torch.func.grad` per prompt — the slow reference.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import grad, jvp, vjp

from .batch import Batch
from .distributed import (
    agree,
    all_gather_vector,
    all_moments,
    global_counts,
    is_distributed,
    prompt_count,
    rank_and_world,
    sharded,
)  # fmt: skip
from .grads import (
    check_loss_args,
    check_microbatch,
    dot,
    grad_sum,
    microbatches,
    per_sample_grads,
    prompt_losses,
    require_batch,
)  # fmt: skip
from .logprobs import check_temperature, sequence_logprobs_and_tangent
from .losses import x_losses, y_losses
from .model import FunctionalModel
from .model.functional import check_same_keys_and_shapes
from .model.kernels import transform_active
from .stats import Moments, moments
from .validation import check_step_size
from .x_estimators import check_rb_split

METHODS = ("vjp", "jvp", "func_jvp", "vmap", "loop")


def check_direction(lora: Mapping[str, Tensor], direction: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The direction cast to the LoRA dict's (dtype, device) per key; it may have any float dtype
    and device. It must have exactly the LoRA dict's keys and shapes: ValueError names the first
    mismatch, or the first non-floating tensor."""
    shapes = {k: v.shape for k, v in lora.items()}
    check_same_keys_and_shapes(shapes, direction, what="direction", owner="the LoRA dict")
    bad = next((k for k, v in direction.items() if not v.is_floating_point()), None)
    if bad is not None:
        raise ValueError(f"direction[{bad!r}] has dtype {direction[bad].dtype}; expected a float dtype")
    return {k: direction[k].to(device=v.device, dtype=v.dtype) for k, v in lora.items()}


def check_response_microbatch(method: str, size: int | None) -> None:
    """ValueError for an unknown method, a bad size, or a size with "vjp"/"vmap" (no split there)."""
    if method not in METHODS:
        raise ValueError(f"method={method!r}; expected one of {METHODS}")
    check_microbatch(size, "response_microbatch")
    if size is not None and method in ("vjp", "vmap"):
        raise ValueError(f"response_microbatch={size} is not supported by method={method!r}; use 'loop' or 'jvp'")


def alpha_projections(
    model: FunctionalModel,
    lora: Mapping[str, Tensor],
    batch: Batch,
    direction: Mapping[str, Tensor],
    *,
    loss: str = "x",
    weighting: str = "dr_grpo",
    method: str = "vjp",
    microbatch: int | None = None,
    response_microbatch: int | None = None,
    temperature: float = 1.0,
    x_estimator: str = "loo",
) -> Tensor:
    """s [N] with s_n = <∇θ L[n], direction>, L the per-prompt X or Y loss (weighting: X only).

    Float dtype of the losses (≥ fp32). `direction` may have any float dtype and device: it is
    cast to the LoRA dict's (dtype, device) per key. `microbatch` bounds the prompts per pass
    (for "vmap", the vmap chunk size). `response_microbatch` splits each prompt's G responses
    over reverse passes of at most that many (as in `mean_grad`) for method="loop"; the forward
    modes "jvp" and "func_jvp" keep no activations for a backward and ignore it.
    `x_estimator` ("loo" | "rb"): the X loss; the dual forward carries no entropy tangent, so
    "jvp" with "rb" runs as "func_jvp" (same s); "rb" takes no response_microbatch.
    """
    check_response_microbatch(method, response_microbatch)
    check_loss_args(loss, weighting, x_estimator)
    check_rb_split(loss, x_estimator, response_microbatch)
    model.check_lora(lora)
    direction = check_direction(lora, direction)
    temperature = check_temperature(temperature)
    kw = dict(loss=loss, weighting=weighting, temperature=temperature, x_estimator=x_estimator)
    if method == "vmap":
        per = per_sample_grads(model, lora, batch, chunk_size=microbatch, **kw)
        return sum(torch.einsum("n...,...->n", per[k], direction[k].to(per[k].dtype)) for k in per)
    if method == "loop":
        return torch.stack(
            [projection_one(model, lora, batch[n], direction, response_microbatch, **kw) for n in range(len(batch))]
        )
    project = {"vjp": projections_vjp, "func_jvp": projections_func_jvp, "jvp": projections_dual}[method]
    return torch.cat([project(model, lora, mb, direction, **kw) for mb in microbatches(batch, microbatch)])


def projections_vjp(model, lora, batch, direction, **kw) -> Tensor:
    """The α-trick: s = ∂/∂α <vjp(α), v>, two reverse passes."""
    losses, pullback = vjp(lambda p: prompt_losses(model, p, batch, **kw), lora)
    return grad(lambda alpha: dot(pullback(alpha)[0], direction))(torch.ones_like(losses))


def projections_func_jvp(model, lora, batch, direction, **kw) -> Tensor:
    """s = J v in one `torch.func.jvp` over the pure forward."""
    return jvp(lambda p: prompt_losses(model, p, batch, **kw), (dict(lora),), (dict(direction),))[1]


def projection_one(model, lora, batch, direction, response_microbatch, **kw) -> Tensor:
    """<∇θ L[0], v> for a one-prompt batch: the reference, first-order reverse passes (one per
    chunk of `response_microbatch` responses; None: one)."""
    return dot(grad_sum(model, lora, batch, microbatch=None, response_microbatch=response_microbatch, **kw), direction)


class DualProjections(torch.autograd.Function):
    """s from the dual forward (no graph) in forward; in backward the vjp of the composable path
    (`projections_func_jvp`), so reverse mode through method="jvp" differentiates the same s.
    Autograd records it only when an input is tracked; under torch.func it is not used."""

    @staticmethod
    def forward(ctx, fast, composable, keys, *values):
        ctx.composable, ctx.keys = composable, keys
        ctx.save_for_backward(*values)
        return fast()

    @staticmethod
    def backward(ctx, grad_s):
        keys, n = ctx.keys, len(ctx.keys)
        _, pullback = vjp(
            lambda *v: ctx.composable(dict(zip(keys, v[:n], strict=True)), dict(zip(keys, v[n:], strict=True))),
            *ctx.saved_tensors,
        )
        return (None, None, None, *pullback(grad_s))


def projections_dual(model, lora, batch, direction, *, loss, weighting, temperature, x_estimator="loo") -> Tensor:
    """s = J v from the dual forward: (S, Ṡ) in one pass, then the loss's jvp in S
    (its leave-one-out coefficient is under stop-gradient, so it stays frozen). Under a torch.func
    transform or forward AD the dual (no graph, unbatched) cannot serve, so `projections_func_jvp`
    runs instead: the same s, composable; so it does for the "rb" X loss, whose per-token
    entropies the dual does not carry. Reverse mode (autograd) goes through `DualProjections`."""
    kw = dict(loss=loss, weighting=weighting, temperature=temperature, x_estimator=x_estimator)
    if transform_active(lora, direction) or (loss == "x" and x_estimator == "rb"):
        return projections_func_jvp(model, lora, batch, direction, **kw)

    def fast() -> Tensor:
        S, S_dot = sequence_logprobs_and_tangent(model, lora, direction, batch, temperature=temperature)
        losses = x_losses if loss == "x" else y_losses
        kwargs = {"weighting": weighting} if loss == "x" else {}
        return jvp(lambda S: losses(S, batch, **kwargs), (S,), (S_dot,))[1]

    composable = lambda lo, d: projections_func_jvp(model, lo, batch, d, **kw)  # noqa: E731
    keys = list(lora)
    return DualProjections.apply(fast, composable, keys, *lora.values(), *(direction[k] for k in keys))


@dataclass(frozen=True)
class AlphaVariance:
    """First-order change along a direction and how sure it is, from per-prompt projections.

    Per unit step: `s` [N] (s_n = <∇θ L[n], v>), `mean` = s̄ = <μ, v>, `sample_var` =
    Σ(s_n − s̄)²/(n − 1) (float64, two-pass). Scaled by the step size η: `delta` = η·s̄,
    `var` = η²·sample_var/n, `se` = η·sqrt(sample_var/n) — report `delta ± se`. `ranks`: the
    processes whose shards made up the batch (1 unless distributed=True).
    """

    s: Tensor
    n: int
    mean: float
    sample_var: float
    eta: float
    delta: float
    var: float
    se: float
    ranks: int = 1


def alpha_variance(
    lora: Mapping[str, Tensor],
    batch: Batch | None,
    *,
    model: FunctionalModel,
    direction: Mapping[str, Tensor],
    eta: float = 1.0,
    method: str = "jvp",
    weighting: str = "dr_grpo",
    microbatch: int | None = None,
    response_microbatch: int | None = None,
    temperature: float = 1.0,
    distributed: bool | None = None,
    x_estimator: str = "loo",
) -> AlphaVariance:
    """Projections of the X-loss gradients on `direction` and their statistics (see AlphaVariance).

    The research-script call is `alpha_variance(lora, batch)` with `model` and `direction`
    bound by `functools.partial`. Fewer than 2 prompts raise ValueError.

    With `distributed=True` (under a process group; None there raises, asking for True or
    False; every rank must call, see `functional_probe.distributed`) `batch` is this rank's shard (`None`: empty) and `direction` must be the same on every
    rank: each rank projects its shard, the float64 moments are all_gathered and combined
    with Chan's formula in rank order, so `n`, `mean`, `sample_var`, `delta`, `var`, `se` are
    the global ones, bit-identical on every rank; `s` holds ALL N_global projections in rank
    order (= the single-process order of the unsharded batch), on every rank. The 2-prompt
    rule applies to the global N (every rank raises).
    """
    eta = check_step_size(eta, "alpha_variance: eta")
    kw = dict(model=model, direction=direction, method=method, weighting=weighting,
              microbatch=microbatch, response_microbatch=response_microbatch, temperature=temperature,
              x_estimator=x_estimator)  # fmt: skip
    check_response_microbatch(method, response_microbatch)
    if is_distributed(distributed, "alpha_variance"):
        with sharded("alpha_variance") as world:
            return sharded_alpha_variance(lora, batch, eta=eta, ranks=world, **kw)
    require_batch(batch, "alpha_variance")
    if batch.num_prompts < 2:
        raise ValueError(f"alpha_variance needs at least 2 prompts for a variance, got {batch.num_prompts}")
    s = alpha_projections(lora=lora, batch=batch, loss="x", **kw)
    return variance_result(s, moments(s), eta)


def shard_projections(model, lora, batch: Batch | None, direction, **kw) -> Tensor:
    """`alpha_projections` of a shard; an empty float64 vector for an empty shard (None)."""
    if batch is None:
        return torch.empty(0, dtype=torch.float64)
    return alpha_projections(model, lora, batch, direction, **kw)


def sharded_alpha_variance(lora, batch: Batch | None, *, eta: float, ranks: int, **kw) -> AlphaVariance:
    """The distributed path of `alpha_variance`: global count check, local s, Chan-combined
    moments, all s gathered (see `functional_probe.distributed`)."""
    (n,) = global_counts(prompt_count(batch))
    if n < 2:
        raise ValueError(
            f"alpha_variance needs at least 2 prompts for a variance, got {n} "
            f"across {rank_and_world()[1]} ranks"
        )
    s = agree(shard_projections, lora=lora, batch=batch, loss="x", **kw)
    (m,) = all_moments([agree(moments, s)])  # a non-finite s raises on every rank
    dtype = torch.promote_types(next(iter(lora.values())).dtype, torch.float32)
    s_all = all_gather_vector(s).to(device=kw["model"].device, dtype=dtype)
    return variance_result(s_all, m, eta, ranks)


def variance_result(s: Tensor, m: Moments, eta: float, ranks: int = 1) -> AlphaVariance:
    """AlphaVariance from the projections and their (global) moments."""
    var = m.var_of_mean_x()
    return AlphaVariance(
        s=s, n=m.n, mean=m.mean_x, sample_var=m.sample_var_x(), eta=float(eta),
        delta=eta * m.mean_x, var=eta**2 * var, se=abs(eta) * var**0.5, ranks=ranks,
    )  # fmt: skip
