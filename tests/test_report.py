"""report.py: the verdict against closed forms, tables and JSON carry it, the plot is written."""

import dataclasses
import json
import math
import re

import pytest

from functional_probe.first_order import FirstOrderCheck, FirstOrderPoint
from functional_probe.probe import ProbeResult
from functional_probe.report import format_first_order, format_probe, plot_first_order, result_json, verdict


def result(shared: int = 0, delta: float = 2.5e-3, se: float | None = None) -> ProbeResult:
    se = (1e-3 * 15**0.5 if shared else 1e-3 * 13**0.5) if se is None else se
    return ProbeResult(
        eta=1e-3, bars_dot=delta / 1e-3, delta_h1=delta, V_X=4.0, V_Y=9.0, C_XY=1.0 if shared else 0.0,
        se=se, se_conditional=2e-3, B_E=4, B_U=5, shared_prompts=shared, method="jvp",
        weighting="dr_grpo", s=[1.0] * 4, t=[2.0] * 5, timings={"total": 0.5},
    )  # fmt: skip


def point(eta: float, ratio: float, bars_dot: float = 2.0) -> FirstOrderPoint:
    return FirstOrderPoint(eta, eta * 10, eta * bars_dot, eta * bars_dot * ratio, ratio)


def test_probe_table_states_values_units_and_the_independence_assumption():
    text = format_probe(result(0))
    assert "+0.0025 ± 0.00361 nats/token" in text and "per-token entropy rate" in text
    assert "0.00360555" in text and "independent draws" in text
    assert "4, 5" in text and "0.500 s" in text
    assert "cross term of 3 prompts" in format_probe(result(3))
    assert re.search(r"jackknife SE \(over prompts\) +not computed", text)  # a result read from an older JSON
    rb = dataclasses.replace(result(0), x_estimator="rb", se_jackknife=4.25e-3)
    assert "0.00425   (delete one prompt" in format_probe(rb) and "jvp, dr_grpo, rb" in format_probe(rb)


def test_unresolved_verdict_gives_the_prompts_that_would_resolve_it():
    r = result(0)
    v = verdict(r)
    assert not v.resolved and v.direction == "unresolved" and v.z == pytest.approx(r.delta_h1 / r.se)
    # SE ∝ 1/sqrt(B): at the stated counts |δH₁| ≥ 2 SE, one prompt fewer in E it is not
    assert 2 * r.se * math.sqrt(r.B_E / v.prompts_needed_E) <= abs(r.delta_h1)
    assert 2 * r.se * math.sqrt(r.B_E / (v.prompts_needed_E - 1)) > abs(r.delta_h1)
    assert v.prompts_needed_U / r.B_U == pytest.approx(v.prompts_needed_E / r.B_E, rel=0.05)
    assert f"about {v.prompts_needed_E} prompts in E and {v.prompts_needed_U} in U" in format_probe(r, v)


@pytest.mark.parametrize(("delta", "direction"), [(1e-2, "raises"), (-1e-2, "lowers")])
def test_resolved_verdict_says_which_way(delta, direction):
    v = verdict(result(0, delta=delta))
    assert v.resolved and v.direction == direction and v.prompts_needed_E == 4
    assert f"the step {direction} the entropy: resolved at 2 SE" in format_probe(result(0, delta=delta))


def test_zero_se_is_a_warning_not_an_infinite_ratio():
    v = verdict(result(0, se=0.0))
    assert math.isnan(v.z) and not v.resolved and v.prompts_needed_E is None
    assert "SE = 0" in v.warnings[0] and "inf" not in format_probe(result(0, se=0.0))


def test_eta_past_the_linear_range_is_warned_about():
    check = FirstOrderCheck(2.0, [point(1e-4, 1.01), point(1e-3, 0.97), point(1e-2, 0.45)], noise_floor=1e-9,
                            probed=point(3e-2, -0.84))  # fmt: skip
    v = verdict(result(0), check)
    assert v.first_order_ratio == -0.84
    assert "outside the range where the first-order picture holds" in v.warnings[0]
    assert "[0.0001, 0.001]" in v.warnings[0]
    assert "WARNING: η = 0.03 is outside" in format_probe(result(0), v)
    inside = FirstOrderCheck(2.0, check.points, noise_floor=1e-9, probed=point(1e-3, 0.97))
    assert verdict(result(0), inside).warnings == []


def test_a_point_under_the_noise_floor_does_not_count():
    check = FirstOrderCheck(2.0, [point(1e-6, 0.18), point(1e-3, 1.0)], noise_floor=1e-6, probed=point(1e-6, 0.18))
    assert check.linear_range() == (1e-3, 1e-3)
    assert "noise floor" in verdict(result(0), check).warnings[0]
    assert "(near the noise floor)" in format_first_order(check)


def test_json_carries_the_verdict_and_reads_back():
    check = FirstOrderCheck(2.0, [point(1e-3, 1.01)], noise_floor=1e-9, probed=point(1e-3, 1.01))
    r = result(0)
    text = result_json(r, verdict(r, check), check, "matched by name")
    obj = json.loads(text)
    assert obj["verdict"]["resolved"] is False and obj["verdict"]["prompts_needed_E"] == verdict(r).prompts_needed_E
    assert "nats/token" in obj["units"]["delta_h1"] and obj["optimizer_state"] == "matched by name"
    assert obj["first_order"]["probed"]["ratio"] == 1.01
    assert ProbeResult.from_json(text) == r


def test_first_order_table_marks_the_probed_eta_and_plot_is_written(tmp_path):
    check = FirstOrderCheck(2.0, [point(1e-3, 1.01), point(1e-2, -0.5)], noise_floor=1e-7,
                            probed=point(5e-3, 0.9))  # fmt: skip
    table = format_first_order(check)
    assert "1.0100" in table and "<- probed η" in table and "noise floor 1e-07" in table
    plot_first_order(check, tmp_path / "c.png", extra={"realized": ([1e-3, 1e-2], [2e-3, -1e-2])})
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
