"""The trainer loss against TRL's own: `GRPOTrainer.compute_loss` (-> `_compute_loss`) of a real
GRPOTrainer built on CPU around a tiny PEFT Llama (in-memory tokenizer, dummy reward, no network),
called on the same tensors, with the gradient read from the LoRA parameters' .grad."""

from __future__ import annotations

import tempfile

import pytest
import torch
from helpers import assert_not_trivial, dict_rel_err, rel_err

import functional_probe as fp
from functional_probe.trl_loss import (
    LOSS_TYPES,
    TrainerLoss,
    trainer_grad,
    trainer_group_grads,
    trainer_loss,
    trainer_prompt_losses,
    trainer_token_logps,
)
from functional_probe.trl_rows import TrainerRows

trl = pytest.importorskip("trl")

VOCAB, EOS, PAD = 32, 2, 0
TOL = 1e-5


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel(vocab={f"t{i}": i for i in range(VOCAB)}, unk_token="t1"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="t0", eos_token="t2", unk_token="t1")


def peft_llama(seed: int = 0):
    """A tiny random Llama with LoRA (dropout 0, both factors non-zero) on all seven projections."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=3,
    )  # fmt: skip
    torch.manual_seed(seed)
    base = LlamaForCausalLM(config)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, init_lora_weights=False)
    return get_peft_model(base, lora)


def grpo_trainer(ga: int = 1, **config):
    """A real GRPOTrainer on CPU with its own tiny PEFT model, in training mode, with the
    accumulation count its training loop would set. Its reward (text length) is recorded in
    `trainer.rewards_seen`."""
    from datasets import Dataset

    defaults = dict(per_device_train_batch_size=4, num_generations=2, max_completion_length=8)
    args = trl.GRPOConfig(
        output_dir=tempfile.mkdtemp(), report_to=[], use_cpu=True, bf16=False, gradient_checkpointing=False,
        save_strategy="no", gradient_accumulation_steps=ga, **(defaults | config),
    )  # fmt: skip
    seen = []

    def reward(completions, **kw):
        seen.append([float(len(c)) for c in completions])
        return seen[-1]

    trainer = trl.GRPOTrainer(
        model=peft_llama(), reward_funcs=reward, args=args,
        train_dataset=Dataset.from_dict({"prompt": ["t5 t6 t7"] * 8}), processing_class=tokenizer(),
    )  # fmt: skip
    trainer.rewards_seen = seen
    trainer.current_gradient_accumulation_steps = ga
    trainer.model.train()
    return trainer


def trl_inputs(rows: TrainerRows) -> dict:
    """The dict TRL's loss receives, from our rows (masks as TRL's long tensors)."""
    out = {
        "prompt_ids": rows.prompt_ids, "prompt_mask": rows.prompt_mask.long(),
        "completion_ids": rows.completion_ids, "completion_mask": rows.completion_mask.long(),
        "advantages": rows.advantages, "num_items_in_batch": torch.tensor(rows.num_items_in_batch),
    }  # fmt: skip
    if rows.old_logps is not None:
        out["old_per_token_logps"] = rows.old_logps
    if rows.ref_logps is not None:
        out["ref_per_token_logps"] = rows.ref_logps
    return out


def trl_step(trainer, micro_batches: list[TrainerRows]) -> tuple[list[float], dict]:
    """TRL's loss per micro-batch and the LoRA .grad after backward on each (one accumulation window)."""
    model = trainer.model
    model.zero_grad(set_to_none=True)
    losses = []
    for mb in micro_batches:
        loss = trainer.compute_loss(model, trl_inputs(mb))
        loss.backward()
        losses.append(loss.item())
    return losses, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


GROUP_SIZES = (3, 1, 4, 2)  # unequal groups: 10 rows


def random_rows(loss: TrainerLoss, model, *, seed: int = 0, old_noise: float = 0.0, ref_noise: float = 0.0,
                truncated: list[int] = ()) -> TrainerRows:  # fmt: skip
    """A generation batch of ragged prompts/completions in TRL's layout, shuffled as TRL shuffles;
    advantages from random rewards; old / ref log-probs = current ones + noise (data for the loss)."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=gen))  # noqa: E731
    prompts, completions, group = [], [], []
    for n, size in enumerate(GROUP_SIZES):
        prompt = torch.randint(3, VOCAB, (rand(1, 5),), generator=gen).tolist()
        for _ in range(size):
            prompts.append(prompt)
            completions.append(torch.randint(3, VOCAB, (rand(1, loss.max_completion_length),), generator=gen).tolist())
            group.append(n)
    perm = torch.randperm(len(group), generator=gen).tolist()
    prompts, completions, group = ([x[i] for i in perm] for x in (prompts, completions, group))
    rewards = torch.randn(len(group), generator=gen)
    flags = torch.zeros(len(group), dtype=torch.bool)
    flags[list(truncated)] = True
    rows = loss.rows(prompts, completions, group, rewards=rewards, truncated=flags)
    with torch.no_grad():
        logp = trainer_token_logps(model, model.lora, rows.prompt_ids, rows.prompt_mask, rows.completion_ids,
                                   rows.completion_mask, temperature=loss.temperature)  # fmt: skip
    noise = lambda s: (logp + s * torch.randn(logp.shape, generator=gen)) * rows.completion_mask  # noqa: E731
    return TrainerRows(**{**vars(rows), "old_logps": noise(old_noise) if old_noise else None,
                          "ref_logps": noise(ref_noise) if ref_noise else None})  # fmt: skip


def compare(loss: TrainerLoss, trainer, rows: TrainerRows, micro: int = 4):
    """Our loss per micro-batch and step gradient against TRL's on the same tensors (1e-5)."""
    model = fp.from_peft(trainer.model)
    mbs = rows.split(micro)
    ref_losses, ref_grad = trl_step(trainer, mbs)
    ours = [trainer_loss(model, model.lora, mb, loss).item() for mb in mbs]
    g = trainer_grad(model, model.lora, mbs, loss)
    assert_not_trivial(ref_grad)
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(ref_losses), rtol=TOL, atol=TOL * max(map(abs, ref_losses)))
    assert dict_rel_err(g, ref_grad) < TOL
    return model, mbs, g


def config_of(trainer, **over) -> TrainerLoss:
    return TrainerLoss.from_config(trainer.args, **over)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_each_loss_type_matches_trl_with_temperature_and_accumulation(loss_type):
    """On-policy, temperature 0.7, GA = 3 (three micro-batches of a shuffled 10-row batch)."""
    level = "sequence" if loss_type == "luspo" else "token"
    trainer = grpo_trainer(ga=3, loss_type=loss_type, temperature=0.7, importance_sampling_level=level)
    loss = config_of(trainer)
    assert (loss.loss_type, loss.temperature, loss.gradient_accumulation_steps) == (loss_type, 0.7, 3)
    model = fp.from_peft(trainer.model)
    compare(loss, trainer, random_rows(loss, model), micro=4)


@pytest.mark.parametrize(
    "loss_type, options",
    [("grpo", {}), ("bnpo", {"delta": 1.3}), ("dr_grpo", {"epsilon_high": 0.28}), ("dapo", {}),
     ("cispo", {"epsilon_high": 1.1}), ("sapo", {}), ("luspo", {"importance_sampling_level": "sequence"}),
     ("vespo", {}), ("grpo", {"importance_sampling_level": "sequence"}), ("dapo", {"steps_per_generation": 4})],
)  # fmt: skip
def test_off_policy_ratio_and_clipping_match_trl(loss_type, options):
    """num_iterations = 2 with old log-probs far enough from the current ones that clipping is active."""
    trainer = grpo_trainer(ga=2, loss_type=loss_type, num_iterations=2, **options)
    loss = config_of(trainer)
    assert loss.needs_old_logps
    model = fp.from_peft(trainer.model)
    rows = random_rows(loss, model, seed=1, old_noise=0.3)
    with torch.no_grad():
        logp = trainer_token_logps(model, model.lora, rows.prompt_ids, rows.prompt_mask, rows.completion_ids,
                                   rows.completion_mask, temperature=loss.temperature)  # fmt: skip
    ratio = (logp - rows.old_logps).exp()[rows.completion_mask]
    outside = (ratio < 1 - loss.eps_low) | (ratio > 1 + loss.eps_high)
    assert 0.1 < outside.float().mean() < 0.9, "clipping should be active on some tokens, not all"
    compare(loss, trainer, rows, micro=5)


@pytest.mark.parametrize("loss_type, bias_correction", [("grpo", False), ("dapo", True), ("dr_grpo", False)])
def test_kl_term_with_reference_logps_matches_trl(loss_type, bias_correction):
    kw = dict(num_iterations=2) if bias_correction else {}
    trainer = grpo_trainer(loss_type=loss_type, beta=0.04, use_bias_correction_kl=bias_correction, **kw)
    loss = config_of(trainer)
    model = fp.from_peft(trainer.model)
    rows = random_rows(loss, model, seed=2, ref_noise=0.5, old_noise=0.2 if bias_correction else 0.0)
    no_kl = TrainerLoss(**{**vars(loss), "beta": 0.0})
    g_kl = trainer_grad(model, model.lora, rows.split(5), loss)
    g_no = trainer_grad(model, model.lora, rows.split(5), no_kl)
    assert dict_rel_err(g_no, g_kl) > 1e-2, "the KL term should change the gradient"
    compare(loss, trainer, rows, micro=5)


def test_masked_truncated_completions_get_zero_weight_like_trl():
    trainer = grpo_trainer(loss_type="grpo", mask_truncated_completions=True)
    loss = config_of(trainer)
    model = fp.from_peft(trainer.model)
    rows = random_rows(loss, model, seed=3, truncated=[0, 4, 7])
    assert rows.lengths[[0, 4, 7]].eq(0).all() and rows.lengths.gt(0).sum() == 7
    assert rows.num_items_in_batch == int(rows.lengths.sum())
    compare(loss, trainer, rows, micro=4)
    # zero weight: the same gradient as with those rows' advantages zeroed
    zeroed = TrainerRows(**{**vars(rows), "advantages": rows.advantages.index_fill(0, torch.tensor([0, 4, 7]), 0)})
    a, b = (trainer_grad(model, model.lora, r.split(4), loss) for r in (rows, zeroed))
    assert dict_rel_err(a, b) < 1e-6


def test_group_decomposition_sums_to_step_and_matches_trl_per_group():
    """Per-prompt gradients (unequal groups, spread over micro-batches): each equals TRL's gradient
    with every other group's advantages zeroed (beta = 0: the loss is linear in A), and they sum to
    the step gradient; per-prompt losses sum to the step loss."""
    trainer = grpo_trainer(ga=3, loss_type="bnpo", num_iterations=2)
    loss = config_of(trainer)
    model = fp.from_peft(trainer.model)
    rows = random_rows(loss, model, seed=4, old_noise=0.3)
    mbs = rows.split(4)
    per_group = trainer_group_grads(model, model.lora, mbs, loss)
    step = trainer_grad(model, model.lora, mbs, loss)
    assert dict_rel_err({k: v.sum(0) for k, v in per_group.items()}, step) < TOL
    L = trainer_prompt_losses(model, model.lora, mbs, loss)
    assert L.shape == (len(GROUP_SIZES),)
    torch.testing.assert_close(L.sum(), sum(trainer_loss(model, model.lora, mb, loss) for mb in mbs))
    g2 = torch.func.grad(lambda p: trainer_prompt_losses(model, p, mbs, loss)[2])(model.lora)  # pure in lora
    assert dict_rel_err(g2, {k: v[2] for k, v in per_group.items()}) < TOL
    for n in range(len(GROUP_SIZES)):
        only_n = [TrainerRows(**{**vars(mb), "advantages": torch.where(mb.group == n, mb.advantages, 0.0)})
                  for mb in mbs]  # fmt: skip
        _, ref = trl_step(trainer, only_n)
        ours = {k: v[n] for k, v in per_group.items()}
        if GROUP_SIZES[n] == 1:  # a group of one has advantage 0 (TRL's too): no gradient
            assert all(v.abs().max() < 1e-9 for d in (ours, ref) for v in d.values())
            continue
        assert_not_trivial(ref)
        assert dict_rel_err(ours, ref) < TOL


class TwoProcesses:
    """TRL's accelerator as seen by one of two data-parallel ranks: `num_processes` = 2; the
    reductions TRL uses for its metrics stay local (they do not enter the loss)."""

    def __init__(self, accelerator):
        self._acc = accelerator
        self.num_processes = 2

    def __getattr__(self, name):
        return getattr(self._acc, name)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_two_processes_average_like_ddp(loss_type):
    """Rank r runs TRL's loss on its micro-batches with num_processes = 2; DDP averages the ranks'
    gradients. Ours on all ranks' micro-batches with num_processes = 2 equals that average."""
    trainer = grpo_trainer(ga=2, loss_type=loss_type)
    trainer.accelerator = TwoProcesses(trainer.accelerator)
    loss = config_of(trainer, num_processes=2)
    model = fp.from_peft(trainer.model)
    mbs = random_rows(loss, model, seed=5).split(3)  # 4 micro-batches: rank 0 gets two, rank 1 two
    grads = [trl_step(trainer, mbs[r::2])[1] for r in range(2)]
    ddp = {k: (grads[0][k] + grads[1][k]) / 2 for k in grads[0]}
    assert dict_rel_err(trainer_grad(model, model.lora, mbs, loss), ddp) < TOL


# --------------------------------------------------------------------- TRL's own batches


# --------------------------------------------------------------------- configuration and errors


def test_bad_options_and_rows_raise_naming_the_item(tiny_fp32):
    with pytest.raises(ValueError, match="loss_type='ppo'.*grpo"):
        TrainerLoss(loss_type="ppo")
    with pytest.raises(ValueError, match="temperature"):
        TrainerLoss(temperature=0.0)
    model = tiny_fp32
    loss = TrainerLoss(loss_type="grpo", max_completion_length=6)
    rows = loss.rows([[5, 6], [7]], [[8, 9, 10], [11]], [0, 0], advantages=[1.0, -1.0])
    with pytest.raises(ValueError, match="needs ref_logps"):
        trainer_loss(model, model.lora, rows, TrainerLoss(loss_type="grpo", beta=0.1))
    with pytest.raises(ValueError, match="needs old_logps"):
        trainer_loss(model, model.lora, rows, TrainerLoss(loss_type="grpo", num_iterations=2))
    with pytest.raises(ValueError, match="max_completion_length=2"):
        trainer_loss(model, model.lora, rows, TrainerLoss(loss_type="grpo", max_completion_length=2))
    with pytest.raises(ValueError, match="row 1: the completion is empty"):
        loss.rows([[5], [7]], [[8], []], [0, 0], advantages=[1.0, -1.0])
    with pytest.raises(ValueError, match="advantages.*row 1"):
        loss.rows([[5], [7]], [[8], [9]], [0, 0], advantages=[1.0, float("nan")])
    with pytest.raises(ValueError, match="tool_mask"):
        TrainerRows.from_inputs({**trl_inputs(rows), "tool_mask": rows.completion_mask}, [0, 0])
    far = loss.rows([[5], [7]], [[8], [9999]], [0, 0], advantages=[1.0, -1.0])
    with pytest.raises(ValueError, match="row 1: token id 9999"):
        trainer_loss(model, model.lora, far, loss)
    with pytest.raises(ValueError, match="num_groups"):
        trainer_prompt_losses(model, model.lora, rows, loss, num_groups=0)


def test_token_logps_equal_a_peft_forward_like_trls(tiny_fp32):
    """Per-token log-probs equal the PEFT model's forward as TRL calls it (no position ids, so
    transformers counts positions over the left-padded row), logits / τ, zero on masked tokens."""
    from functional_probe.testing import peft_twin

    model, tau = tiny_fp32, 0.6
    rows = TrainerLoss().rows([[5, 6, 7], [8]], [[9, 10], [11, 12, 13]], [0, 1], advantages=[1.0, 1.0])
    ours = trainer_token_logps(model, model.lora, rows.prompt_ids, rows.prompt_mask, rows.completion_ids,
                               rows.completion_mask, temperature=tau)  # fmt: skip
    ids = torch.cat([rows.prompt_ids, rows.completion_ids], 1)
    mask = torch.cat([rows.prompt_mask, rows.completion_mask], 1).long()
    with torch.no_grad():
        logits = peft_twin(model)(input_ids=ids, attention_mask=mask).logits[:, 2:-1] / tau
    ref = logits.log_softmax(-1).gather(-1, rows.completion_ids[..., None])[..., 0] * rows.completion_mask
    assert ref[0, 2] == 0 and ref.abs().min() < ref.abs().max()
    assert rel_err(ours, ref) < 1e-5
