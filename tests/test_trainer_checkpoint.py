"""read_trainer_checkpoint on checkpoint directories laid out as transformers' Trainer saves them
(adapter, optimizer.pt with create_optimizer's two groups, scheduler.pt, trainer_state.json,
training_args.bin), against the live optimizer they were saved from; the unpickling allow-list.
(A checkpoint written by a real GRPOTrainer run: tests/test_cli_checkpoint.py.)"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from test_trl_loss import peft_llama

import functional_probe as fp
from functional_probe.trainer_checkpoint import read_training_args

trl = pytest.importorskip("trl")


@dataclass
class Foreign:
    """A class outside the allow-list."""

    x: int = 1


def save_checkpoint(root, args, *, lr: float = 1e-3, steps: int = 3):
    """A checkpoint-N/ as Trainer._save_checkpoint writes it, after `steps` AdamW + linear-schedule
    steps on random gradients; returns the directory, the live optimizer and its named params."""
    model = peft_llama(seed=0)
    ckpt = root / f"checkpoint-{steps}"
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for _, p in params], "weight_decay": 0.1},
                             {"params": [], "weight_decay": 0.0}], lr=lr)  # fmt: skip
    sched = torch.optim.lr_scheduler.LinearLR(opt, 1.0, 0.0, total_iters=10)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        for _, p in params:
            p.grad = torch.randn(p.shape, generator=gen) * 0.01
        opt.step()
        sched.step()
    model.save_pretrained(ckpt)
    torch.save(opt.state_dict(), ckpt / "optimizer.pt")
    torch.save(sched.state_dict(), ckpt / "scheduler.pt")
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": steps, "log_history": []}))
    torch.save(args, ckpt / "training_args.bin")
    return ckpt, opt, model


def test_plain_training_arguments_give_the_live_optimizers_state(tmp_path):
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_grad_norm=0.0)
    ckpt, opt, model = save_checkpoint(tmp_path, args)
    c = fp.read_trainer_checkpoint(ckpt)
    assert c.step == 3 and c.loss is None and c.max_grad_norm is None and type(c.args) is TrainingArguments
    assert c.lr == [opt.param_groups[0]["lr"]] and c.lr[0] == pytest.approx(1e-3 * 0.7)
    live = fp.AdamState.from_optimizer(opt, {n: p for n, p in model.named_parameters() if p.requires_grad})
    lora = fp.from_peft(model).lora
    assert list(c.state.params) == list(lora)  # adapter names, in the adapter's order
    for (name, ps), ref in zip(c.state.params.items(), live.params.values(), strict=True):
        assert torch.equal(ps.m, ref.m) and torch.equal(ps.v, ref.v) and ps.weight_decay == ref.weight_decay, name
        assert ps.step == ref.step == 3


def test_grpo_config_gives_the_trainer_loss(tmp_path):
    args = trl.GRPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, bf16=False, loss_type="bnpo",
                          temperature=0.7, beta=0.02, scale_rewards="batch", max_completion_length=12,
                          num_iterations=2, max_grad_norm=0.3)  # fmt: skip
    c = fp.read_trainer_checkpoint(save_checkpoint(tmp_path, args)[0], num_processes=2)
    assert c.loss == fp.TrainerLoss.from_config(args, num_processes=2) and c.max_grad_norm == 0.3
    assert (c.loss.loss_type, c.loss.temperature, c.loss.beta, c.loss.scale_rewards) == ("bnpo", 0.7, 0.02, "batch")
    assert (c.loss.max_completion_length, c.loss.num_iterations, c.loss.num_processes) == (12, 2, 2)


def test_training_args_outside_the_allow_list_are_refused_by_name(tmp_path):
    torch.save(Foreign(), tmp_path / "foreign.bin")
    with pytest.raises(ValueError, match="refusing to unpickle test_trainer_checkpoint.Foreign"):
        read_training_args(tmp_path / "foreign.bin")
    torch.save({"lr": 1.0}, tmp_path / "dict.bin")
    with pytest.raises(ValueError, match="holds a dict, not TrainingArguments"):
        read_training_args(tmp_path / "dict.bin")
    (tmp_path / "junk.bin").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="junk.bin: not a torch.save file"):
        read_training_args(tmp_path / "junk.bin")
    with pytest.raises(ValueError, match="missing.bin: not found"):
        read_training_args(tmp_path / "missing.bin")


def test_bad_directories_are_named(tmp_path):
    with pytest.raises(ValueError, match="nowhere: not a directory"):
        fp.read_trainer_checkpoint(tmp_path / "nowhere")
    from transformers import TrainingArguments

    ckpt = save_checkpoint(tmp_path, TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True))[0]
    (ckpt / "training_args.bin").unlink()
    with pytest.raises(ValueError, match="training_args.bin: not found"):
        fp.read_trainer_checkpoint(ckpt)
    (ckpt / "optimizer.pt").unlink()
    with pytest.raises(ValueError, match="no optimizer.pt"):
        fp.read_trainer_checkpoint(ckpt)
