"""Rows laid out as TRL's GRPOTrainer feeds them to its loss, and TRL's advantages.

One row per completion, as in the dict `GRPOTrainer._compute_loss` receives::

    prompt_ids     [B, P]  left-padded (TRL pads the generation batch's prompts on the left)
    completion_ids [B, C]  right-padded; completion_mask [B, C] zero on pads and, with
                           mask_truncated_completions, on every token of a truncated completion

plus the prompt (group) index of each row, which TRL's shuffle drops and the per-prompt
decomposition of the probe needs. Groups may have any size: a micro-batch or a rank holds part
of a group, and prompts may have different numbers of completions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import Tensor

__all__ = ["SCALE_REWARDS", "TrainerRows", "micro_batches_from_inputs", "pad_rows", "trl_advantages"]

SCALE_REWARDS = ("group", "batch", "none")
STD_EPS = 1e-4  # TRL: advantages / (std + 1e-4)
# keys of TRL's loss inputs that change the loss in ways these rows cannot express
UNSUPPORTED_KEYS = ("tool_mask", "importance_sampling_ratio", "pixel_values", "token_type_ids")


@dataclass(frozen=True, eq=False)
class TrainerRows:
    """B completion rows in TRL's layout (see the module docstring); one micro-batch or more.

    Attributes:
        prompt_ids, prompt_mask: [B, P] int64 / bool, left-padded (last column real).
        completion_ids, completion_mask: [B, C] int64 / bool, right-padded.
        advantages: [B] float32, one per completion (TRL's `inputs["advantages"]`).
        group: [B] int64 ≥ 0, the prompt index of each row.
        num_items_in_batch: loss tokens of the whole generation batch over all processes (the
            normaliser of the dapo / cispo / vespo losses; TRL's `inputs["num_items_in_batch"]`).
        old_logps: [B, C] float32 or None, per-token log-probs at generation time (TRL's
            `old_per_token_logps`; needed when the step is off-policy, e.g. num_iterations > 1).
        ref_logps: [B, C] float32 or None, the reference model's per-token log-probs (beta > 0).
    """

    prompt_ids: Tensor
    prompt_mask: Tensor
    completion_ids: Tensor
    completion_mask: Tensor
    advantages: Tensor
    group: Tensor
    num_items_in_batch: int
    old_logps: Tensor | None = None
    ref_logps: Tensor | None = None

    def __post_init__(self) -> None:
        b, c = self.completion_ids.shape if self.completion_ids.dim() == 2 else (-1, -1)
        if b < 1:
            raise ValueError(f"completion_ids must be [B, C] with B ≥ 1, got {tuple(self.completion_ids.shape)}")
        p = self.prompt_ids.shape[-1]
        expected = {"prompt_ids": (b, p), "prompt_mask": (b, p), "completion_mask": (b, c),
                    "advantages": (b,), "group": (b,), "old_logps": (b, c), "ref_logps": (b, c)}  # fmt: skip
        for name, shape in expected.items():
            t = getattr(self, name)
            if t is not None and tuple(t.shape) != shape:
                raise ValueError(f"TrainerRows.{name} has shape {tuple(t.shape)}, expected {shape}")
        if p < 1 or not bool(self.prompt_mask[:, -1].all()):
            row = 0 if p < 1 else int((~self.prompt_mask[:, -1]).nonzero()[0])
            raise ValueError(f"row {row}: its prompt does not end at the last prompt column; expected "
                             "non-empty prompts left-padded as TRL pads them")  # fmt: skip
        if bool((self.group < 0).any()):
            raise ValueError(f"row {int((self.group < 0).nonzero()[0])}: negative group index")
        if isinstance(self.num_items_in_batch, bool) or not isinstance(self.num_items_in_batch, int):
            raise ValueError(f"num_items_in_batch={self.num_items_in_batch!r}; expected an int")
        if self.num_items_in_batch < 0:
            raise ValueError(f"num_items_in_batch={self.num_items_in_batch}; expected ≥ 0")
        for name in ("advantages", "old_logps", "ref_logps"):
            t = getattr(self, name)
            bad = None if t is None else ~torch.isfinite(t) & (self.completion_mask if t.dim() == 2 else True)
            if bad is not None and bool(bad.any()):
                where = tuple(int(i) for i in bad.nonzero()[0])
                raise ValueError(f"TrainerRows.{name}{list(where)} (row {where[0]}) is {float(t[where])}; "
                                 "expected a finite number")  # fmt: skip

    @property
    def num_rows(self) -> int:
        return self.completion_ids.shape[0]

    @property
    def lengths(self) -> Tensor:
        """[B] int64, loss tokens per row (0 for a masked truncated completion)."""
        return self.completion_mask.sum(-1)

    def select(self, rows: Tensor | Sequence[int]) -> TrainerRows:
        """The rows `rows` (indices), same columns."""
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.group.device)
        return replace(self, **{f.name: getattr(self, f.name).index_select(0, idx) for f in self._tensors()})

    def split(self, size: int) -> list[TrainerRows]:
        """Consecutive micro-batches of `size` rows, as TRL's split of a shuffled generation batch."""
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"split size must be a positive int, got {size!r}")
        return [self.select(range(i, min(i + size, self.num_rows))) for i in range(0, self.num_rows, size)]

    def to(self, device: torch.device | str) -> TrainerRows:
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in self._tensors()})

    def _tensors(self):
        return [f for f in fields(self) if isinstance(getattr(self, f.name), Tensor)]

    @classmethod
    def from_inputs(cls, inputs: Mapping[str, Any], group: Tensor | Sequence[int]) -> TrainerRows:
        """Rows from the dict TRL's `_compute_loss` receives (one micro-batch), plus the group
        index of each row (TRL shuffles rows and does not keep it).

        Raises ValueError for inputs these rows cannot express (tool masks, vLLM importance
        ratios, multimodal inputs, per-token advantages), naming the key.
        """
        for key in UNSUPPORTED_KEYS:
            if key in inputs:
                raise ValueError(f"TRL input {key!r} is not supported by the trainer loss; supported keys: "
                                 "prompt_ids/mask, completion_ids/mask, advantages, num_items_in_batch, "
                                 "old_per_token_logps, ref_per_token_logps")  # fmt: skip
        adv = inputs["advantages"]
        if adv.dim() != 1:
            raise ValueError(f"advantages of shape {tuple(adv.shape)}: only one advantage per completion [B] "
                             "is supported")  # fmt: skip
        optional = {k: inputs.get(key) for k, key in (("old_logps", "old_per_token_logps"),
                                                     ("ref_logps", "ref_per_token_logps"))}  # fmt: skip
        return cls(
            prompt_ids=inputs["prompt_ids"].long(), prompt_mask=inputs["prompt_mask"].bool(),
            completion_ids=inputs["completion_ids"].long(), completion_mask=inputs["completion_mask"].bool(),
            advantages=adv.detach().float(), group=torch.as_tensor(group, dtype=torch.long, device=adv.device),
            num_items_in_batch=int(inputs["num_items_in_batch"]),
            **{k: None if v is None else v.detach().float() for k, v in optional.items()},
        )  # fmt: skip



def micro_batches_from_inputs(
    inputs: Sequence[Mapping[str, Any]], groups: Sequence[Tensor | Sequence[int]] | None = None
) -> list[TrainerRows]:
    """Rows of the micro-batches TRL built from one generation batch (e.g. its buffered inputs).

    `groups` gives the prompt index of each row of each micro-batch. None recovers it from the
    prompts: TRL pads a generation batch's prompts together, so the G completions of a prompt
    carry identical prompt rows; identical prompts (the same text drawn twice) become one group.
    """
    if not inputs:
        raise ValueError("micro_batches_from_inputs needs at least one micro-batch")
    if groups is None:
        widths = {int(mb["prompt_ids"].shape[1]) for mb in inputs}
        if len(widths) != 1:
            raise ValueError(f"micro-batches have prompt widths {sorted(widths)}: they are not from one "
                             "generation batch; pass groups explicitly")  # fmt: skip
        prompts = torch.cat([mb["prompt_ids"] * mb["prompt_mask"].bool() for mb in inputs])  # pads as 0
        key = torch.cat([prompts, torch.cat([mb["prompt_mask"].long() for mb in inputs])], dim=-1)
        inverse = torch.unique(key, dim=0, return_inverse=True)[1]
        groups = inverse.split([int(mb["prompt_ids"].shape[0]) for mb in inputs])
    if len(groups) != len(inputs):
        raise ValueError(f"got {len(groups)} group vectors for {len(inputs)} micro-batches")
    return [TrainerRows.from_inputs(mb, g) for mb, g in zip(inputs, groups, strict=True)]

def pad_rows(
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    *,
    pad_token_id: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """TRL's padding of a generation batch: prompts on the left, completions on the right, to the
    longest of the batch. -> prompt_ids, prompt_mask [B, P], completion_ids, completion_mask [B, C]."""
    if len(prompts) != len(completions) or not prompts:
        raise ValueError(f"got {len(prompts)} prompts and {len(completions)} completions; expected one "
                         "prompt per completion row and at least one row")  # fmt: skip
    for what, seqs in (("prompt", prompts), ("completion", completions)):
        for i, s in enumerate(seqs):
            if len(s) == 0:
                raise ValueError(f"row {i}: the {what} is empty; expected at least one token id")
    p, c = max(map(len, prompts)), max(map(len, completions))
    b = len(prompts)
    prompt_ids = torch.full((b, p), pad_token_id, dtype=torch.long)
    completion_ids = torch.full((b, c), pad_token_id, dtype=torch.long)
    prompt_mask = torch.zeros(b, p, dtype=torch.bool)
    completion_mask = torch.zeros(b, c, dtype=torch.bool)
    for i, (pr, co) in enumerate(zip(prompts, completions, strict=True)):
        prompt_ids[i, p - len(pr) :], prompt_mask[i, p - len(pr) :] = torch.as_tensor(pr), True
        completion_ids[i, : len(co)], completion_mask[i, : len(co)] = torch.as_tensor(co), True
    return prompt_ids, prompt_mask, completion_ids, completion_mask


def trl_advantages(rewards: Tensor, group: Tensor, scale_rewards: str = "group") -> Tensor:
    """TRL's advantages [B] (float32) from rewards [B] and group indices [B] over one generation batch.

    A = r − mean_g(r), divided by (std + 1e-4) where std is the unbiased std of the row's group
    (`"group"`) or of the whole batch (`"batch"`); `"none"` does not divide. NaN rewards (TRL's
    unscorable completions) are left out of every mean and std and get advantage 0; a group or
    batch of one has std 0. Computed in float64 (TRL: float32; equal to ~1e-7). Groups of any size.
    """
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards={scale_rewards!r}; expected one of {SCALE_REWARDS}")
    r, g = rewards.detach().double().reshape(-1), torch.as_tensor(group, dtype=torch.long).reshape(-1)
    if r.shape != g.shape:
        raise ValueError(f"rewards has {r.numel()} entries but group has {g.numel()}; expected one per row")
    if bool(torch.isinf(r).any()):
        raise ValueError(f"reward of row {int(torch.isinf(r).nonzero()[0])} is infinite; expected finite or NaN")
    valid = ~torch.isnan(r)
    mean_g, std_g = group_moments(torch.where(valid, r, 0.0), valid, g)
    if scale_rewards == "batch":
        n = int(valid.sum())
        mean_b = r[valid].mean() if n else r.new_zeros(())
        std = ((r[valid] - mean_b).pow(2).sum() / (n - 1)).sqrt() if n > 1 else r.new_zeros(())
        std = std.expand_as(r)
    else:
        std = std_g[g]
    adv = r - mean_g[g]
    if scale_rewards != "none":
        adv = adv / (std + STD_EPS)
    return torch.where(valid, adv, 0.0).float()


def group_moments(r: Tensor, valid: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """Per-group mean and unbiased std over valid entries, two-pass, float64: [N] each (std 0 for < 2)."""
    n_groups = int(g.max()) + 1
    count = r.new_zeros(n_groups).index_add_(0, g, valid.double())
    mean = r.new_zeros(n_groups).index_add_(0, g, r) / count.clamp(min=1)
    dev = torch.where(valid, r - mean[g], 0.0).pow(2)
    var = r.new_zeros(n_groups).index_add_(0, g, dev) / (count - 1).clamp(min=1)
    return mean, torch.where(count > 1, var.sqrt(), 0.0)

