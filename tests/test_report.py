"""Human-readable reports show the numbers they are given."""

from functional_probe.first_order import FirstOrderCheck, FirstOrderPoint
from functional_probe.probe import ProbeResult
from functional_probe.report import format_first_order, format_probe, plot_first_order


def result(shared: int) -> ProbeResult:
    return ProbeResult(
        eta=1e-3, bars_dot=2.5, delta_h1=2.5e-3, V_X=4.0, V_Y=9.0, C_XY=1.0 if shared else 0.0,
        se=1e-3 * 15**0.5 if shared else 1e-3 * 13**0.5, se_conditional=2e-3, B_E=4, B_U=5,
        shared_prompts=shared, method="jvp", weighting="dr_grpo", s=[1.0] * 4, t=[2.0] * 5,
        timings={"total": 0.5},
    )  # fmt: skip


def test_probe_table_states_values_and_the_independence_assumption():
    text = format_probe(result(0))
    assert "+0.0025" in text and "0.00360555" in text and "independent draws" in text
    assert "4, 5" in text and "0.500 s" in text
    assert "cross term of 3 prompts" in format_probe(result(3))


def test_first_order_table_and_plot(tmp_path):
    check = FirstOrderCheck(bars_dot=2.0, points=[FirstOrderPoint(1e-3, 1e-3, 2e-3, 2.02e-3, 1.01)])
    assert "1.0100" in format_first_order(check)
    plot_first_order(check, tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
