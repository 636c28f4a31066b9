"""`functional-probe demo` end to end on the embedded tiny model: the JSON and its verdict, the
entropy check against the probe's prediction, the requested dtype."""

import json
import math
import subprocess
import sys

from functional_probe.cli import main
from functional_probe.probe import ProbeResult


def test_demo_runs_and_writes_json_with_its_verdict(tmp_path):
    out = subprocess.run([sys.executable, "-m", "functional_probe", "demo", "--quiet", "--prompts", "4",
                          "--device", "cpu", "--out", str(tmp_path / "r.json")],
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "nats/token" in out.stdout and "verdict" in out.stdout and "SE(δH₁)" in out.stdout
    assert "gemm_4bit_forward" not in out.stderr
    r = ProbeResult.from_json((tmp_path / "r.json").read_text())
    assert r.B_E == 4 and r.B_U == 4 and r.se > 0
    v = json.loads((tmp_path / "r.json").read_text())["verdict"]
    assert v["resolved"] == (abs(r.delta_h1) >= 2 * r.se)


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


def test_demo_runs_in_the_requested_dtype(tmp_path):
    argv = ["demo", "--quiet", "--prompts", "2", "--steps", "1", "--device", "cpu", "--dtype", "float64",
            "--out", str(tmp_path / "r.json")]  # fmt: skip
    assert main(argv) == 0
    r = ProbeResult.from_json((tmp_path / "r.json").read_text())
    assert r.B_E == 2 and math.isfinite(r.delta_h1) and r.se > 0
