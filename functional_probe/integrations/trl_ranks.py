"""`EntropyProbeCallback` under several processes: a data-parallel (DDP) GRPOTrainer run, as
accelerate (MULTI_CPU / MULTI_GPU) or torchrun launch it, W ranks.

What the callback does on each rank (every rank runs every step, so every collective below is
reached by all of them in the same order):
- the prediction: `fp.trainer_probe(distributed=True)` on this rank's micro-batches and this
  rank's shard of E; it returns the single-process result of the union on every rank;
- E: the prompts of the step's rows on all ranks, in rank order, each once (a group that
  straddles ranks — TRL 1.16 splits the repeated prompt list into contiguous slices — counts at
  the lowest rank holding it; prompts matched by token ids, as `trl_shards` matches rows), or the
  `eval_prompts`; then split in contiguous shards of at least 2 prompts over the first
  min(W, n // 2) ranks (`fp.realized_entropy_change` needs 2 per call for its SE), the others
  holding none (E = None there). The sampler's seed is offset by rank·2³², so no two ranks share
  draws, and the realized check draws from another stream than E;
- after sampling E, a barrier: ranks sample unequal shards (or none), and `trainer_probe`'s
  rendezvous would take a rank that is still sampling for one that never calls (ValueError
  after its timeout, 10 s by default); the barrier waits as long as the process group allows;
- the realized ΔH: each rank on its E shard, then the per-prompt d_n of all ranks are gathered in
  rank order and value ± SE recomputed on the union (two-pass float64, `realized.estimate`), which
  is what one process holding the union computes;
- the wall-clock costs logged are the slowest rank's (a MAX all_reduce), so every rank logs the
  same numbers.

DeepSpeed, FSDP (also on XLA) and Megatron-LM shard the parameters / optimizer state across
ranks, so no rank holds the full θ, p.grad and Adam moments the prediction needs: refused at
`attach` (the Trainer's is_deepspeed_enabled / is_fsdp_enabled / is_fsdp_xla_enabled, or
accelerate's distributed_type).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from ..distributed import all_gather_vector, comm_device, rank_and_world, shard_range
from ..realized import Estimate, estimate

__all__ = ["eval_share", "multi_process", "rank_seed", "slowest", "union_estimate", "wait_for_all"]

SHARDING_FLAGS = ("is_deepspeed_enabled", "is_fsdp_enabled", "is_fsdp_xla_enabled")  # Trainer attributes
SHARDING_TYPES = ("DEEPSPEED", "FSDP", "MEGATRON_LM")  # accelerate's DistributedType values
RANK_SEED_STRIDE = 2**32  # seeds of rank r: seed + 2·step + stream + r·2³² (distinct for < 2³¹ steps)


def multi_process(trainer) -> bool:
    """Whether `trainer` runs on several data-parallel processes (accelerate's num_processes or
    the torch.distributed world size > 1). ValueError for DeepSpeed / FSDP / Megatron-LM (module
    docstring)."""
    accelerator = getattr(trainer, "accelerator", None)
    kind = getattr(getattr(accelerator, "distributed_type", None), "value", None)
    found = [f"trainer.{f} is True" for f in SHARDING_FLAGS if getattr(trainer, f, False)]
    found += [f"accelerator.distributed_type is {kind}"] if kind in SHARDING_TYPES else []
    if found:
        raise ValueError(f"EntropyProbeCallback: {found[0]}; DeepSpeed, FSDP and Megatron-LM shard the "
                         "parameters and optimizer state across ranks, so no rank holds the θ, p.grad and Adam "
                         "moments the prediction needs. Supported: one process, or data-parallel DDP (accelerate "
                         "MULTI_CPU / MULTI_GPU, torchrun) with the full adapter on every rank")  # fmt: skip
    return max(getattr(accelerator, "num_processes", 1), rank_and_world()[1]) > 1


def gathered(obj) -> list:
    """`obj` of every rank, in rank order (one all_gather_object)."""
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def eval_share(prompts: Sequence[Sequence[int]], distributed: bool, *, of_rows: bool) -> list[list[int]]:
    """This rank's E prompts (module docstring). `of_rows`: `prompts` are this rank's rows' own
    (gathered over the ranks, deduplicated by token ids), else the same list on every rank (the
    `eval_prompts`). One process: all of `prompts`."""
    prompts = [list(p) for p in prompts]
    if not distributed:
        return prompts
    if of_rows:
        union = {tuple(p): None for part in gathered(prompts) for p in part}  # first holder's order
        prompts = [list(p) for p in union]
    rank, world = rank_and_world()
    active = max(1, min(world, len(prompts) // 2))
    return [prompts[i] for i in shard_range(len(prompts), rank, active)] if rank < active else []


def rank_seed(seed: int, step: int, distributed: bool, stream: int = 0) -> int:
    """The sampler's seed of this rank at `step`: seed + 2·step + stream + rank·2³². Stream 0 draws E,
    stream 1 the realized check's fresh responses, so the check never redraws E's own responses."""
    if stream not in (0, 1):
        raise ValueError(f"stream={stream!r}; expected 0 (E) or 1 (the realized check)")
    return seed + 2 * step + stream + (rank_and_world()[0] * RANK_SEED_STRIDE if distributed else 0)


def wait_for_all(distributed: bool) -> None:
    """A barrier under several processes (module docstring), nothing with one."""
    if distributed:
        dist.barrier()


def union_estimate(est: Estimate | None, distributed: bool) -> Estimate:
    """Mean ± SE over the per-prompt values d_n of every rank's estimate (None: a rank without
    E prompts), recomputed on the union in rank order; `est` itself with one process."""
    if not distributed:
        return est
    mine = torch.tensor([] if est is None else est.per_prompt, dtype=torch.float64)
    return estimate(all_gather_vector(mine))


def slowest(seconds: dict[str, float], distributed: bool) -> dict[str, float]:
    """The largest value of each entry over the ranks (one MAX all_reduce); as is with one process."""
    if not distributed:
        return seconds
    t = torch.tensor(list(seconds.values()), dtype=torch.float64, device=comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return dict(zip(seconds, t.tolist(), strict=True))
