"""`functional-probe demo` end to end on the embedded tiny model: the JSON and its verdict, the
requested dtype (its --first-order check: tests/test_cli_check.py)."""

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


def test_demo_runs_in_the_requested_dtype(tmp_path):
    argv = ["demo", "--quiet", "--prompts", "2", "--steps", "1", "--device", "cpu", "--dtype", "float64",
            "--out", str(tmp_path / "r.json")]  # fmt: skip
    assert main(argv) == 0
    r = ProbeResult.from_json((tmp_path / "r.json").read_text())
    assert r.B_E == 2 and math.isfinite(r.delta_h1) and r.se > 0
