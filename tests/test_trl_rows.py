"""TrainerRows and TRL's advantages: rows rebuilt from a real GRPOTrainer's generation and its shuffled
micro-batches, and advantages of unequal groups, against TRL's own tensors and a per-group loop."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_not_trivial, dict_rel_err
from test_trl_loss import EOS, PAD, TOL, config_of, grpo_trainer, trl_step

import functional_probe as fp
from functional_probe.trl_loss import trainer_grad, trainer_loss
from functional_probe.trl_rows import TrainerRows, micro_batches_from_inputs, trl_advantages


@pytest.mark.parametrize("scale_rewards", ["group", "batch", "none"])
def test_rows_and_advantages_from_trl_generation_equal_trls(scale_rewards):
    """TRL generates and scores a batch (real `_generate_and_score_completions`, truncation masked);
    rebuilding rows from its token lists and rewards gives TRL's tensors, advantages and
    num_items_in_batch; the loss from `TrainerRows.from_inputs` matches TRL's."""
    trainer = grpo_trainer(loss_type="dapo", scale_rewards=scale_rewards, mask_truncated_completions=True,
                           num_generations=4, per_device_train_batch_size=8)  # fmt: skip
    loss = config_of(trainer)
    prompts = ["t5 t6 t7", "t8 t9"]
    torch.manual_seed(0)
    out = trainer._generate_and_score_completions([{"prompt": p} for p in prompts for _ in range(4)])
    group = torch.arange(2).repeat_interleave(4)
    prompt_lists = [ids[m.bool()].tolist() for ids, m in zip(out["prompt_ids"], out["prompt_mask"], strict=True)]
    completions, truncated = [], []
    for ids in out["completion_ids"]:  # TRL's completion lists: cut after the first EOS
        ids = ids.tolist()
        cut = ids.index(EOS) + 1 if EOS in ids else len(ids)
        completions.append(ids[:cut])
        truncated.append(ids[cut - 1] not in (EOS, PAD))
    assert 0 < sum(truncated) < len(truncated), "need truncated and finished completions"
    rewards = torch.tensor(trainer.rewards_seen[-1])
    rows = loss.rows(prompt_lists, completions, group, rewards=rewards, truncated=truncated)
    for name in ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask"):
        assert torch.equal(getattr(rows, name).long(), out[name].long()[:, : getattr(rows, name).shape[1]]), name
    assert rows.num_items_in_batch == int(out["num_items_in_batch"])
    torch.testing.assert_close(rows.advantages, out["advantages"], rtol=1e-5, atol=1e-5)
    if scale_rewards != "none":
        assert rows.advantages.abs().max() > 0.1
    model = fp.from_peft(trainer.model)
    from_trl = TrainerRows.from_inputs(out, group)
    ref_losses, ref_grad = trl_step(trainer, [from_trl])
    torch.testing.assert_close(trainer_loss(model, model.lora, from_trl, loss).item(), ref_losses[0], rtol=TOL, atol=1e-7)
    assert dict_rel_err(trainer_grad(model, model.lora, from_trl, loss), ref_grad) < TOL


def test_micro_batches_from_trls_shuffled_split_recover_groups_and_the_step():
    """TRL's own shuffle and split of a generated batch (as `_prepare_inputs` does): groups are
    recovered from the prompts, and the step over the micro-batches equals TRL's .grad."""
    from trl.trainer.utils import shuffle_sequence_dict, split_tensor_dict

    trainer = grpo_trainer(ga=2, loss_type="grpo", num_generations=3, per_device_train_batch_size=3)
    loss = config_of(trainer)
    prompts = ["t5 t6 t7", "t8 t9"]
    torch.manual_seed(1)
    out = trainer._generate_and_score_completions([{"prompt": p} for p in prompts for _ in range(3)])
    out["row"] = torch.arange(6)  # to check the recovered groups against the generation order
    mbs_in = split_tensor_dict(shuffle_sequence_dict(out), 2)
    mbs = micro_batches_from_inputs([{k: v for k, v in mb.items() if k != "row"} for mb in mbs_in])
    rows_of = torch.cat([mb["row"] for mb in mbs_in]) // 3  # the prompt of each row, in split order
    groups = torch.cat([mb.group for mb in mbs])
    assert all(len(set(groups[rows_of == p].tolist())) == 1 for p in range(2)) and len(set(groups.tolist())) == 2
    model = fp.from_peft(trainer.model)
    _, ref = trl_step(trainer, mbs)
    assert_not_trivial(ref)
    assert dict_rel_err(trainer_grad(model, model.lora, mbs, loss), ref) < TOL


def test_advantages_with_unequal_groups_and_unscorable_rewards_equal_a_per_group_loop():
    group = torch.tensor([0, 1, 0, 2, 1, 0, 2, 2, 3])
    rewards = torch.tensor([1.0, 2.0, 0.5, float("nan"), 4.0, -1.0, 3.0, 0.0, 7.0])
    for scale in ("group", "batch", "none"):
        got = trl_advantages(rewards, group, scale)
        valid = ~rewards.isnan()
        batch_std = rewards[valid].double().std()
        for i in range(len(group)):
            members = rewards[(group == group[i]) & valid].double()
            if rewards[i].isnan():
                expected = 0.0
            else:
                std = {"group": members.std() if len(members) > 1 else 0.0, "batch": batch_std, "none": None}[scale]
                centred = float(rewards[i]) - float(members.mean())
                expected = centred if std is None else centred / (float(std) + 1e-4)
            assert abs(float(got[i]) - expected) < 1e-5 * max(1.0, abs(expected)), (scale, i)
    assert float(trl_advantages(rewards, group, "group")[8]) == 0.0  # a group of one
