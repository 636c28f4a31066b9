"""TrainerLoss.from_config: a real GRPOConfig read into the loss's options, and the options it cannot
express refused by name."""

from __future__ import annotations

import tempfile
from types import SimpleNamespace

import pytest

from functional_probe.trl_config import TrainerLoss

trl = pytest.importorskip("trl")


def test_from_config_reads_grpo_config_and_refuses_what_it_cannot_express():
    args = trl.GRPOConfig(output_dir=tempfile.mkdtemp(), report_to=[], use_cpu=True, loss_type="dr_grpo",
                          max_completion_length=17, temperature=0.9, beta=0.1, epsilon_high=0.3,
                          gradient_accumulation_steps=4, scale_rewards=False, num_iterations=3,
                          per_device_train_batch_size=2, num_generations=2)  # fmt: skip
    with pytest.warns(UserWarning, match="bf16=True"):  # GRPOConfig's default: TRL autocasts its loss
        loss = TrainerLoss.from_config(args)
    assert (loss.loss_type, loss.max_completion_length, loss.temperature, loss.beta) == ("dr_grpo", 17, 0.9, 0.1)
    assert (loss.eps_low, loss.eps_high, loss.scale_rewards) == (0.2, 0.3, "none")
    assert (loss.gradient_accumulation_steps, loss.spg, loss.num_iterations, loss.num_processes) == (4, 4, 3, 1)
    for option, value in (("top_entropy_quantile", 0.5), ("entropy_coef", 0.01), ("off_policy_mask_threshold", 0.5)):
        bad = SimpleNamespace(**{**vars(args), option: value})
        with pytest.raises(ValueError, match=option):
            TrainerLoss.from_config(bad)
