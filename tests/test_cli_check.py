"""`--first-order` of `demo` and `run` (cli_check): option errors before any work, the exact next
step against torch's own AdamW step, the EOS id read from the model directory, and the demo's
realized entropy change against its prediction on the embedded tiny model."""

import json
import math

import pytest
import torch
from helpers import assert_usage_error, dict_rel_err, random_rollouts, run_args, torch_step_delta

import functional_probe as fp
from functional_probe.cli import main
from functional_probe.cli_check import eos_token_ids, exact_step


@pytest.mark.parametrize(("option", "value", "needle"), [
    ("--scales", "0.5,-1", "--scales '0.5,-1': '-1' is not a finite number > 0"),
    ("--scales", "0.5,x", "'x' is not a finite number > 0"), ("--scales", "nan", "'nan' is not"),
    ("--check-samples", "1", "--check-samples 1: expected an integer >= 2"),
])  # fmt: skip
def test_bad_check_options_exit_2_before_any_work(saved_run, tmp_path, capsys, no_model_load, monkeypatch, option,
                                                  value, needle):  # fmt: skip
    monkeypatch.setattr("functional_probe.model.tiny_model", no_model_load)
    assert_usage_error(["demo", "--first-order", option, value], capsys, needle)
    assert_usage_error(run_args(saved_run, tmp_path) + ["--first-order", option, value], capsys, needle)


def test_exact_step_is_the_step_adamw_takes_next(tiny_fp32):
    """Δθ for p.grad = −mean ∇Ly over U, from the optimizer's state (two steps of momentum, weight
    decay), against torch's AdamW stepping a copy of the optimizer."""
    model = tiny_fp32
    prompts, responses, adv = random_rollouts(4, 3, model.vocab_size, seed=5)
    U = fp.make_batch(prompts, responses, advantages=adv)
    params = {k: torch.nn.Parameter(v.clone()) for k, v in model.lora.items()}
    opt = torch.optim.AdamW(params.values(), lr=1e-2, weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        for p in params.values():
            p.grad = torch.randn(p.shape, generator=gen) * 0.01
        opt.step()
    theta = {k: p.detach().clone() for k, p in params.items()}
    step = exact_step(model, theta, U, fp.AdamState.from_optimizer(opt, params), lr=None)
    g = fp.mean_grad(model, theta, U, loss="y")
    assert dict_rel_err(step, torch_step_delta(opt, params, {k: -v for k, v in g.items()}, theta)) < 1e-5
    assert max(float(v.abs().max()) for v in step.values()) > 1e-4


def test_eos_id_from_generation_config_before_config(tmp_path):
    assert eos_token_ids(tmp_path) is None
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 2}))
    assert eos_token_ids(tmp_path) == 2
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 2]}))
    assert eos_token_ids(tmp_path) == [7, 2]


def test_demo_first_order_realized_change_agrees_with_the_prediction(tmp_path, capsys):
    """On the embedded tiny model: at the smallest scale whose realized change (rb: full-softmax
    token entropies on fresh coupled samples) is resolved at 2 SE, it has the probe's sign and lies
    within 3 combined SEs of s·δH₁ (the probe's X loss on E: independent draws)."""
    out = tmp_path / "r.json"
    argv = ["demo", "--quiet", "--prompts", "32", "--check-samples", "32", "--scales", "0.25,0.5,1,2",
            "--first-order", "--device", "cpu", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "<- probed step" in text and "first-order verdict: " in text and "fresh responses per prompt" in text
    got = json.loads(out.read_text())
    points = got["entropy_check"]["points"]
    resolved = [p for p in points if abs(p["realized"]["rb"]) > 2 * p["realized_se"]["rb"]]
    assert resolved, points
    p = resolved[0]
    assert p["realized"]["rb"] * p["predicted"] > 0, p
    assert abs(p["realized"]["rb"] - p["predicted"]) < 3 * math.hypot(p["realized_se"]["rb"], p["predicted_se"]), p
    assert (tmp_path / "r.first_order.png").is_file()
