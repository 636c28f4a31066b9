"""`run --checkpoint CKPT --rollouts U --eval E` against the step a real GRPOTrainer checkpoint takes.

A real tiny GRPOTrainer (CPU, PEFT LoRA, in-memory tokenizer, length reward, no network) trains
2 steps and saves checkpoint-2/. The reference next step is built independently of the library:
the PEFT model loaded from the checkpoint, a torch AdamW loaded from its optimizer.pt (the
Trainer's two param groups), p.grad from TRL's own `compute_loss` on the rollouts' rows (one
backward per micro-batch), clip_grad_norm_, `optimizer.step()`; Δθ is read off the parameters.
The CLI's δH₁ must equal <μX, Δθ> (μX = mean X gradient of E at TRL's temperature), and for a
tiny lr the X surrogate's realized change along Δθ (float64).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_trl_loss import peft_llama, tokenizer, trl_inputs

import functional_probe as fp
from functional_probe.cli import main
from functional_probe.losses import x_losses
from functional_probe.trainer_checkpoint import read_trainer_checkpoint

trl = pytest.importorskip("trl")

CONFIG = dict(loss_type="grpo", temperature=0.8, beta=0.04, scale_rewards="group", max_completion_length=6,
              per_device_train_batch_size=4, num_generations=4, gradient_accumulation_steps=2, learning_rate=5e-3,
              max_grad_norm=0.5, weight_decay=0.1)  # fmt: skip
PROMPTS, G = 2, 4  # the rollouts: one optimizer step = 4 × 2 = 8 rows = 2 prompts × 4 completions


def grpo_args(out, **over):
    return trl.GRPOConfig(output_dir=str(out), report_to=[], use_cpu=True, bf16=False, save_strategy="steps",
                          save_steps=2, max_steps=4, logging_steps=1, seed=0, gradient_checkpointing=False,
                          **(CONFIG | over))  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(base model dir, checkpoint-2 dir): the base saved before LoRA, then 2 GRPO steps."""
    from datasets import Dataset

    root = tmp_path_factory.mktemp("grpo")
    model = peft_llama(seed=0)
    base_dir = root / "base"
    base = model.get_base_model()  # the base weights without the LoRA layers' names and factors
    plain = {k.replace(".base_layer", ""): v for k, v in base.state_dict().items() if "lora_" not in k}
    base.save_pretrained(base_dir, state_dict=plain)
    tokenizer().save_pretrained(base_dir)
    trainer = trl.GRPOTrainer(model=model, reward_funcs=lambda completions, **kw: [float(len(c)) for c in completions],
                              args=grpo_args(root / "run"), processing_class=tokenizer(),
                              train_dataset=Dataset.from_dict({"prompt": ["t5 t6 t7", "t8 t9"] * 8}))  # fmt: skip
    trainer.train()
    return base_dir, root / "run" / "checkpoint-2"


def rollouts(vocab: int, seed: int, rewards: bool):
    """PROMPTS lines of G completions (no EOS: plain ids 3..vocab-1), with raw rewards for U."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=gen))  # noqa: E731
    lines = []
    for _ in range(PROMPTS):
        line = {"prompt": torch.randint(3, vocab, (rand(2, 4),), generator=gen).tolist(),
                "responses": [torch.randint(3, vocab, (rand(1, 6),), generator=gen).tolist() for _ in range(G)]}  # fmt: skip
        if rewards:
            line["rewards"] = torch.randn(G, generator=gen).tolist()
        lines.append(line)
    return lines


def write(path, lines) -> str:
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return str(path)


def reference_step(base_dir, ckpt, U_lines, *, lr=None, dtype=torch.float32):
    """Δθ of the real trainer machinery: PEFT model + torch AdamW from optimizer.pt, TRL's compute_loss."""
    from datasets import Dataset
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    model = PeftModel.from_pretrained(base, ckpt, is_trainable=True)
    args = grpo_args(ckpt.parent / "ref")
    trainer = trl.GRPOTrainer(model=model, reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                              args=args, processing_class=tokenizer(),
                              train_dataset=Dataset.from_dict({"prompt": ["t5"] * 4}))  # fmt: skip
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = args.gradient_accumulation_steps
    params = [(n, p) for n, p in trainer.model.named_parameters() if p.requires_grad]
    opt = torch.optim.AdamW([{"params": [p for _, p in params], "weight_decay": args.weight_decay},
                             {"params": [], "weight_decay": 0.0}], lr=args.learning_rate)  # fmt: skip
    opt.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
    if lr is not None:
        for g in opt.param_groups:
            g["lr"] = lr
    loss = fp.TrainerLoss.from_config(args)
    prompts = [x["prompt"] for x in U_lines for _ in range(G)]
    rows = loss.rows(prompts, [r for x in U_lines for r in x["responses"]], [n for n in range(PROMPTS) for _ in range(G)],
                     rewards=[v for x in U_lines for v in x["rewards"]])  # fmt: skip
    opt.zero_grad()
    for mb in rows.split(args.per_device_train_batch_size):
        inputs = trl_inputs(mb) | {"ref_per_token_logps": reference_logps(trainer.model, mb, args.temperature)}
        trainer.compute_loss(trainer.model, inputs).backward()
    torch.nn.utils.clip_grad_norm_([p for _, p in params], args.max_grad_norm)
    before = {n: p.detach().clone() for n, p in params}
    opt.step()
    return {n: (p.detach() - before[n]).double() for n, p in params}


def reference_logps(peft_model, mb, tau: float):
    """Per-token log-probs [B, C] of the base model (adapter disabled, as TRL's PEFT reference), logits / τ."""
    ids = torch.cat([mb.prompt_ids, mb.completion_ids], 1)
    mask = torch.cat([mb.prompt_mask, mb.completion_mask], 1).long()
    with torch.no_grad(), peft_model.disable_adapter():
        logits = peft_model(input_ids=ids, attention_mask=mask).logits[:, mb.prompt_ids.shape[1] - 1 : -1] / tau
    return logits.float().log_softmax(-1).gather(-1, mb.completion_ids[..., None])[..., 0] * mb.completion_mask


def mean_x_and_frozen(base_dir, ckpt, E_path, dtype):
    """μX over E at TRL's temperature, and θ ↦ the X surrogate with coefficients frozen at θ."""
    model = fp.load_model(base_dir, ckpt, dtype=dtype)
    E = fp.read_rollouts(E_path).to_batch()
    tau = CONFIG["temperature"]
    mu = fp.mean_grad(model, model.lora, E, loss="x", temperature=tau)
    S0 = fp.sequence_logprobs(model, model.lora, E, temperature=tau).double()
    c = torch.func.grad(lambda S: x_losses(S, E).sum())(S0)

    def surrogate(theta):
        with torch.no_grad():
            return float((c * fp.sequence_logprobs(model, theta, E, temperature=tau).double()).sum() / E.num_prompts)

    return model, mu, surrogate


def peft_names(model, delta):
    """Reference Δθ (PEFT parameter names) keyed like the model's LoRA dict (same order)."""
    assert len(delta) == len(model.lora)
    return dict(zip(model.lora, delta.values(), strict=True))


def run_cli(tmp_path, base_dir, ckpt, U, E, *extra):
    out = tmp_path / "r.json"
    code = main(["run", "--checkpoint", str(ckpt), "--model", str(base_dir), "--rollouts", U, "--eval", E,
                 "--quiet", "--out", str(out), *extra])  # fmt: skip
    assert code == 0
    return json.loads(out.read_text())


def test_checkpoint_is_read_with_the_runs_settings(trained):
    base_dir, ckpt = trained
    c = read_trainer_checkpoint(ckpt, num_processes=1)
    assert c.step == 2 and c.max_grad_norm == 0.5 and len(c.lr) == 1  # group 1 (no decay) is empty
    assert (c.loss.loss_type, c.loss.temperature, c.loss.beta, c.loss.max_completion_length) == ("grpo", 0.8, 0.04, 6)
    assert c.loss.gradient_accumulation_steps == 2 and c.args.per_device_train_batch_size == 4
    sched = torch.load(ckpt / "scheduler.pt", weights_only=True)["_last_lr"]
    assert c.lr == [float(sched[0])] and 0 < c.lr[0] < CONFIG["learning_rate"]  # linear decay


def test_predicted_delta_h1_is_that_of_the_trainers_actual_step(trained, tmp_path):
    base_dir, ckpt = trained
    U_lines = rollouts(32, seed=1, rewards=True)
    U, E = write(tmp_path / "U.jsonl", U_lines), write(tmp_path / "E.jsonl", rollouts(32, seed=2, rewards=False))
    got = run_cli(tmp_path, base_dir, ckpt, U, E)
    model, mu_x, _ = mean_x_and_frozen(base_dir, ckpt, E, torch.float32)
    delta = peft_names(model, reference_step(base_dir, ckpt, U_lines))
    want = sum(float((mu_x[k].double() * delta[k]).sum()) for k in delta)
    norm = math.sqrt(sum(float(mu_x[k].double().square().sum()) for k in mu_x)) * math.sqrt(
        sum(float(d.square().sum()) for d in delta.values()))
    print("cli", got["delta_h1"], "reference", want, "scale", norm)
    assert got["step"] == "optimizer" and got["B_E"] == PROMPTS and got["B_U"] == PROMPTS
    assert abs(got["delta_h1"] - want) <= 1e-5 * norm, (got["delta_h1"], want, norm)
    parts = got["delta_h1_gradient"] + got["delta_h1_momentum"] + got["delta_h1_decay"]
    assert abs(parts - got["delta_h1"]) <= 1e-6 * norm  # fp32 parts
    assert got["clip_coef"] < 1.0 and got["se"] > 0 and got["V_Y"] > 0  # clipping active at max_grad_norm 0.5


def test_tiny_lr_prediction_equals_the_realized_change_float64(trained, tmp_path):
    base_dir, ckpt = trained
    U_lines = rollouts(32, seed=1, rewards=True)
    U, E = write(tmp_path / "U.jsonl", U_lines), write(tmp_path / "E.jsonl", rollouts(32, seed=2, rewards=False))
    lr = 1e-6
    got = run_cli(tmp_path, base_dir, ckpt, U, E, "--dtype", "float64", "--lr", str(lr), "--force-lr")
    model, _, surrogate = mean_x_and_frozen(base_dir, ckpt, E, torch.float64)
    delta = peft_names(model, reference_step(base_dir, ckpt, U_lines, lr=lr, dtype=torch.float64))
    realized = surrogate({k: v + delta[k] for k, v in model.lora.items()}) - surrogate(model.lora)
    print("predicted", got["delta_h1"], "realized", realized)
    assert got["eta"] == lr and abs(realized - got["delta_h1"]) <= 1e-3 * abs(got["delta_h1"])


def test_refusals_name_the_reason(trained, tmp_path, capsys):
    base_dir, ckpt = trained
    U = write(tmp_path / "U.jsonl", rollouts(32, seed=1, rewards=True))
    E = write(tmp_path / "E.jsonl", rollouts(32, seed=2, rewards=False))
    short = write(tmp_path / "short.jsonl", rollouts(32, seed=1, rewards=True)[:1])
    for extra, message in [(["--first-order"], "does not take --first-order"), (["--update", U], "does not take --update")]:
        assert main(["run", "--checkpoint", str(ckpt), "--model", str(base_dir), "--rollouts", U, "--eval", E,
                     "--quiet", *extra]) == 2  # fmt: skip
        assert message in capsys.readouterr().err
    assert main(["run", "--checkpoint", str(ckpt), "--model", str(base_dir), "--rollouts", short, "--eval", E]) == 2
    assert "4 completions, but one optimizer step of this run trains on" in capsys.readouterr().err
    assert main(["run", "--model", str(base_dir), "--rollouts", U, "--eval", E]) == 2
    assert "--rollouts needs --checkpoint" in capsys.readouterr().err
