"""Gradients of the per-prompt probe losses: mean gradients, per-sample gradients, Gram matrices.

All are pure functions of the LoRA dict, built from `torch.func` transforms of
`prompt_losses`, which maps the dict to the vector [N] of per-prompt X or Y losses. They are
first-order reverse passes, so they run with `reverse_kernels` (SDPA attention, a head that
recomputes its logits in backward, per-layer checkpointing on long batches): memory grows
like layers × tokens × hidden, not tokens² or tokens × vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import replace

import torch
from einops import rearrange
from torch import Tensor
from torch.func import grad, vmap

from .batch import Batch
from .distributed import agree, all_reduce_mean, is_distributed, prompt_count, sharded
from .logprobs import check_temperature, grouped_logprobs, prepared
from .losses import WEIGHTINGS, x_loss_values, y_loss_values
from .model import FunctionalModel
from .model.kernels import PLAIN, Kernels, first_order_kernels
from .x_estimators import check_rb_split, check_x_estimator, grouped_token_terms, rb_loss_values

LOSSES = ("x", "y")
Dict = dict[str, Tensor]


def check_loss_args(loss: str, weighting: str, x_estimator: str = "loo") -> None:
    if loss not in LOSSES:
        raise ValueError(f"loss={loss!r}; expected 'x' (entropy surrogate) or 'y' (policy gradient)")
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting={weighting!r}; expected one of {WEIGHTINGS}")
    check_x_estimator(x_estimator, weighting if loss == "x" else "dr_grpo")


def reverse_kernels(batch: Batch, prompts: int | None = None) -> Kernels:
    """`first_order_kernels` for passes over `prompts` (default: all) of `batch`'s prompts at once."""
    mask = batch.attention_mask
    left_padded = bool((mask[..., 1:] & ~mask[..., :-1]).any())  # a real token after a pad
    rows = (batch.num_prompts if prompts is None else prompts) * batch.group_size
    return first_order_kernels(rows, batch.seq_len, left_padded=left_padded)


def per_prompt_loss_fn(
    model: FunctionalModel, batch: Batch, *, loss: str, weighting: str, temperature: float,
    kernels: Kernels = PLAIN, x_estimator: str = "loo",
) -> Callable[..., Tensor]:  # fmt: skip
    """f(lora, ids, mask, pos, response, lmax, lengths, adv) -> [N] losses on [N, G, T] tensors.

    Written on plain tensors (the prompt end is read once, outside) so it can be vmapped over
    prompts as well as differentiated. X with `x_estimator="rb"`: `x_estimators.rb_loss_values`.
    """
    prompt_end = batch.prompt_end
    batch.require_advantages("the Y loss (loss='y')", loss)

    def losses(lora, ids, mask, pos, response, lmax, lengths, adv) -> Tensor:
        if loss == "x" and x_estimator == "rb":
            terms = grouped_token_terms(model, lora, ids, mask, pos, response, prompt_end=prompt_end,
                                        temperature=temperature, kernels=kernels)  # fmt: skip
            return rb_loss_values(*terms, lmax)
        S = grouped_logprobs(
            model, lora, ids, mask, pos, response, prompt_end=prompt_end, temperature=temperature,
            kernels=kernels,
        )  # fmt: skip
        return loss_values(S.to(torch.promote_types(S.dtype, torch.float32)), lmax, lengths, adv,
                           loss=loss, weighting=weighting)  # fmt: skip

    return losses


def loss_values(S: Tensor, lmax: Tensor, lengths: Tensor, adv: Tensor, *, loss: str, weighting: str) -> Tensor:
    """Per-prompt X or Y losses [N] from S [N, G] (≥ fp32) and the batch's tensors."""
    if loss == "x":
        return x_loss_values(S, lmax, lengths, weighting)
    return y_loss_values(S, adv, lmax)


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
    kernels: Kernels = PLAIN,
    x_estimator: str = "loo",
) -> Tensor:
    """Per-prompt losses [N] (Lx or Ly of DESIGN §1), in at least fp32; pure in `lora`.

    `kernels`: PLAIN composes with every transform; `reverse_kernels(batch)` is for one
    first-order reverse pass (grad, vjp + one pullback, vmap(grad)) or no-grad."""
    check_loss_args(loss, weighting, x_estimator)
    batch = prepared(model, batch)
    fn = per_prompt_loss_fn(
        model, batch, loss=loss, weighting=weighting, temperature=check_temperature(temperature),
        kernels=kernels, x_estimator=x_estimator,
    )  # fmt: skip
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
    response_microbatch: int | None = None,
    temperature: float = 1.0,
    distributed: bool | None = None,
    x_estimator: str = "loo",
) -> Dict:
    """(1/N) Σ_n ∇θ L[n] as a dict shaped like `lora` (P applied if a preconditioner is given).

    One reverse pass per microbatch of at most `microbatch` prompts, each split further into
    passes of at most `response_microbatch` of a prompt's G responses (None: all G at once).
    The X loss's leave-one-out coefficients are under stop-gradient and the Y loss is linear
    in S, so with split responses a no-grad pass first computes S (hence the coefficients
    c = ∂ΣL/∂S), then ∇ Σ c·S accumulates over response chunks. Sums accumulate in at least
    fp32, so the result does not depend on either split beyond rounding.

    `distributed=True` (see `functional_probe.distributed`; None under a process group of
    several ranks raises, asking for True or False): `batch` is this rank's shard (`None`: an
    empty one); the ranks meet first (ValueError naming a rank that does not call in time),
    each sums its shard, one float64 all_reduce gives Σ and N over all ranks, and every rank
    returns the same (1/N_global) Σ_global (P applied after the reduction). A global N of 0
    raises ValueError on every rank. `distributed=False`: this process's batch alone.
    `x_estimator`: "loo" | "rb" (X only, `functional_probe.x_estimators`; no response_microbatch).
    """
    model.check_lora(lora)
    check_microbatch(response_microbatch, "response_microbatch")
    check_loss_args(loss, weighting, x_estimator)
    check_rb_split(loss, x_estimator, response_microbatch)
    kw = dict(loss=loss, weighting=weighting, microbatch=microbatch, temperature=temperature,
              response_microbatch=response_microbatch, x_estimator=x_estimator)  # fmt: skip
    if is_distributed(distributed, "mean_grad"):
        with sharded("mean_grad"):
            total = agree(grad_sum, model, lora, batch, **kw)
            mean = all_reduce_mean(total, prompt_count(batch))
    else:
        require_batch(batch, "mean_grad")
        total = grad_sum(model, lora, batch, **kw)
        mean = {k: v / batch.num_prompts for k, v in total.items()}
    return mean if preconditioner is None else preconditioner(mean)


def grad_sum(model, lora, batch: Batch | None, *, loss, weighting, microbatch, temperature,
             response_microbatch=None, x_estimator="loo") -> Dict:  # fmt: skip
    """Σ_n ∇θ L[n] over `batch` (zeros for None), in at least fp32, one grad per microbatch
    (of prompts, and of responses when `response_microbatch` < G)."""
    total = zero_sums(lora)
    kw = dict(loss=loss, weighting=weighting, temperature=temperature, x_estimator=x_estimator)
    for mb in [] if batch is None else microbatches(batch, microbatch):
        if response_microbatch is None or response_microbatch >= mb.group_size:
            kernels = reverse_kernels(mb)
            loss_sum = lambda p, mb=mb, k=kernels: prompt_losses(model, p, mb, kernels=k, **kw).sum()  # noqa: E731
            parts = [grad(loss_sum)(lora)]
        else:
            parts = response_split_grads(model, lora, mb, size=response_microbatch, **kw)
        for g in parts:
            for k in total:
                total[k] += g[k]
    return total


def response_split_grads(model, lora, batch: Batch, *, size: int, loss, weighting, temperature, **_) -> list[Dict]:
    """∇θ Σ_n L[n] in pieces, one per chunk of at most `size` responses of every prompt.

    Σ_n L[n] = Σ_{n,g} c[n,g]·S[n,g] with c = ∂ΣL/∂S constant in θ (X: −stopgrad(w − b)/G;
    Y: A/(Lmax·G)); c comes from a no-grad S, then each chunk contributes ∇ Σ_chunk c·S.
    """
    batch = prepared(model, batch)
    parts = response_chunks(batch, size)

    def S_of(p: Mapping[str, Tensor], part: Batch) -> Tensor:  # [N, ≤size]
        return grouped_logprobs(
            model, p, part.input_ids, part.attention_mask, part.position_ids, part.response_mask,
            prompt_end=part.prompt_end, temperature=temperature, kernels=reverse_kernels(part),
        )  # fmt: skip

    with torch.no_grad():
        S = torch.cat([S_of(lora, part) for part in parts], dim=1)
    S = S.to(torch.promote_types(S.dtype, torch.float32))
    _, lmax, lengths, adv = batch_tensors(batch)[3:]
    coef = grad(lambda S: loss_values(S, lmax, lengths, adv, loss=loss, weighting=weighting).sum())(S)
    return [
        grad(lambda p, part=part, c=c: (c * S_of(p, part)).sum())(lora)
        for part, c in zip(parts, coef.split(size, dim=1), strict=True)
    ]


def response_chunks(batch: Batch, size: int) -> list[Batch]:
    """The batch as consecutive chunks of at most `size` responses of every prompt ([N, ≤size, T'])
    with all-pad trailing columns dropped; prompts, prompt_end and positions unchanged."""
    chunks = []
    for start in range(0, batch.group_size, size):
        g = slice(start, start + size)
        mask = batch.attention_mask[:, g]
        end = int(mask.any(0).any(0).nonzero().max()) + 1
        cols = slice(0, end)
        chunks.append(replace(
            batch, input_ids=batch.input_ids[:, g, cols], attention_mask=mask[..., cols],
            response_mask=batch.response_mask[:, g, cols], position_ids=batch.position_ids[:, g, cols],
            response_lengths=batch.response_lengths[:, g], advantages=batch.advantages[:, g],
        ))  # fmt: skip
    return chunks


def check_microbatch(size: int | None, what: str) -> None:
    """None or a positive int, else ValueError naming `what`."""
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size <= 0):
        raise ValueError(f"{what}={size!r}; expected a positive int or None")


def zero_sums(lora: Mapping[str, Tensor]) -> Dict:
    """Zeros shaped like `lora` in at least fp32: the accumulator of gradient sums."""
    return {k: torch.zeros_like(v, dtype=torch.promote_types(v.dtype, torch.float32)) for k, v in lora.items()}


def require_batch(batch: Batch | None, what: str) -> None:
    """Outside torch.distributed a batch must be given (None means an empty shard)."""
    if batch is None:
        raise ValueError(
            f"{what}: batch is None, which means an empty shard and is only "
            "accepted with distributed=True under an initialized torch.distributed process group"
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
    x_estimator: str = "loo",
) -> Dict:
    """∇θ L[n] for every prompt by `vmap(grad)`: a dict of [N, *shape] tensors.

    `chunk_size` prompts are vmapped at a time (None: all at once); memory grows with it.
    SDPA has no vmap batching rule on CPU (torch 2.13): vmap runs its kernel once per prompt
    (a PyTorch performance warning says so), exact and memory-bounded.
    """
    check_loss_args(loss, weighting, x_estimator)
    model.check_lora(lora)
    batch = prepared(model, batch)
    fn = per_prompt_loss_fn(
        model, batch, loss=loss, weighting=weighting, temperature=check_temperature(temperature),
        kernels=reverse_kernels(batch, prompts=chunk_size), x_estimator=x_estimator,
    )  # fmt: skip

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
