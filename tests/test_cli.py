"""The command line end to end, in subprocesses, against the Python API."""

import json
import subprocess
import sys

import pytest
import torch

import functional_probe as fp
from functional_probe.probe import ProbeResult, probe
from functional_probe.rollouts import Rollouts, write_rollouts


def cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "functional_probe", *map(str, args)], capture_output=True, text=True, cwd=cwd
    )


def test_demo_runs_and_writes_json(tmp_path):
    out = cli("demo", "--quiet", "--out", tmp_path / "r.json")
    assert out.returncode == 0, out.stderr
    assert "δH₁" in out.stdout and "SE(δH₁)" in out.stdout
    r = ProbeResult.from_json((tmp_path / "r.json").read_text())
    assert r.B_E == 8 and r.B_U == 8 and r.se > 0


def test_run_gives_the_python_api_numbers(saved_run, tmp_path):
    base_dir, adapter_dir, root, model = saved_run
    out = cli(
        "run", "--model", base_dir, "--adapter", adapter_dir, "--optimizer-state", root / "optimizer.pt",
        "--lr", "1e-3", "--eval", root / "E.jsonl", "--update", root / "U.jsonl", "--quiet",
        "--out", tmp_path / "r.json",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    got = json.loads((tmp_path / "r.json").read_text())
    pre = fp.AdamPreconditioner.from_state_dict(
        torch.load(root / "optimizer.pt", weights_only=True), list(model.lora)
    )
    E = fp.read_rollouts(root / "E.jsonl").to_batch()
    U = fp.read_rollouts(root / "U.jsonl").to_batch()
    ref = probe(model, model.lora, E, U, preconditioner=pre, eta=1e-3)
    for key in ("bars_dot", "delta_h1", "V_X", "V_Y", "se", "se_conditional"):
        assert got[key] == pytest.approx(getattr(ref, key), rel=1e-6), key


def test_optimizer_pt_beside_the_adapter_is_found(saved_run, tmp_path):
    base_dir, adapter_dir, root, _ = saved_run
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for f in adapter_dir.iterdir():
        (adapter / f.name).write_bytes(f.read_bytes())
    (adapter / "optimizer.pt").write_bytes((root / "optimizer.pt").read_bytes())
    out = cli("run", "--model", base_dir, "--adapter", adapter, "--lr", "1e-3", "--eval", root / "E.jsonl",
              "--update", root / "U.jsonl", "--quiet", "--out", tmp_path / "r.json")  # fmt: skip
    assert out.returncode == 0, out.stderr


def bad_run(saved_run, tmp_path, **override):
    base_dir, adapter_dir, root, _ = saved_run
    args = {"--model": base_dir, "--adapter": adapter_dir, "--optimizer-state": root / "optimizer.pt",
            "--lr": "1e-3", "--eval": root / "E.jsonl", "--update": root / "U.jsonl"}  # fmt: skip
    args.update(override)
    flat = [x for kv in args.items() for x in kv]
    return cli("run", *flat, "--quiet", "--out", tmp_path / "r.json")


def assert_usage_error(out, *needles):
    assert out.returncode == 2, (out.returncode, out.stderr)
    assert "Traceback" not in out.stderr
    message = out.stderr.strip().splitlines()[-1]
    for needle in needles:
        assert needle in message, message


def test_missing_model_directory_exits_2(saved_run, tmp_path):
    assert_usage_error(bad_run(saved_run, tmp_path, **{"--model": tmp_path / "nope"}), "--model", "nope")


def test_malformed_jsonl_names_the_line(saved_run, tmp_path):
    lines = (saved_run[2] / "E.jsonl").read_text().splitlines()
    bad = tmp_path / "E.jsonl"
    bad.write_text("\n".join([lines[0], '{"prompt": [1, 2], "responses": oops}', lines[2]]) + "\n")
    assert_usage_error(bad_run(saved_run, tmp_path, **{"--eval": bad}), "E.jsonl:2")


def test_optimizer_state_not_matching_the_adapter_exits_2(saved_run, tmp_path):
    state = torch.load(saved_run[2] / "optimizer.pt", weights_only=True)
    state["param_groups"][0]["params"] = state["param_groups"][0]["params"][:-1]
    torch.save(state, tmp_path / "short.pt")
    assert_usage_error(bad_run(saved_run, tmp_path, **{"--optimizer-state": tmp_path / "short.pt"}),
                       "does not match the adapter")  # fmt: skip


def test_token_ids_outside_the_vocabulary_exit_2(saved_run, tmp_path):
    vocab = saved_run[3].vocab_size
    write_rollouts(tmp_path / "U.jsonl", Rollouts([[1, 2], [3]], [[[vocab + 5]], [[4]]], [[0.0], [0.0]]))
    assert_usage_error(
        bad_run(saved_run, tmp_path, **{"--update": tmp_path / "U.jsonl"}), "outside the vocabulary"
    )
