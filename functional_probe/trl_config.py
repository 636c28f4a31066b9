"""The GRPOConfig options that shape TRL's policy loss (trl 1.16), as one frozen dataclass.

`TrainerLoss.from_config(args)` reads them from a GRPOConfig and refuses the options whose
effect on the loss `trl_loss` does not express; `TrainerLoss.rows` builds TRL-shaped rows of a
generation batch with this config's reward scaling and truncation masking.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

from .trl_rows import SCALE_REWARDS, TrainerRows, pad_rows, trl_advantages
from .validation import check_positive_ints

__all__ = ["IS_LEVELS", "LOSS_TYPES", "TrainerLoss"]

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
IS_LEVELS = ("token", "sequence")


@dataclass(frozen=True)
class TrainerLoss:
    """The GRPOConfig fields that shape TRL's policy loss (names and defaults as in trl 1.16).

    `gradient_accumulation_steps` is TRL's `current_gradient_accumulation_steps` (smaller only
    in an epoch's last, incomplete window); `steps_per_generation` None means GA (TRL's default);
    `num_processes` is the number of data-parallel ranks.
    """

    loss_type: str = "dapo"
    max_completion_length: int = 256
    temperature: float = 1.0
    scale_rewards: str = "group"
    mask_truncated_completions: bool = False
    beta: float = 0.0
    epsilon: float = 0.2
    epsilon_high: float | None = None
    delta: float | None = None
    importance_sampling_level: str = "token"
    use_bias_correction_kl: bool = False
    num_iterations: int = 1
    gradient_accumulation_steps: int = 1
    steps_per_generation: int | None = None
    num_processes: int = 1
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0

    def __post_init__(self) -> None:
        choices = {"loss_type": LOSS_TYPES, "scale_rewards": SCALE_REWARDS, "importance_sampling_level": IS_LEVELS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not supported; expected one of {allowed}")
        counts = ("max_completion_length", "num_iterations", "gradient_accumulation_steps", "num_processes")
        check_positive_ints(**{name: getattr(self, name) for name in counts})
        if self.steps_per_generation is not None:
            check_positive_ints(steps_per_generation=self.steps_per_generation)
        check_real("temperature", self.temperature, positive=True)
        for name in ("beta", "epsilon", "sapo_temperature_pos", "sapo_temperature_neg", "vespo_k_pos",
                     "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg"):  # fmt: skip
            check_real(name, getattr(self, name))
        for name in ("epsilon_high", "delta"):
            if getattr(self, name) is not None:
                check_real(name, getattr(self, name))

    @property
    def eps_low(self) -> float:
        return self.epsilon

    @property
    def eps_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    @property
    def spg(self) -> int:
        """steps_per_generation (GA when not set, as TRL)."""
        return self.gradient_accumulation_steps if self.steps_per_generation is None else self.steps_per_generation

    @property
    def needs_old_logps(self) -> bool:
        """TRL keeps generation-time log-probs iff GA % (steps_per_generation · num_iterations) ≠ 0."""
        return self.gradient_accumulation_steps % (self.spg * self.num_iterations) != 0

    @classmethod
    def from_config(cls, args: Any, *, num_processes: int | None = None) -> TrainerLoss:
        """From a trl GRPOConfig (after its __post_init__). `num_processes` defaults to `args.world_size`.

        Raises ValueError naming each GRPOConfig option that changes the loss in a way this
        module does not express (entropy masks and bonus, off-policy masks, vLLM importance
        correction, normalize_then_sum advantages). Warns when `bf16` / `fp16` is set (GRPOConfig's
        default is bf16=True): TRL then runs its loss under autocast, and this loss, computed in the
        model's compute dtype, differs from TRL's `p.grad` by rounding (3.4% relative, measured on a
        tiny fp32 Llama; the same loss in fp32 matches to 1e-6).
        """
        unsupported = {
            "top_entropy_quantile": args.top_entropy_quantile < 1.0,
            "entropy_coef": args.entropy_coef != 0.0 or args.use_adaptive_entropy,
            "off_policy_mask_threshold": args.off_policy_mask_threshold is not None,
            "vllm_importance_sampling_correction": args.use_vllm and args.vllm_importance_sampling_correction,
            "multi_objective_aggregation": args.multi_objective_aggregation != "sum_then_normalize",
        }
        for name, bad in unsupported.items():
            if bad:
                raise ValueError(f"GRPOConfig.{name}={getattr(args, name)!r} is not supported by the trainer loss")
        if args.bf16 or args.fp16:
            warnings.warn(
                f"GRPOConfig has bf16={args.bf16}, fp16={args.fp16}: TRL computes its loss under autocast, "
                "this trainer loss in the model's compute dtype; expect rounding-level (percent) differences "
                "from TRL's gradient", stacklevel=2,
            )  # fmt: skip
        names = [f.name for f in fields(cls) if f.name not in ("num_processes", "gradient_accumulation_steps")]
        return cls(
            **{name: getattr(args, name) for name in names},
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            num_processes=args.world_size if num_processes is None else num_processes,
        )

    def rows(
        self,
        prompts: Sequence[Sequence[int]],
        completions: Sequence[Sequence[int]],
        group: Sequence[int] | Tensor,
        *,
        advantages: Tensor | Sequence[float] | None = None,
        rewards: Tensor | Sequence[float] | None = None,
        truncated: Tensor | Sequence[bool] | None = None,
        old_logps: Tensor | None = None,
        ref_logps: Tensor | None = None,
        num_items_in_batch: int | None = None,
        pad_token_id: int = 0,
    ) -> TrainerRows:
        """TRL-shaped rows of a generation batch from token lists: one prompt (repeated) and one
        completion per row, `group` the prompt index of each row.

        Give `advantages` [B], or `rewards` [B] (TRL's weighted sum; NaN = unscorable) to get
        TRL's advantages with this config's `scale_rewards` over these rows. With
        `mask_truncated_completions`, rows flagged `truncated` get an all-zero completion mask
        (zero weight, as TRL). `num_items_in_batch` defaults to the loss tokens of these rows,
        which is TRL's value when they are the whole generation batch of all processes.
        `old_logps` / `ref_logps`: [B, C] per-token log-probs, C the longest completion.
        """
        if (advantages is None) == (rewards is None):
            raise ValueError("give exactly one of advantages (TRL's, per row) or rewards")
        pid, pmask, cid, cmask = pad_rows(prompts, completions, pad_token_id=pad_token_id)
        group = torch.as_tensor(group, dtype=torch.long)
        if rewards is not None:
            advantages = trl_advantages(torch.as_tensor(rewards), group, self.scale_rewards)
        if truncated is not None and self.mask_truncated_completions:
            cmask = cmask & ~torch.as_tensor(truncated, dtype=torch.bool)[:, None]
        n_items = int(cmask.sum()) if num_items_in_batch is None else num_items_in_batch
        return TrainerRows(
            pid, pmask, cid, cmask, torch.as_tensor(advantages, dtype=torch.float32), group, n_items,
            old_logps=None if old_logps is None else old_logps.float(),
            ref_logps=None if ref_logps is None else ref_logps.float(),
        )  # fmt: skip


def check_real(name: str, value: Any, *, positive: bool = False) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (positive and value <= 0):
        raise ValueError(f"{name}={value!r}; expected a finite number{' > 0' if positive else ''}")


