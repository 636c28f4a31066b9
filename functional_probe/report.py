"""Human-readable reports: tables as strings, a phase progress bar, the first-order plot."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

from .first_order import FirstOrderCheck
from .probe import ProbeResult


class Progress:
    """Callable that announces each phase on stderr with the elapsed time; silent when `quiet`."""

    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet
        self.start = time.perf_counter()

    def __call__(self, phase: str) -> None:
        if not self.quiet:
            tqdm.write(f"[{time.perf_counter() - self.start:6.1f} s] {phase}", file=sys.stderr)

    done = __call__


def format_probe(r: ProbeResult) -> str:
    """The probe as a two-column table; SE lines say what they assume."""
    cross = (
        f"includes the cross term of {r.shared_prompts} prompts shared by E and U"
        if r.shared_prompts
        else "E and U share no prompt: independent draws"
    )
    rows = [
        ("δH₁ = η·<μX, μY>", f"{r.delta_h1:+.6g}"),
        ("SE(δH₁)", f"{r.se:.6g}   ({cross})"),
        ("SE given U (conditional)", f"{r.se_conditional:.6g}"),
        ("δH₁ / SE", f"{r.delta_h1 / r.se:+.3g}" if r.se else "inf"),
        ("bars_dot = <μX, μY>", f"{r.bars_dot:+.6g}"),
        ("η", f"{r.eta:.6g}"),
        ("V_X, V_Y, C_XY (per unit step)", f"{r.V_X:.4g}, {r.V_Y:.4g}, {r.C_XY:.4g}"),
        ("B_E, B_U", f"{r.B_E}, {r.B_U}"),
        ("method, weighting", f"{r.method}, {r.weighting}"),
    ]
    rows += [(f"time: {k}", f"{v:.3f} s") for k, v in r.timings.items()]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def format_first_order(check: FirstOrderCheck) -> str:
    head = f"{'‖ηΔ‖/‖θ‖':>10} {'η':>11} {'predicted':>12} {'actual':>12} {'actual/pred':>11}"
    lines = [f"first-order check (<μX, μY> = {check.bars_dot:+.6g})", head]
    for p in check.points:
        lines.append(
            f"{p.relative_step:>10.1e} {p.eta:>11.3e} {p.predicted:>12.5g} {p.actual:>12.5g} {p.ratio:>11.4f}"
        )
    return "\n".join(lines)


def plot_first_order(check: FirstOrderCheck, path: Path) -> None:
    """actual / predicted change against the relative step size, log x-axis (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [p.relative_step for p in check.points]
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    ax.semilogx(x, [p.ratio for p in check.points], "o-")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_xlabel("‖η·μY‖ / ‖θ_LoRA‖")
    ax.set_ylabel("actual / predicted change")
    ax.set_title("Where the first-order picture holds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
