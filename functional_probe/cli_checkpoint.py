"""`functional-probe run --checkpoint checkpoint-N/ --rollouts U.jsonl --eval E.jsonl`: δH₁ ± SE
of the exact next step a TRL GRPOTrainer takes from a saved checkpoint.

The update is TRL's, with the GRPOConfig's loss on the rows of U, clip_grad_norm_(max_grad_norm)
and the saved optimizer's next step at the scheduler's lr (`trl_probe.trainer_probe`, whose
docstring has the formulas); scale_rewards acts on the file's raw rewards.

U gives one line per prompt: its G completions (those of one generation batch) with raw
`rewards` (TRL's advantages are computed with the config's scale_rewards) or TRL's
`advantages`. Its rows, in file order, are split into gradient_accumulation_steps micro-batches
of per_device_train_batch_size rows, as one optimizer step of TRL (TRL shuffles the rows first:
for bnpo, whose normaliser is a micro-batch's token count, the split matters).
Refused, with the reason: --first-order, torchrun, --adapter / --optimizer-state (the
checkpoint's own are used), a non-GRPO checkpoint, and a next step that reuses an older
generation batch (num_iterations > 1 mid-cycle: its old log-probs are not saved).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

NOT_WITH = {"first_order": "--first-order", "adapter": "--adapter", "optimizer_state": "--optimizer-state",
            "update": "--update"}  # fmt: skip


def check_args(args: argparse.Namespace) -> None:
    """What --rollouts cannot be combined with, before anything is read."""
    if not args.checkpoint:
        raise ValueError("--rollouts needs --checkpoint checkpoint-N/ (a GRPOTrainer checkpoint)")
    for key, flag in NOT_WITH.items():
        if getattr(args, key):
            raise ValueError(f"--checkpoint with --rollouts does not take {flag}: the trainer's next step is "
                             "computed from the checkpoint's adapter and optimizer.pt and the rollouts' rows")  # fmt: skip
    if os.environ.get("WORLD_SIZE", "1") != "1":
        raise ValueError("--checkpoint with --rollouts runs in one process only, not under torchrun")


def run_checkpoint(args: argparse.Namespace) -> int:
    """Read everything (checkpoint, both files, token ids) before the model loads; probe; report."""
    from . import report
    from .cli import (
        check_adapter_fits,
        check_paths,
        checked_rollouts,
        device_and_dtype,
        tokenizer_of,
        vocab_size_of,
    )
    from .cli_check import finish
    from .model import load_model
    from .optimizer_state import check_lr
    from .trainer_checkpoint import read_trainer_checkpoint
    from .trl_probe import trainer_probe

    check_args(args)
    check_paths(args)
    say = report.Progress(quiet=args.quiet)
    ckpt = read_trainer_checkpoint(args.checkpoint, num_processes=1)
    if ckpt.loss is None:
        raise ValueError(f"{args.checkpoint}: training_args.bin holds {type(ckpt.args).__name__}, not a GRPOConfig")
    check_iteration(ckpt)
    say(f"{ckpt.order}; step {ckpt.step}; loss_type {ckpt.loss.loss_type}, temperature {ckpt.loss.temperature}")
    lrs = ckpt.lr if args.lr is None else [check_lr(args.lr, ckpt.lr[0], force=args.force_lr)] * len(ckpt.lr)
    model_dir = Path(args.model)
    vocab, tokenizer = vocab_size_of(model_dir), tokenizer_of(model_dir)
    check_adapter_fits({k: ps.shape for k, ps in ckpt.state.params.items()}, model_dir, ckpt.path)
    E = checked_rollouts(args.eval, tokenizer, vocab, "--eval").to_batch()
    U = checked_rollouts(args.rollouts, tokenizer, vocab, "--rollouts")
    rows = trainer_rows(U, ckpt, eos_ids(model_dir), args.rollouts)
    mbs = micro_batches(rows, ckpt, args.rollouts)
    device, dtype = device_and_dtype(args)
    say(f"loading model ({device}, {args.dtype})")
    model = load_model(model_dir, ckpt.path, quantize=args.quantize, dtype=dtype, device=device)
    probed = trainer_probe(model, model.lora, [mb.to(device) for mb in mbs], ckpt.loss, E, optimizer=ckpt.state,
                           max_grad_norm=ckpt.max_grad_norm, lr=lrs, num_groups=len(U), method=args.method,
                           microbatch=args.microbatch, progress=say, x_estimator=args.x_estimator)  # fmt: skip
    result = probed.result
    finish(args, result, None, None, say, ckpt.order)
    return 0


def check_iteration(ckpt) -> None:
    """The next step must be one whole generation batch at the current θ (old log-probs = current)."""
    loss, step = ckpt.loss, ckpt.step or 0
    if loss.spg != loss.gradient_accumulation_steps:
        raise ValueError(f"{ckpt.path}: steps_per_generation={loss.spg} differs from gradient_accumulation_steps="
                         f"{loss.gradient_accumulation_steps}: an optimizer step is not one generation batch; "
                         "not supported with --checkpoint")  # fmt: skip
    if step % loss.num_iterations:
        raise ValueError(f"{ckpt.path}: the next step (after step {step}) is iteration {step % loss.num_iterations + 1} "
                         f"of num_iterations={loss.num_iterations} on a generation batch made at an earlier θ, "
                         "whose old log-probs are not in the checkpoint; probe a checkpoint whose step is a "
                         f"multiple of {loss.num_iterations}")  # fmt: skip


def eos_ids(model_dir: Path) -> set[int]:
    """config.json's eos_token_id(s): a completion without one was truncated (as TRL decides)."""
    eos = json.loads((model_dir / "config.json").read_text()).get("eos_token_id")
    return {eos} if isinstance(eos, int) else set(eos or [])


def trainer_rows(U, ckpt, eos: set[int], path: str):
    """TRL rows of U: prompt repeated per completion, group = line, TRL advantages (from raw rewards
    with the config's scale_rewards, or the file's), truncation flags from the EOS ids."""
    loss = ckpt.loss
    prompts, completions, group = [], [], []
    for n, (prompt, responses) in enumerate(zip(U.prompts, U.responses, strict=True)):
        for g, r in enumerate(responses):
            if len(r) > loss.max_completion_length:
                raise ValueError(f"{path}: prompt {n}: response {g} has {len(r)} tokens, more than the "
                                 f"GRPOConfig's max_completion_length={loss.max_completion_length}")  # fmt: skip
            prompts.append(prompt)
            completions.append(r)
            group.append(n)
    truncated = [not (set(c) & eos) for c in completions] if loss.mask_truncated_completions else None
    if U.rewards is not None:
        return loss.rows(prompts, completions, group, rewards=[x for r in U.rewards for x in r], truncated=truncated)
    return loss.rows(prompts, completions, group, advantages=[a for r in U.advantages for a in r],
                     truncated=truncated)  # fmt: skip


def micro_batches(rows, ckpt, path: str):
    """The rows as gradient_accumulation_steps micro-batches of per_device_train_batch_size rows."""
    size, ga = ckpt.args.per_device_train_batch_size, ckpt.loss.gradient_accumulation_steps
    if rows.num_rows != size * ga:
        raise ValueError(f"{path}: {rows.num_rows} completions, but one optimizer step of this run trains on "
                         f"per_device_train_batch_size × gradient_accumulation_steps = {size} × {ga} = "
                         f"{size * ga} rows")  # fmt: skip
    return rows.split(size)
