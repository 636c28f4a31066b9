"""EntropyProbeCallback inside a real GRPOTrainer loop (CPU, tiny PEFT Llama, in-memory tokenizer,
length reward, no network). An independent recorder callback snapshots the LoRA parameters and
their .grad around every optimizer step; the probe's TRL gradient (times its clipping factor) must
equal the trainer's p.grad and its predicted Δθ the parameters' actual change, per loss type."""

from __future__ import annotations

import tempfile

import pytest
import torch
from helpers import assert_not_trivial, dict_rel_err
from test_trl_loss import peft_llama, tokenizer

from functional_probe.integrations.trl import EntropyProbeCallback

trl = pytest.importorskip("trl")
from transformers import TrainerCallback  # noqa: E402

TOL = 1e-5
KEYS = ("delta_h1", "se", "realized", "realized_se", "realized_crn", "realized_crn_se", "grad_rel_err",
        "step_rel_err", "seconds_predict", "seconds_realized")  # fmt: skip


class Recorder(TrainerCallback):
    """p.grad (after clipping) and θ before, θ after each optimizer step, by parameter name."""

    def __init__(self):
        self.grads, self.before, self.after = [], [], []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.grads.append({n: p.grad.detach().clone() for n, p in lora.items()})
        self.before.append({n: p.detach().clone() for n, p in lora.items()})

    def on_optimizer_step(self, args, state, control, model=None, **kw):
        self.after.append({n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad})


def whole_rel_err(a: dict, b: dict) -> float:
    num = sum(float((a[k].double() - b[k].double()).square().sum()) for k in b)
    return (num / sum(float(b[k].double().square().sum()) for k in b)) ** 0.5


def train(loss_type: str, *, steps: int = 2, ga: int = 2, max_grad_norm: float = 1.0, dtype=torch.float64,
          model=None, **config):
    """A GRPOTrainer run with the callback and the recorder, on a float64 model by default.

    Steps are compared as whole dicts (‖Δθ_pred − Δθ‖/‖Δθ‖), not tensor by tensor: near the first
    steps Adam maps g to about g/(|g| + ε), so an element with |g| ~ 10ε turns a ~1e-9 difference in
    the gradient into a step difference of ~lr·δg/ε. The reference's gradient is not exact even in
    float64 (transformers computes rotary cos/sin in fp32: our gradient and the trainer's agree to
    ~5e-7), which gave 2.2e-5 in one float64 tensor (bnpo, g = −1.163e-7 vs ours −1.168e-7) and
    6.8e-5 in fp32, while the whole steps agree to ≤ 5.5e-6."""
    from datasets import Dataset

    args = trl.GRPOConfig(
        output_dir=tempfile.mkdtemp(), report_to=[], use_cpu=True, bf16=False, save_strategy="no",
        per_device_train_batch_size=4, num_generations=2, max_completion_length=6, gradient_accumulation_steps=ga,
        max_steps=steps, logging_steps=1, learning_rate=3e-3, max_grad_norm=max_grad_norm, loss_type=loss_type,
        seed=0, **config,
    )  # fmt: skip
    recorder = Recorder()
    prompts = ["t5 t6 t7", "t8 t9", "t10 t11 t12 t13", "t14"] * 4
    trainer = trl.GRPOTrainer(
        model=peft_llama().to(dtype) if model is None else model, reward_funcs=lambda completions, **kw: [float(len(c)) for c in completions], args=args,
        train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tokenizer(), callbacks=[recorder],
    )  # fmt: skip
    probe = EntropyProbeCallback(every=1, eval_generations=2).attach(trainer)
    trainer.train()
    return trainer, probe, recorder


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_prediction_is_the_trainers_own_gradient_and_step(loss_type):
    trainer, probe, rec = train(loss_type)
    assert len(probe.history) == len(rec.grads) == 2
    for i, h in enumerate(probe.history):
        clipped = {k: h.probe.result.clip_coef * v for k, v in h.probe.grad.items()}
        assert_not_trivial(rec.grads[i])
        assert dict_rel_err(clipped, rec.grads[i]) < TOL
        taken = {k: rec.after[i][k].double() - rec.before[i][k].double() for k in rec.before[i]}
        assert_not_trivial(taken)
        assert whole_rel_err(h.probe.delta, taken) < TOL
    logged = [e for e in trainer.state.log_history if "entropy_probe/delta_h1" in e]
    assert [e["step"] for e in logged] == [1, 2]
    for e in logged:
        assert all(f"entropy_probe/{k}" in e for k in KEYS)
        assert e["entropy_probe/grad_rel_err"] < TOL and e["entropy_probe/step_rel_err"] < TOL
        assert e["entropy_probe/se"] > 0 and e["entropy_probe/realized_se"] > 0


def test_gradient_accumulation_and_clipping_that_binds():
    """GA = 3 and a max_grad_norm small enough that clipping acts (clip_coef < 1)."""
    trainer, probe, rec = train("dr_grpo", steps=1, ga=3, max_grad_norm=1e-3)
    (h,) = probe.history
    assert h.probe.result.clip_coef < 1
    assert dict_rel_err({k: h.probe.result.clip_coef * v for k, v in h.probe.grad.items()}, rec.grads[0]) < TOL


def test_realized_check_draws_fresh_responses_not_es(monkeypatch):
    """The realized ΔH's responses at θ are new draws: were they E's own (the same seed), the check
    would reuse the prediction's data instead of testing it."""
    import functional_probe.realized as realized

    drawn, original = [], realized.sample
    monkeypatch.setattr(realized, "sample", lambda *a, **k: drawn.append(original(*a, **k)) or drawn[-1])
    trainer, probe, rec = train("grpo", steps=1, ga=1)
    (h,) = probe.history
    at_theta = drawn[0].responses()  # realized_entropy_change draws θ's responses first
    assert len(at_theta) == len(h.samples.responses()) and at_theta != h.samples.responses()


def test_bad_arguments_and_a_callback_without_attach():
    with pytest.raises(ValueError, match="every=0"):
        EntropyProbeCallback(every=0)
    with pytest.raises(ValueError, match="eval_generations=1"):
        EntropyProbeCallback(eval_generations=1)
    with pytest.raises(ValueError, match="needs attach"):
        EntropyProbeCallback().on_step_begin(None, type("S", (), {"global_step": 0})(), None)


def test_fp32_run_predicts_the_step_to_rounding():
    """fp32 model (GRPOConfig bf16=False): whole-step relative errors, bounded by the rounding above."""
    trainer, probe, rec = train("dapo", dtype=torch.float32)
    for h in probe.history:
        assert h.logs["grad_rel_err"] < 1e-5
        assert h.logs["step_rel_err"] < 1e-4


def test_bf16_model_runs_and_says_how_close_it_is():
    """The whole PeftModel in bf16: the probe computes in bf16 (log-probs and losses in fp32), TRL's
    backward in its own bf16; the logged grad_rel_err reports the gap (bf16 rounding, percent-level)
    and every logged value is finite."""
    import math

    trainer, probe, rec = train("dr_grpo", steps=1, dtype=torch.bfloat16)
    (h,) = probe.history
    assert all(math.isfinite(v) for v in h.logs.values())
    assert 0 < h.logs["grad_rel_err"] < 0.1


def test_4bit_base_inside_the_trainer(saved_tiny):
    """QLoRA: the tiny base loaded NF4 by transformers + bitsandbytes (test_from_peft's builder). TRL
    casts the LoRA factors of a quantized model to bf16 (its QLoRA recipe), so the trainer's p.grad
    is stored in bf16: the probe's gradient (same packed bytes, the same bf16 factors) matches it to
    bf16 rounding, 2^-8 = 3.9e-3 relative (measured 3.0e-3), and the logged values are finite."""
    import math

    from test_from_peft import nf4_peft

    trainer, probe, rec = train("dapo", steps=1, model=nf4_peft(saved_tiny[0]))
    (h,) = probe.history
    assert {v.dtype for v in rec.grads[0].values()} == {torch.bfloat16}
    assert_not_trivial(rec.grads[0])
    assert dict_rel_err({k: h.probe.result.clip_coef * v for k, v in h.probe.grad.items()}, rec.grads[0]) < 1e-2
    assert all(math.isfinite(v) for v in h.logs.values())
