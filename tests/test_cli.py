"""The command line against the Python API: the entry point in a subprocess once, `main(argv)` in
process for the rest (same parser, same exit codes, far cheaper)."""

import json
import math
import subprocess
import sys

import pytest
import torch
from helpers import assert_usage_error, run_args

import functional_probe as fp
from functional_probe.cli import main
from functional_probe.optimizer_state import save_optimizer_state
from functional_probe.probe import probe
from functional_probe.rollouts import Rollouts, read_rollouts, write_rollouts


def layers_swapped(names):
    return [n for n in names if ".layers.1." in n] + [n for n in names if ".layers.0." in n]


@pytest.fixture(scope="module")
def named_state(saved_run, tmp_path_factory):
    """An AdamW state over the adapter's parameters registered layer 1 first, saved with names,
    and the state read from the live optimizer by parameter identity (`AdamState`)."""
    model = saved_run[3]
    root = tmp_path_factory.mktemp("named")
    params = {k: torch.nn.Parameter(model.lora[k].clone()) for k in layers_swapped(list(model.lora))}
    opt = torch.optim.AdamW(params.values(), lr=1e-3)
    gen = torch.Generator().manual_seed(1)
    for p in params.values():
        p.grad = torch.randn(p.shape, generator=gen) * 0.01
    opt.step()
    save_optimizer_state(opt, params, root / "named.pt")
    torch.save(opt.state_dict(), root / "bare_swapped.pt")
    return root, fp.AdamState.from_optimizer(opt, params)


def test_permuted_named_state_and_evaluation_file_without_advantages(saved_run, named_state, tmp_path):
    """The numbers equal the Python API's with the state read from the live optimizer (the exact
    next step): the layer-swapped state is matched by name, not used by position. --first-order
    writes the entropy check along that step: finite predictions and realized changes with SEs."""
    _, _, root, model = saved_run
    E = read_rollouts(root / "E.jsonl")
    write_rollouts(tmp_path / "E.jsonl", Rollouts(E.prompts, E.responses, E.advantages, has_advantages=False))
    argv = run_args(saved_run, tmp_path, **{"--optimizer-state": named_state[0] / "named.pt",
                                            "--eval": tmp_path / "E.jsonl"}) + ["--first-order", "--device", "cpu"]  # fmt: skip
    assert main(argv) == 0
    got = json.loads((tmp_path / "r.json").read_text())
    U = read_rollouts(root / "U.jsonl").to_batch()
    ref = probe(model, model.lora, E.to_batch(), U, optimizer=named_state[1], lr=1e-3)
    assert got["step"] == "optimizer"
    for key in ("bars_dot", "delta_h1", "V_X", "V_Y", "se", "se_conditional"):
        assert got[key] == pytest.approx(getattr(ref, key), rel=1e-6), key
    assert "matched by name" in got["optimizer_state"] and "another order" in got["optimizer_state"]
    check = got["entropy_check"]
    assert [p["scale"] for p in check["points"]] == [0.0625, 0.125, 0.25, 0.5, 1.0, 2.0]
    assert check["delta_h1"] == got["delta_h1"] and check["delta_h1_se"] == got["se_conditional"]
    for p in check["points"]:
        assert p["predicted"] == pytest.approx(p["scale"] * got["delta_h1"])
        values = [p["predicted_se"], p["predicted_2"], p["predicted_2_se"], *p["realized"].values(),
                  *p["realized_se"].values()]  # fmt: skip
        assert set(p["realized"]) == {"crn", "rb", "rb_is"} and all(math.isfinite(x) for x in values), p
    assert {"slope", "r2", "s_star", "fit_scales"} <= set(check) and check["settings"]["samples_per_prompt"] == 16
    assert got["verdict"]["first_order"] is not None
    assert (tmp_path / "r.first_order.png").is_file()


def test_trainer_style_checkpoint_and_the_states_lr(saved_run, tmp_path):
    """A checkpoint-N/ written the way Trainer writes it (adapter + optimizer.pt with the decay and
    no-decay groups + scheduler.pt); without --lr the scheduler's next lr is probed."""
    _, adapter_dir, _, model = saved_run
    ckpt = tmp_path / "checkpoint-7"
    ckpt.mkdir()
    for f in adapter_dir.iterdir():
        (ckpt / f.name).write_bytes(f.read_bytes())
    params = [torch.nn.Parameter(v.clone()) for v in model.lora.values()]
    opt = torch.optim.AdamW([{"params": params, "weight_decay": 0.1}, {"params": [], "weight_decay": 0.0}], lr=2e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 - step / 10)
    for p in params:
        p.grad = torch.randn_like(p) * 0.01
    opt.step()
    sched.step()
    torch.save(opt.state_dict(), ckpt / "optimizer.pt")
    torch.save(sched.state_dict(), ckpt / "scheduler.pt")
    argv = run_args(saved_run, tmp_path, **{"--adapter": None, "--optimizer-state": None, "--lr": None,
                                            "--checkpoint": ckpt})  # fmt: skip
    assert main(argv) == 0
    got = json.loads((tmp_path / "r.json").read_text())
    assert got["eta"] == pytest.approx(2e-3 * 0.9) and "Trainer.create_optimizer" in got["optimizer_state"]


def test_missing_model_directory_exits_2(saved_run, tmp_path, capsys, no_model_load):
    assert_usage_error(run_args(saved_run, tmp_path, **{"--model": tmp_path / "nope"}), capsys, "--model", "nope")


def test_typo_in_the_adapter_path_says_no_such_directory(saved_run, tmp_path, capsys, no_model_load):
    argv = run_args(saved_run, tmp_path, **{"--adapter": tmp_path / "adaptr"})
    assert_usage_error(argv, capsys, "--adapter", "adaptr: no such file or directory")


def test_malformed_jsonl_names_the_line(saved_run, tmp_path, capsys, no_model_load):
    lines = (saved_run[2] / "E.jsonl").read_text().splitlines()
    bad = tmp_path / "E.jsonl"
    bad.write_text("\n".join([lines[0], '{"prompt": [1, 2], "responses": oops}', lines[2]]) + "\n")
    assert_usage_error(run_args(saved_run, tmp_path, **{"--eval": bad}), capsys, "E.jsonl:2")


def test_optimizer_state_not_matching_the_adapter_exits_2(saved_run, tmp_path, capsys, no_model_load):
    state = torch.load(saved_run[2] / "optimizer.pt", weights_only=True)
    state["param_groups"][0]["params"] = state["param_groups"][0]["params"][:-1]
    torch.save(state, tmp_path / "short.pt")
    argv = run_args(saved_run, tmp_path, **{"--optimizer-state": tmp_path / "short.pt"})
    assert_usage_error(argv, capsys, "short.pt", "the state is for another adapter")


def test_bare_state_in_another_order_exits_2(saved_run, tmp_path, capsys, no_model_load):
    state = torch.load(saved_run[2] / "optimizer.pt", weights_only=True)
    n = len(state["param_groups"][0]["params"])
    state["state"] = {i: state["state"][n - 1 - i] for i in range(n)}  # reversed
    torch.save(state, tmp_path / "reversed.pt")
    argv = run_args(saved_run, tmp_path, **{"--optimizer-state": tmp_path / "reversed.pt"})
    assert_usage_error(argv, capsys, "the same shapes in another order")


def test_bare_state_says_which_order_it_assumed(saved_run, tmp_path, capsys, monkeypatch):
    def stop(*a, **k):
        raise ValueError("stopped at the model load")

    monkeypatch.setattr("functional_probe.model.load_model", stop)
    argv = run_args(saved_run, tmp_path)
    argv.remove("--quiet")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "no names in the file; assumed state position i = i-th trainable adapter parameter" in err


@pytest.mark.parametrize(("lr", "needle"), [("0", "--lr=0.0: expected a finite step size > 0"),
                                            ("-0.001", "--lr=-0.001"), ("nan", "--lr=nan"),
                                            ("1e-2", "--lr 0.01 is 10x the optimizer state's lr 0.001")])  # fmt: skip
def test_bad_lr_exits_2_before_the_model_loads(saved_run, tmp_path, capsys, no_model_load, lr, needle):
    assert_usage_error(run_args(saved_run, tmp_path, **{"--lr": lr}), capsys, needle)


def test_run_without_an_update_file_exits_2(saved_run, tmp_path, capsys, no_model_load):
    assert_usage_error(run_args(saved_run, tmp_path, **{"--update": None}), capsys, "run needs --update U.jsonl")


def test_update_file_without_advantages_exits_2(saved_run, tmp_path, capsys, no_model_load):
    U = read_rollouts(saved_run[2] / "U.jsonl")
    write_rollouts(tmp_path / "U.jsonl", Rollouts(U.prompts, U.responses, U.advantages, has_advantages=False))
    argv = run_args(saved_run, tmp_path, **{"--update": tmp_path / "U.jsonl"})
    assert_usage_error(argv, capsys, "--update", "no line has 'advantages' or 'rewards'")


def test_text_without_a_tokenizer_says_what_to_do(saved_run, tmp_path, capsys, no_model_load):
    (tmp_path / "E.jsonl").write_text(json.dumps({"prompt": "hello", "responses": [[1], [2]]}) + "\n")
    argv = run_args(saved_run, tmp_path, **{"--eval": tmp_path / "E.jsonl"})
    assert_usage_error(argv, capsys, "write token ids instead", "--model's directory")


def test_token_ids_outside_the_vocabulary_exit_2(saved_run, tmp_path, capsys, no_model_load):
    vocab = saved_run[3].vocab_size
    write_rollouts(tmp_path / "U.jsonl", Rollouts([[1, 2], [3]], [[[vocab + 5]], [[4]]], [[0.0], [0.0]]))
    argv = run_args(saved_run, tmp_path, **{"--update": tmp_path / "U.jsonl"})
    assert_usage_error(argv, capsys, "outside the vocabulary")


def test_run_and_demo_accept_device_and_dtype():
    from functional_probe.cli import parser

    for command in (["demo"], ["run", "--model", "m", "--adapter", "a", "--eval", "e", "--update", "u"]):
        args = parser().parse_args(command + ["--device", "cpu", "--dtype", "bfloat16"])
        assert args.device == "cpu" and args.dtype == "bfloat16"
        assert parser().parse_args(command).dtype == "float32"


def test_adapter_for_another_base_names_the_module_and_its_base(saved_run, tmp_path, capsys, no_model_load):
    base_dir, adapter_dir, _, _ = saved_run
    config = json.loads((base_dir / "config.json").read_text())
    other = tmp_path / "wider"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({**config, "intermediate_size": 2 * config["intermediate_size"]}))
    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    argv = run_args(saved_run, tmp_path, **{"--model": other})
    assert_usage_error(argv, capsys, "layers.0.mlp.gate_proj.lora_B", "does not fit", "the adapter was made for",
                       str(adapter_config.get("base_model_name_or_path") or "another base model"))  # fmt: skip


def test_help_imports_neither_torch_nor_the_library():
    """What keeps `functional-probe --help` fast: the parser is built without importing torch."""
    code = ("import sys, functional_probe.cli as c; c.parser().format_help(); "
            "import functional_probe as fp; assert 'torch' not in sys.modules, 'torch imported'; "
            "assert callable(fp.probe) and fp.grads.mean_grad is fp.mean_grad")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_force_lr_lets_a_far_lr_through(saved_run, tmp_path, capsys, monkeypatch):
    def stop(*a, **k):
        raise ValueError("stopped at the model load")

    monkeypatch.setattr("functional_probe.model.load_model", stop)
    assert main(run_args(saved_run, tmp_path, **{"--lr": "1e-2"}) + ["--force-lr"]) == 2
    assert "stopped at the model load" in capsys.readouterr().err  # the lr check passed


def test_x_estimator_reaches_the_probe_and_the_json(saved_run, named_state, tmp_path):
    """run --x-estimator rb gives the API's probe(x_estimator="rb"); the JSON and table carry the
    estimator and the jackknife SE (of the optimizer's exact step, which `run` probes)."""
    _, _, root, model = saved_run
    argv = run_args(saved_run, tmp_path, **{"--optimizer-state": named_state[0] / "named.pt"})
    assert main(argv + ["--x-estimator", "rb", "--device", "cpu"]) == 0
    got = json.loads((tmp_path / "r.json").read_text())
    E, U = read_rollouts(root / "E.jsonl").to_batch(), read_rollouts(root / "U.jsonl").to_batch()
    ref = probe(model, model.lora, E, U, optimizer=named_state[1], lr=1e-3, x_estimator="rb")
    for key in ("bars_dot", "delta_h1", "se", "se_jackknife"):
        assert got[key] == pytest.approx(getattr(ref, key), rel=1e-6), key
    assert got["x_estimator"] == "rb" and "se_jackknife" in got["units"]
    assert got["step"] == "optimizer" and got["se_jackknife"] > 0
    from functional_probe.cli import parser

    assert parser().parse_args(["demo"]).x_estimator == "loo"
    with pytest.raises(SystemExit):
        parser().parse_args(["demo", "--x-estimator", "rbb"])
