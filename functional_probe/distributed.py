"""torch.distributed: each rank holds a SHARD of E and U; every rank gets the global result.

How the mode is chosen (:func:`is_distributed`, always by the caller): with
``distributed=True``, :func:`functional_probe.mean_grad`, :func:`functional_probe.alpha_variance`
and :func:`functional_probe.probe` read their batch as this rank's shard (``None`` = an empty
shard) and return the statistics of the union of all shards, identical on every rank; every
rank must call them. ``distributed=False`` is one process on its local batch, even under a
process group (e.g. rank 0 alone). The default ``None`` is ``False`` without a group and a
ValueError under a group of several ranks (asking for one of the two). The sharded path
first meets the other ranks on the group's store (:mod:`functional_probe.rendezvous`): a rank
that does not call within the timeout (10 s, ``$FUNCTIONAL_PROBE_RENDEZVOUS_TIMEOUT``) gives a
ValueError naming it on every rank that did, not a hang. Results say ``ranks`` (how many took
part). What each rank does:

1. **Counts.** ``all_reduce(SUM)`` of the local prompt counts gives the global ``B``; the
   ``B ≥ 2`` rule is checked on ``B``, so every rank raises the same ValueError (no hang).
2. **Mean gradients.** Local ``Σ_{n ∈ shard} ∇θ L[n]`` (at least fp32), packed with the local
   count into one float64 vector, ``all_reduce(SUM)``: ``μ = Σ_global / B_global``. All-reduce
   hands every rank the same bits, so ``μ``, ``P(μ)`` and ``<μX, μY>`` are identical on every rank.
3. **Projections** ``s_n = <X_n, μY>`` and ``t_p = <Y_p, P(μX)>`` on the local shard only.
4. **Statistics.** Local two-pass float64 :class:`~functional_probe.stats.Moments` -> ``[6]``
   tensors -> ``all_gather`` -> :func:`~functional_probe.stats.combine_all` in rank order
   (Chan et al.: ``m2 = m2_a + m2_b + δ²·n_a n_b / n``), never ``Σs² − n·s̄²``. Every rank
   combines the same list in the same order: bit-identical results. The probe's cross term
   combines the co-moments of the (s_n, t_p) pairs of prompts shared by E and U the same way.
5. **Reporting.** The s (and t) vectors are ``all_gather``-ed in rank order; shards are
   contiguous (:func:`shard_range`), so this is the single-process order.

Local ValueErrors (a token id outside the vocabulary in one shard, a non-finite s) are
exchanged by :func:`agree` before the next collective, so every rank raises the same
ValueError instead of the others waiting forever. Other exceptions are not exchanged.

The LoRA dict, direction and preconditioner must be the same on every rank (they are not
communicated). Under NCCL the current CUDA device must be set (``torch.cuda.set_device``).
Pass shards, not copies: the same whole batch on every rank counts each prompt W times
(the means survive, the variances do not); inside a training job that already has a
process group, pass ``distributed=False`` to probe one rank's batch alone.

Limitation (cross term): a prompt of E is paired with a prompt of U only when both land on
the SAME rank. With E and U the same file or batch sharded by the same helper (the case
where E and U share prompts), every pair is local; for partly overlapping E and U the
pairs that straddle ranks are missed (``shared_prompts`` and ``C_XY`` then undercount).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from .batch import Batch
from .rendezvous import rendezvous
from .rollouts import Rollouts
from .stats import Moments, as_tensor, combine_all, from_tensor

__all__ = [
    "agree",
    "all_gather_vector",
    "all_moments",
    "all_reduce_mean",
    "global_counts",
    "is_distributed",
    "local_device",
    "process_group_from_env",
    "prompt_count",
    "rank_and_world",
    "shard_batch",
    "shard_range",
    "shard_rollouts",
    "sharded",
]

T = TypeVar("T")


def is_distributed(distributed: bool | None, what: str) -> bool:
    """Whether `what` takes the sharded path; the caller's choice, never guessed.

    ``True``: sharded (every rank must call, each with its shard; a process group must be
    initialized). ``False``: this process alone on its local batch, even under a group (the
    ``is_world_process_zero()`` pattern). ``None``: ``False`` without a group or with one
    rank; under a group of several ranks a ValueError asking for True or False, since either
    reading of the batch is plausible and the wrong one hangs or silently changes the result.
    """
    active = dist.is_available() and dist.is_initialized()
    if distributed is None:
        if active and dist.get_world_size() > 1:
            raise ValueError(
                f"{what}: a torch.distributed process group of {dist.get_world_size()} ranks is initialized; "
                "pass distributed=True (every rank calls it with its shard: the result of the gathered batch) "
                "or distributed=False (this process alone, on its local batch)"
            )
        return False
    if distributed and not active:
        raise ValueError(f"{what}: distributed=True but no torch.distributed process group is initialized")
    return bool(distributed)


_depth = [0]  # nesting of `sharded` blocks: only the outermost one meets the other ranks


@contextmanager
def sharded(what: str, timeout: float | None = None) -> Iterator[int]:
    """Block of a sharded computation: first the ranks meet (:func:`~functional_probe.rendezvous.
    rendezvous`; ValueError naming the missing ranks after `timeout`), then the block runs;
    yields the world size. Nested blocks (the probe's mean_grad calls) do not meet again."""
    if _depth[0] == 0:
        rendezvous(what, timeout)
    _depth[0] += 1
    try:
        yield dist.get_world_size()
    finally:
        _depth[0] -= 1


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# ------------------------------------------------------------------------------ sharding


def shard_range(n: int, rank: int, world_size: int) -> range:
    """Prompts ``lo .. hi−1`` of ``n`` that rank ``rank`` of ``world_size`` holds.

    ``numpy.array_split`` semantics: contiguous, in rank order, the first ``n % world_size``
    ranks get one prompt more; a rank gets none when ``n < world_size``.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")
    base, extra = divmod(n, world_size)
    lo = rank * base + min(rank, extra)
    return range(lo, lo + base + (rank < extra))


def _rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if (rank is None) != (world_size is None):
        raise ValueError("give both rank and world_size, or neither (then the process group's)")
    return rank_and_world() if rank is None else (rank, world_size)


def shard_batch(batch: Batch, rank: int | None = None, world_size: int | None = None) -> Batch | None:
    """This rank's contiguous share of ``batch`` (see :func:`shard_range`), columns trimmed;
    ``None`` for an empty share. Default rank/world size: the process group's."""
    rows = shard_range(batch.num_prompts, *_rank_world(rank, world_size))
    return batch[rows.start : rows.stop] if len(rows) else None


def shard_rollouts(rollouts: Rollouts, rank: int | None = None, world_size: int | None = None) -> Rollouts:
    """This rank's contiguous share of ``rollouts`` (possibly empty: then pass ``None`` as
    the batch). Lmax per prompt is kept, so ``.to_batch()`` of a shard equals the shard of
    ``.to_batch()`` up to column trimming."""
    rows = shard_range(len(rollouts), *_rank_world(rank, world_size))
    sl = slice(rows.start, rows.stop)
    lengths = None if rollouts.max_lengths is None else rollouts.max_lengths[sl]
    rewards = None if rollouts.rewards is None else rollouts.rewards[sl]
    return replace(rollouts, prompts=rollouts.prompts[sl], responses=rollouts.responses[sl],
                   advantages=rollouts.advantages[sl], max_lengths=lengths, rewards=rewards)  # fmt: skip


def prompt_count(batch: Batch | None) -> int:
    """Prompts in a shard; 0 for ``None``."""
    return 0 if batch is None else batch.num_prompts


# ------------------------------------------------------------------------- collectives


def comm_device() -> torch.device:
    """Where collective tensors live: the current CUDA device under NCCL, else the CPU."""
    if "nccl" in str(dist.get_backend()):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree(fn: Callable[..., T], *args, **kwargs) -> T:
    """``fn(*args, **kwargs)`` on this rank; if it raised ValueError on ANY rank, every rank
    raises ValueError with the lowest failing rank's message (``"rank r: ..."``).

    One ``all_gather_object`` of the messages; call it at the same point on every rank.
    """
    try:
        out, error = fn(*args, **kwargs), None
    except ValueError as err:
        out, error = None, str(err)
    errors: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    for r, message in enumerate(errors):
        if message is not None:
            raise ValueError(f"rank {r}: {message}")
    return out


def global_counts(*counts: int) -> list[int]:
    """Element-wise sums of ``counts`` over all ranks (one ``all_reduce`` of int64)."""
    t = torch.tensor(counts, dtype=torch.int64, device=comm_device())
    dist.all_reduce(t)
    return [int(c) for c in t.tolist()]


def all_reduce_mean(sums: Mapping[str, Tensor], count: int, what: str = "mean_grad") -> dict[str, Tensor]:
    """``Σ_ranks sums / Σ_ranks count`` per tensor, identical on every rank.

    One ``all_reduce(SUM)`` of ``[flat float64 sums..., count]``; the quotient is taken in
    float64 and cast back to each sum's dtype and device. A global count of 0 raises
    ValueError on every rank.
    """
    flat = torch.cat([v.detach().to(comm_device(), torch.float64).reshape(-1) for v in sums.values()]
                     + [torch.tensor([float(count)], dtype=torch.float64, device=comm_device())])  # fmt: skip
    dist.all_reduce(flat)
    total = int(flat[-1].item())
    if total == 0:
        raise ValueError(f"{what} got no prompts on any of the {dist.get_world_size()} ranks")
    out, offset = {}, 0
    for key, v in sums.items():
        part = flat[offset : offset + v.numel()].reshape(v.shape) / total
        out[key] = part.to(device=v.device, dtype=v.dtype)
        offset += v.numel()
    return out


def all_moments(parts: Sequence[Moments]) -> list[Moments]:
    """Global moments of each of ``parts`` (same length on every rank): ``all_gather`` of the
    ``[k, 6]`` float64 tensors, then ``combine_all`` of each column in rank order (Chan)."""
    local = torch.stack([as_tensor(m) for m in parts]).to(comm_device())
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    per_rank = [from_tensor(g) for g in gathered]
    return [combine_all(r[j] for r in per_rank) for j in range(len(parts))]


def all_gather_vector(v: Tensor) -> Tensor:
    """The concatenation, in rank order, of every rank's 1-D ``v`` (lengths may differ, 0
    included), as a float64 CPU tensor. Two collectives: lengths, then padded values."""
    sizes = [torch.zeros(1, dtype=torch.int64, device=comm_device()) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([v.numel()], dtype=torch.int64, device=comm_device()))
    lengths = [int(s.item()) for s in sizes]
    padded = torch.zeros(max(lengths), dtype=torch.float64, device=comm_device())
    padded[: v.numel()] = v.detach().to(padded)
    gathered = [torch.empty_like(padded) for _ in lengths]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:k].cpu() for g, k in zip(gathered, lengths, strict=True)])


# ------------------------------------------------------------------------------ launch


@contextmanager
def process_group_from_env() -> Iterator[tuple[int, int]]:
    """Under ``torchrun`` (RANK and WORLD_SIZE set, no group yet): set the CUDA device from
    LOCAL_RANK, ``init_process_group`` (NCCL with CUDA, else gloo; ``env://``), yield
    ``(rank, world_size)`` and destroy the group on exit. Otherwise yield the existing
    group's ``(rank, world)`` or ``(0, 1)`` and leave everything as it is."""
    if not ({"RANK", "WORLD_SIZE"} <= os.environ.keys()) or (dist.is_available() and dist.is_initialized()):
        yield rank_and_world()
        return
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    try:
        yield dist.get_rank(), dist.get_world_size()
    finally:
        dist.destroy_process_group()


def local_device() -> torch.device:
    """The device this rank computes on: the current CUDA device under NCCL, else the CPU."""
    return comm_device() if dist.is_available() and dist.is_initialized() else torch.device("cpu")
