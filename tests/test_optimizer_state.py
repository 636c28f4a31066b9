"""optimizer_state.py: states read from a file (not-a-state refused), a real transformers Trainer
checkpoint (create_optimizer's groups, the scheduler's lr), the lr check and the adapter's shapes;
readings are held against the live optimizer read by parameter identity
(AdamPreconditioner.from_optimizer). The name/position matching itself: test_optim_match.py."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainerCallback

import functional_probe as fp
from functional_probe.optimizer_state import adapter_shapes, check_lr, read_optimizer_state


def stepped_adamw(lora, order, *, lr=1e-3, named=False, steps=2):
    """AdamW over copies of the LoRA tensors, registered in `order`, after `steps` random steps."""
    params = {k: torch.nn.Parameter(lora[k].clone()) for k in order}
    opt = torch.optim.AdamW(list(params.items()) if named else list(params.values()), lr=lr)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        for p in params.values():
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    return opt, params


def layers_swapped(lora):
    """Layer 1's tensors before layer 0's: every position keeps its shape (the silent case)."""
    names = list(lora)
    return [n for n in names if ".layers.1." in n] + [n for n in names if ".layers.0." in n]


def assert_same_preconditioner(got, want):
    assert got.names == tuple(want.names) or set(got.names) == set(want.names)
    torch.testing.assert_close(got.denom, want.denom, rtol=0, atol=0)
    assert got.scale == want.scale and got.lr == want.lr


def test_not_a_state_is_refused(tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match=r"x.pt: not an optimizer.state_dict\(\)"):
        read_optimizer_state(tmp_path / "x.pt", {"a": (2,)})
    with pytest.raises(ValueError, match="nope.pt: optimizer state file not found"):
        read_optimizer_state(tmp_path / "nope.pt", {"a": (2,)})


@pytest.mark.parametrize(("lr", "force", "expected"), [(None, False, 1e-3), (1.5e-3, False, 1.5e-3),
                                                       (1e-2, True, 1e-2)])  # fmt: skip
def test_lr_is_the_states_or_close_to_it(lr, force, expected):
    assert check_lr(lr, 1e-3, force=force) == expected


@pytest.mark.parametrize(("lr", "message"), [(1e-2, "--lr 0.01 is 10x the optimizer state's lr 0.001"),
                                             (1e-5, "is 0.01x"), (0.0, "--lr=0.0: expected a finite"),
                                             (-1e-3, "expected a finite step size > 0")])  # fmt: skip
def test_lr_far_from_the_states_is_refused(lr, message):
    with pytest.raises(ValueError, match=message):
        check_lr(lr, 1e-3)


def test_adapter_shapes_are_in_the_models_order(saved_tiny):
    base_dir, adapter_dir = saved_tiny
    model = fp.load_model(base_dir, adapter_dir)
    shapes = adapter_shapes(adapter_dir)
    assert list(shapes) == list(model.lora)
    assert shapes == {k: tuple(v.shape) for k, v in model.lora.items()}
    with pytest.raises(ValueError, match="adaptr: no such adapter directory"):
        adapter_shapes(adapter_dir.parent / "adaptr")


@pytest.fixture(scope="module")
def trainer_checkpoint(tiny_fp32, tmp_path_factory):
    """A real transformers Trainer run on the PEFT twin: 2 of 4 linear-schedule steps, checkpoint-2/."""
    from transformers import Trainer, TrainingArguments

    from functional_probe.testing import peft_twin

    out = tmp_path_factory.mktemp("trainer")
    gen = torch.Generator().manual_seed(0)
    data = [{"input_ids": torch.randint(0, 512, (12,), generator=gen),
             "labels": torch.randint(0, 512, (12,), generator=gen)} for _ in range(8)]  # fmt: skip
    args = TrainingArguments(output_dir=str(out), max_steps=4, save_steps=2, per_device_train_batch_size=2,
                             learning_rate=1e-3, weight_decay=0.1, logging_steps=1, report_to=[],
                             use_cpu=True, disable_tqdm=True)  # fmt: skip
    peft_model = peft_twin(tiny_fp32).train()
    trainer = Trainer(model=peft_model, args=args, train_dataset=data)
    live = {}
    trainer.add_callback(SnapshotAtStep2(trainer, peft_model, live))
    trainer.train()
    return out / "checkpoint-2", live


class SnapshotAtStep2(TrainerCallback):
    """At the save of step 2: the live optimizer read by parameter identity, and the next lr."""

    def __init__(self, trainer, peft_model, live):
        self.trainer, self.peft_model, self.live = trainer, peft_model, live

    def on_save(self, args, state, control, **kw):
        if state.global_step == 2:
            named = {n: p for n, p in self.peft_model.named_parameters() if p.requires_grad}
            self.live["pre"] = fp.AdamPreconditioner.from_optimizer(self.trainer.optimizer, named)
            self.live["lr"] = self.trainer.lr_scheduler.get_last_lr()[0]


def test_trainer_checkpoint_is_read_in_create_optimizer_order(trainer_checkpoint):
    ckpt, live = trainer_checkpoint
    shapes = adapter_shapes(ckpt)
    state = read_optimizer_state(ckpt, shapes)
    assert state.names == list(shapes) and "Trainer.create_optimizer" in state.order
    assert state.lr == pytest.approx(live["lr"]) and state.lr == pytest.approx(5e-4)
    assert "global_step 2" in state.order
    assert_same_preconditioner(state.preconditioner(), live["pre"])


def test_trainer_checkpoint_with_other_groups_is_refused(trainer_checkpoint, tmp_path):
    ckpt, _ = trainer_checkpoint
    state = torch.load(ckpt / "optimizer.pt", weights_only=True)
    params = state["param_groups"][0]["params"]
    state["param_groups"] = [{**state["param_groups"][0], "params": params[:4]},
                             {**state["param_groups"][1], "params": params[4:]}]  # fmt: skip
    (tmp_path / "ckpt").mkdir()
    torch.save(state, tmp_path / "ckpt" / "optimizer.pt")
    with pytest.raises(ValueError, match=r"param groups of sizes \[4, 24\], but Trainer.create_optimizer"):
        read_optimizer_state(tmp_path / "ckpt", adapter_shapes(ckpt))
