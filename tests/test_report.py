"""report.py: the verdict against closed forms, tables and JSON carry it, the plot is written."""

import dataclasses
import json
import math
import re
from dataclasses import replace

import pytest

from functional_probe.entropy_check import EntropyCheck, EntropyCheckPoint
from functional_probe.probe import ProbeResult
from functional_probe.report import (
    format_entropy_check,
    format_probe,
    plot_entropy_check,
    result_json,
    verdict,
    verdict_line,
)


def result(shared: int = 0, delta: float = 2.5e-3, se: float | None = None) -> ProbeResult:
    se = (1e-3 * 15**0.5 if shared else 1e-3 * 13**0.5) if se is None else se
    return ProbeResult(
        eta=1e-3, bars_dot=delta / 1e-3, delta_h1=delta, V_X=4.0, V_Y=9.0, C_XY=1.0 if shared else 0.0,
        se=se, se_conditional=2e-3, B_E=4, B_U=5, shared_prompts=shared, method="jvp",
        weighting="dr_grpo", s=[1.0] * 4, t=[2.0] * 5, timings={"total": 0.5},
    )  # fmt: skip


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


def check_of(slope: float | None = 1.0, r2: float | None = 0.99, s_star: float | None = 3.0,
             resolved: bool = True) -> EntropyCheck:
    """An entropy check at scales 0.5, 1, 2 with δH₁ = −0.01 ± 0.004 and realized rb = −0.011·s ± 0.002·√s."""
    points = [EntropyCheckPoint(scale=s, relative_step=0.01 * s, predicted=-0.01 * s, predicted_se=0.004 * s,
                                predicted_2=-0.01 * s + 1e-4 * s * s, predicted_2_se=0.004 * s,
                                realized={"rb": -0.011 * s}, realized_se={"rb": 0.002 * s**0.5})
              for s in (0.5, 1.0, 2.0)]  # fmt: skip
    return EntropyCheck(points=points, estimators=["rb"], delta_h1=-0.01, delta_h1_se=0.004, s_star=s_star,
                        s_star_se=0.5, s_star_resolved=resolved, fraction=0.1, slope={"rb": slope}, r2={"rb": r2},
                        fit_scales={"rb": [] if slope is None else [0.5, 1.0, 2.0]})  # fmt: skip


def test_probed_step_past_a_resolved_edge_is_warned_about_and_an_unresolved_edge_is_not():
    v = verdict(result(0), check_of(s_star=0.4))
    assert "the probed step lies past the first-order range: s* = 0.4 < 1" in v.warnings[0]
    assert "WARNING: the probed step lies past" in format_probe(result(0), v)
    assert verdict(result(0), check_of(s_star=0.4, resolved=False)).warnings == []
    assert verdict(result(0), check_of(s_star=3.0)).warnings == []


@pytest.mark.parametrize(("slope", "r2", "line", "warned"), [
    (1.02, 0.99, "first order holds: the realized change grows like s·δH₁ (rb: slope 1.02", False),
    (0.5, 0.99, "first order not confirmed (rb: slope 0.50", True),
    (1.0, 0.5, "first order not confirmed (rb: slope 1.00, R² 0.500", True),
    (None, None, "not resolved: no estimator has 3 scales", False),
])  # fmt: skip
def test_check_verdict_reads_the_fit(slope, r2, line, warned):
    v = verdict(result(0), check_of(slope, r2))
    assert v.first_order.startswith(line), v.first_order
    assert bool(v.warnings) == warned
    assert verdict(result(0)).first_order is None


def test_check_verdict_reads_rb_is_when_it_is_fitted_and_rb_otherwise():
    """rb_is (SE ∝ s) decides the verdict when fitted: here rb's slope 0.5 alone would not confirm."""
    both = replace(check_of(0.5), estimators=["crn", "rb", "rb_is"], slope={"crn": None, "rb": 0.5, "rb_is": 1.01},
                   r2={"crn": None, "rb": 0.99, "rb_is": 0.999},
                   fit_scales={"crn": [], "rb": [0.5, 1.0, 2.0], "rb_is": [0.5, 1.0, 2.0]})  # fmt: skip
    assert verdict(result(0), both).first_order.startswith("first order holds: the realized change grows like s·δH₁ "
                                                           "(rb_is: slope 1.01")  # fmt: skip
    rb_only = replace(both, slope={**both.slope, "rb_is": None})
    assert verdict(result(0), rb_only).first_order.startswith("first order not confirmed (rb: slope 0.50")


def test_json_carries_the_verdict_and_the_check_and_reads_back():
    r, check = result(0), check_of()
    text = result_json(r, verdict(r, check), {"entropy_check": check.to_dict()}, "matched by name")
    obj = json.loads(text)
    assert obj["verdict"]["resolved"] is False and obj["verdict"]["prompts_needed_E"] == verdict(r).prompts_needed_E
    assert "nats/token" in obj["units"]["delta_h1"] and obj["optimizer_state"] == "matched by name"
    got = obj["entropy_check"]
    assert got["slope"]["rb"] == 1.0 and got["r2"]["rb"] == 0.99
    assert [p["realized_se"]["rb"] for p in got["points"]] == [p.realized_se["rb"] for p in check.points]
    assert ProbeResult.from_json(text) == r


def test_check_table_marks_the_probed_step_and_the_fitted_scales():
    table = format_entropy_check(check_of(), {"samples_per_prompt": 16, "prompts": 4, "temperature": 1.0,
                                               "seconds": 2.5})  # fmt: skip
    rows = table.splitlines()
    probed = [row for row in rows if "<- probed step" in row]
    assert len(probed) == 1 and probed[0].split()[0] == "1" and "-1.100e-02 ± 2.0e-03 *" in probed[0]
    assert "rb: slope 1.000, R² 0.9900 over 3 scales" in table and "s* = 3 ± 0.5: where |δH₂| reaches 10%" in table
    assert "16 fresh responses per prompt for each of E's 4 prompts" in table and "2.5 s" in table
    assert rows[-1].startswith("first-order verdict: first order holds")
    assert "no fit (0 of 3 scales qualify" in format_entropy_check(check_of(None, None))
    assert "not resolved (d²H/ds² within 2 SE of 0): no bound on the fit" in format_entropy_check(check_of(resolved=False))


def test_check_plot_draws_the_noise_floor_and_the_probed_step(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figures = []
    real_close = plt.close
    plt.close = lambda fig=None: figures.append(fig)  # keep the figure to read it
    try:
        plot_entropy_check(check_of(resolved=False), tmp_path / "c.png")
    finally:
        plt.close = real_close
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ax = figures[0].axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "noise floor of rb: 2·SE" in labels and "the probed step (s = 1)" in labels
    assert any(label.endswith("(unresolved)") for label in labels)
    assert "entropy rate" in ax.get_ylabel() and "nats" in ax.get_ylabel()
    floor = next(line for line in ax.get_lines() if line.get_label() == "noise floor of rb: 2·SE")
    assert list(floor.get_ydata()) == pytest.approx([2 * 0.002 * s**0.5 for s in (0.5, 1.0, 2.0)])
    real_close(figures[0])


def test_few_prompts_resolve_at_the_student_t_multiplier_of_the_welch_dof():
    """dof = 1 (Cauchy): "2 SE" is tan(π(Φ(2) − 1/2)) = 13.97 SE; without a dof it is 2 SE."""
    at = math.tan(math.pi * (0.5 * math.erfc(-2 / math.sqrt(2)) - 0.5))
    r = replace(result(0, delta=5e-3, se=1e-3), dof=1.0)
    v = verdict(r)
    assert v.threshold == pytest.approx(at, rel=1e-9) and not v.resolved and "1 dof: 14 SE" in verdict_line(r, v)
    assert v.prompts_needed_E == math.ceil((at / 5) ** 2 * 4)
    assert verdict(replace(r, delta_h1=14e-3)).resolved
    assert verdict(replace(r, dof=None)).resolved and verdict(replace(r, dof=None)).threshold == 2.0
