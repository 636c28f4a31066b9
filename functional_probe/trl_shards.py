"""How `trainer_probe` combines the ranks of a data-parallel (DDP / accelerate) GRPOTrainer run.

Each rank holds its share of the generation batch (its rows, split into its GA micro-batches) and
its shard of E. What the trainer does with them (trl 1.16): every rank computes TRL's loss on its
own rows with TRL's normalisers — grpo, bnpo, dr_grpo, luspo, sapo by counts of the micro-batch
(per process), dapo, cispo, vespo by the gathered `num_items_in_batch / num_processes` — and DDP
averages the accumulated gradients, so

    p.grad = (1/W) Σ_ranks Σ_mb ∇ TRL-loss(mb)

which is `trainer_grad` (it divides by `num_processes` = W) summed over ranks: one float64
all_reduce (`all_reduce_sum`). Clipping and the optimizer step then act on the same p.grad on every
rank, and every rank computes the same Δθ.

Prompts (groups) across ranks: TRL's sampler gives each rank a contiguous slice of the repeated
prompt list, so a prompt's G completions may straddle two ranks (`per_device_train_batch_size ·
steps_per_generation` not a multiple of G); TRL computes the advantages on the gathered rewards, so
each rank's rows carry the right ones. Here a prompt is identified by its token ids on every rank
(`global_groups`: rows with equal prompt ids are one prompt, as `micro_batches_from_inputs`
groups them), and N counts the distinct prompts of all ranks. The per-prompt projections
t_p = −N·<∇L_trl[p], b> are partial sums on each rank holding rows of p: one all_reduce of the
[N] partials gives every t_p. For the jackknife each prompt's pseudo-value is computed on the
lowest rank that holds it, after one all_reduce of the per-prompt gradients of the prompts that
straddle ranks (none in TRL's usual layout), and the values are all_gathered. μX over E's shards
and the s projections follow `probe(distributed=True)`; s, t and the pseudo-values are gathered,
so every rank forms the same moments of the same vectors: bit-identical results on every rank.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from torch import Tensor

from .distributed import agree, all_gather_vector, comm_device, rank_and_world
from .trl_config import TrainerLoss
from .trl_rows import TrainerRows

__all__ = ["LocalComm", "ShardComm", "all_reduce_sum", "check_processes", "global_groups"]

Dict = dict[str, Tensor]


def prompt_keys(mb: TrainerRows) -> list[tuple[int, ...]]:
    """The prompt token ids of each row (left padding removed)."""
    return [tuple(mb.prompt_ids[i][mb.prompt_mask[i]].tolist()) for i in range(mb.num_rows)]


def global_groups(mbs: Sequence[TrainerRows]) -> tuple[list[TrainerRows], list[list[int]]]:
    """Every rank's micro-batches with their group index replaced by the global prompt index
    (the rank of its token ids among the distinct prompts of all ranks, sorted), and for each
    global prompt the ranks holding rows of it. One all_gather_object of the prompt ids."""
    keys = [prompt_keys(mb) for mb in mbs]
    local = sorted({k for ks in keys for k in ks})
    gathered: list[list[tuple[int, ...]] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    prompts = sorted({k for part in gathered for k in part})
    index = {k: i for i, k in enumerate(prompts)}
    held = [set(part) for part in gathered]
    holders = [[r for r, h in enumerate(held) if k in h] for k in prompts]
    out = [replace(mb, group=torch.tensor([index[k] for k in ks], dtype=torch.long, device=mb.group.device))
           for mb, ks in zip(mbs, keys, strict=True)]  # fmt: skip
    return out, holders


def all_reduce_sum(parts: Mapping[str, Tensor]) -> Dict:
    """Σ over ranks of each tensor (one float64 all_reduce), cast back to its dtype and device;
    identical on every rank."""
    flat = torch.cat([v.detach().to(comm_device(), torch.float64).reshape(-1) for v in parts.values()])
    dist.all_reduce(flat)
    out, offset = {}, 0
    for key, v in parts.items():
        out[key] = flat[offset : offset + v.numel()].reshape(v.shape).to(device=v.device, dtype=v.dtype)
        offset += v.numel()
    return out


def check_processes(loss: TrainerLoss, distributed: bool) -> None:
    """`loss.num_processes` must be the world size under a process group of several ranks, with
    distributed=True: TRL's normalisers and DDP's average use it. distributed=False there would
    predict from this rank's rows alone a step that DDP takes from all ranks: refused."""
    _, world = rank_and_world()
    if distributed and loss.num_processes != world:
        raise ValueError(f"trainer_probe(distributed=True): loss.num_processes={loss.num_processes} but the process "
                         f"group has {world} ranks; TRL normalises by and DDP averages over all ranks "
                         "(TrainerLoss.from_config(args) reads args.world_size)")  # fmt: skip
    if not distributed and world > 1 and loss.num_processes > 1:
        raise ValueError(f"trainer_probe(distributed=False) under a process group of {world} ranks with "
                         f"loss.num_processes={loss.num_processes}: the trainer's step uses the gradient averaged over "
                         "all ranks, which one rank's rows do not give; call it on every rank with "
                         "distributed=True (or with num_processes=1 to probe this rank's batch as a one-process step)")  # fmt: skip


def call(fn, *args, **kwargs):
    return fn(*args, **kwargs)


class LocalComm:
    """One process: E and the rows are all there is (every combination is the identity)."""

    distributed, world = False, 1
    run = staticmethod(call)

    def grad(self, g: Dict) -> Dict:
        return g

    def t(self, t: Tensor) -> Tensor:
        return t

    def gather(self, v: Tensor) -> Tensor:
        return v

    def own(self, per_prompt: Dict) -> Dict:
        return per_prompt


@dataclass(frozen=True)
class ShardComm:
    """The ranks of the default group (module docstring); `holders[p]`: ranks with rows of prompt p."""

    holders: list[list[int]]
    distributed = True
    run = staticmethod(agree)  # a local ValueError is raised on every rank, never a hang

    @property
    def world(self) -> int:
        return dist.get_world_size()

    def grad(self, g: Dict) -> Dict:
        return all_reduce_sum(g)

    def t(self, t: Tensor) -> Tensor:
        return all_reduce_sum({"t": t})["t"]

    def gather(self, v: Tensor) -> Tensor:
        return all_gather_vector(v)

    def own(self, per_prompt: Dict) -> Dict:
        """The per-prompt gradients [m, ...] of the prompts whose pseudo-values this rank computes
        (those whose lowest holder it is), straddling prompts summed over their ranks first."""
        shared = [p for p, h in enumerate(self.holders) if len(h) > 1]
        if shared:
            summed = all_reduce_sum({k: v[shared] for k, v in per_prompt.items()})
            per_prompt = {k: v.index_copy(0, torch.tensor(shared, device=v.device), summed[k])
                          for k, v in per_prompt.items()}  # fmt: skip
        rank = dist.get_rank()
        mine = [p for p, h in enumerate(self.holders) if h[0] == rank]
        return {k: v[mine] for k, v in per_prompt.items()}
