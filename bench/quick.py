"""A quick subset of bench/run.py (aimed at < 2 minutes on 2 CPU cores); prints Markdown tables.

Run: ``python bench/quick.py`` (what `functional-probe bench` ran before the harness left the
package). The small config (Qwen2, hidden 256, 4 layers, vocab 4096, LoRA r=8 on all 7
projections), N = 16 and 32 prompts x G = 2, T = 128, 3 interleaved repeats after a checked
warm-up, no memory subprocesses. Methods: both forwards, the autograd α-trick and per-prompt
loop, and vjp / jvp (fp32) and jvp on an NF4 base. The full sweep (every method, memory, plots)
is `python bench/run.py`.
"""

from __future__ import annotations

from harness import FORWARDS, PointSpec, markdown_report, run_points

QUICK_METHODS = FORWARDS + ("autograd_alpha", "autograd_loop", "vjp", "jvp", "nf4:jvp")


def quick_specs(repeats: int = 3) -> list[PointSpec]:
    """The points the quick bench runs."""
    return [PointSpec("small", n, 128, QUICK_METHODS, (), repeats, "quick") for n in (16, 32)]


def quick_report() -> str:
    """Run the quick points; their Markdown tables (ratios: median over median, same process)."""
    result = run_points(quick_specs(), threads=2, command="python bench/quick.py", log=lambda _: None)
    return markdown_report(result)


if __name__ == "__main__":
    print(quick_report())
