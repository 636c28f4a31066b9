"""Gradients of the per-prompt probe losses: mean gradients, per-sample gradients, Gram matrices.

All are pure functions of the LoRA dict, built from `torch.func` transforms of
`prompt_losses`, which maps the dict to the vector [N] of per-prompt X or Y losses.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from einops import rearrange
from torch import Tensor
from torch.func import grad, vmap

from .batch import Batch
from .distributed import agree, all_reduce_mean, is_distributed, prompt_count
from .logprobs import check_temperature, grouped_logprobs, prepared
from .losses import WEIGHTINGS, x_loss_values, y_loss_values
from .model import FunctionalModel

LOSSES = ("x", "y")
Dict = dict[str, Tensor]


def check_loss_args(loss: str, weighting: str) -> None:
    if loss not in LOSSES:
        raise ValueError(f"loss={loss!r}; expected 'x' (entropy surrogate) or 'y' (policy gradient)")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting={weighting!r}; expected one of {WEIGHTINGS}")


def per_prompt_loss_fn(
    model: FunctionalModel, batch: Batch, *, loss: str, weighting: str, temperature: float
) -> Callable[..., Tensor]:
    """f(lora, ids, mask, pos, response, lmax, lengths, adv) -> [N] losses on [N, G, T] tensors.

    Written on plain tensors (the prompt end is read once, outside) so it can be vmapped over
    prompts as well as differentiated.
    """
    prompt_end = batch.prompt_end
    batch.require_advantages("the Y loss (loss='y')", loss)

    def losses(lora, ids, mask, pos, response, lmax, lengths, adv) -> Tensor:
        S = grouped_logprobs(
            model, lora, ids, mask, pos, response, prompt_end=prompt_end, temperature=temperature
        )
        S = S.to(torch.promote_types(S.dtype, torch.float32))
        if loss == "x":
            return x_loss_values(S, lmax, lengths, weighting)
        return y_loss_values(S, adv, lmax)

    return losses


def batch_tensors(batch: Batch) -> tuple[Tensor, ...]:
    """The tensors `per_prompt_loss_fn`'s function takes, in order."""
    return (
        batch.input_ids, batch.attention_mask, batch.position_ids, batch.response_mask,
        batch.max_lengths, batch.response_lengths, batch.advantages,
    )  # fmt: skip


def prompt_losses(
    model: FunctionalModel,
    lora: Mapping[str, Tensor],
    batch: Batch,
    *,
    loss: str = "x",
    weighting: str = "dr_grpo",
    temperature: float = 1.0,
) -> Tensor:
    """Per-prompt losses [N] (Lx or Ly of DESIGN §1), in at least fp32; pure in `lora`."""
    check_loss_args(loss, weighting)
    batch = prepared(model, batch)
    fn = per_prompt_loss_fn(
        model, batch, loss=loss, weighting=weighting, temperature=check_temperature(temperature)
    )
    return fn(lora, *batch_tensors(batch))


def microbatches(batch: Batch, microbatch: int | None) -> list[Batch]:
    return [batch] if microbatch is None else batch.split(microbatch)


def mean_grad(
    model: FunctionalModel,
    lora: Mapping[str, Tensor],
    batch: Batch | None,
    *,
    loss: str = "x",
    weighting: str = "dr_grpo",
    preconditioner: Callable[[Mapping[str, Tensor]], Dict] | None = None,
    microbatch: int | None = None,
    temperature: float = 1.0,
    distributed: bool | None = None,
) -> Dict:
    """(1/N) Σ_n ∇θ L[n] as a dict shaped like `lora` (P applied if a preconditioner is given).

    One reverse pass per microbatch of at most `microbatch` prompts; sums accumulate in at
    least fp32, so the result does not depend on the microbatch size beyond rounding.

    Under torch.distributed (`distributed=None` and a process group initialized, or True;
    see `functional_probe.distributed`) `batch` is this rank's shard (`None`: an empty one):
    each rank sums its shard, one float64 all_reduce gives Σ and N over all ranks, and every
    rank returns the same (1/N_global) Σ_global (P applied after the reduction). Every rank
    must call it; a global N of 0 raises ValueError on every rank.
    """
    model.check_lora(lora)
    kw = dict(loss=loss, weighting=weighting, microbatch=microbatch, temperature=temperature)
    if is_distributed(distributed):
        total = agree(grad_sum, model, lora, batch, **kw)
        mean = all_reduce_mean(total, prompt_count(batch))
    else:
        require_batch(batch, "mean_grad")
        total = grad_sum(model, lora, batch, **kw)
        mean = {k: v / batch.num_prompts for k, v in total.items()}
    return mean if preconditioner is None else preconditioner(mean)


def grad_sum(model, lora, batch: Batch | None, *, loss, weighting, microbatch, temperature) -> Dict:
    """Σ_n ∇θ L[n] over `batch` (zeros for None), in at least fp32, one grad per microbatch."""
    total = {
        k: torch.zeros_like(v, dtype=torch.promote_types(v.dtype, torch.float32)) for k, v in lora.items()
    }
    for mb in [] if batch is None else microbatches(batch, microbatch):
        g = grad(lambda p, mb=mb: prompt_losses(model, p, mb, loss=loss, weighting=weighting,
                                               temperature=temperature).sum())(lora)  # fmt: skip
        for k in total:
            total[k] += g[k]
    return total


def require_batch(batch: Batch | None, what: str) -> None:
    """Outside torch.distributed a batch must be given (None means an empty shard)."""
    if batch is None:
        raise ValueError(
            f"{what}: batch is None, which means an empty shard and is only "
            "accepted under an initialized torch.distributed process group"
        )


def per_sample_grads(
    model: FunctionalModel,
    lora: Mapping[str, Tensor],
    batch: Batch,
    *,
    loss: str = "x",
    weighting: str = "dr_grpo",
    chunk_size: int | None = None,
    temperature: float = 1.0,
) -> Dict:
    """∇θ L[n] for every prompt by `vmap(grad)`: a dict of [N, *shape] tensors.

    `chunk_size` prompts are vmapped at a time (None: all at once); memory grows with it.
    """
    check_loss_args(loss, weighting)
    model.check_lora(lora)
    batch = prepared(model, batch)
    fn = per_prompt_loss_fn(
        model, batch, loss=loss, weighting=weighting, temperature=check_temperature(temperature)
    )

    def one(lora, *tensors):  # one prompt: [G, T] tensors -> scalar loss
        return fn(lora, *(t[None] for t in tensors))[0]

    in_dims = (None,) + (0,) * 7
    return vmap(grad(one), in_dims=in_dims, chunk_size=chunk_size)(lora, *batch_tensors(batch))


def dot64(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> float:
    """<a, b> accumulated in float64, as a Python float (for statistics such as <μX, μY>)."""
    return float(dot({k: v.double() for k, v in a.items()}, b))


def dot(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> Tensor:
    """<a, b> = Σ_k Σ a[k]·b[k] over two dicts of equal shapes, in at least fp32."""
    return sum((a[k].to(torch.promote_types(a[k].dtype, torch.float32)) * b[k]).sum() for k in a)


def gram(per_a: Mapping[str, Tensor], per_b: Mapping[str, Tensor]) -> Tensor:
    """K[n, m] = <A_n, B_m> for per-sample gradient dicts [N, ...] and [M, ...] -> [N, M]."""
    if set(per_a) != set(per_b):
        raise ValueError(f"gram: keys differ, e.g. {sorted(set(per_a) ^ set(per_b))[0]!r}")
    return sum(torch.einsum("ni,mi->nm", flat_rows(per_a[k]), flat_rows(per_b[k])) for k in per_a)


def flat_rows(t: Tensor) -> Tensor:
    """[N, *shape] -> [N, prod(shape)] in float64."""
    return rearrange(t, "n ... -> n (...)").double()
