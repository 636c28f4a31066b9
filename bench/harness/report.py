"""Markdown tables, log-log plots, profiles and result files of benchmark runs."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping

import torch

from .baselines import BASELINES, FORWARDS
from .points import ALL_METHODS


def ratios(point: Mapping) -> dict[str, dict[str, float | None]]:
    """Per method: median time over the eager forward, the autograd α-trick and the autograd loop."""
    med = {n: r.get("median_s") for n, r in point["methods"].items()}
    out = {}
    for name, t in med.items():
        out[name] = {
            key: (t / med[den] if t is not None and med.get(den) else None)
            for key, den in (
                ("x_forward", "forward_eager"),
                ("x_alpha", "autograd_alpha"),
                ("x_loop", "autograd_loop"),
            )  # fmt: skip
        }
    return out


# ----------------------------------------------------------------------------- reporting


def fmt(x: float | None, spec: str, suffix: str = "") -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:{spec}}{suffix}"


def markdown_table(point: Mapping) -> str:
    """A Markdown table of one point: median (IQR) ms, x forward, x α-trick, x loop, peak MiB, error."""
    rat = ratios(point)
    head = (f"**{point['size']}**, N={point['num_prompts']} prompts x G={point['group']}, "
            f"T={point['seq_len']}, {point['repeats']} interleaved repeats")  # fmt: skip
    lines = [head, "", "| method | median ms | IQR ms | x forward | x autograd α-trick | x autograd loop "
             "| peak MiB | max rel. err vs loop |", "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for name, row in point["methods"].items():
        if "skipped" in row and "median_s" not in row:
            lines.append(f"| {name} | skipped: {row['skipped'][:80]} | | | | | | |")
            continue
        r = rat[name]
        iqr = f"{row['q1_s'] * 1e3:.0f}–{row['q3_s'] * 1e3:.0f}" if "q1_s" in row else "—"
        lines.append(
            f"| {name} | {fmt(row.get('median_s') and row['median_s'] * 1e3, '.1f')} | {iqr} "
            f"| {fmt(r['x_forward'], '.2f')} | {fmt(r['x_alpha'], '.2f')} | {fmt(r['x_loop'], '.2f')} "
            f"| {fmt(row.get('peak_mib'), '.0f')} | {fmt(row.get('rel_err_vs_loop'), '.1e')} |"
        )
    return "\n".join(lines)


def markdown_report(result: Mapping) -> str:
    """The machine line and one table per point."""
    m = result["machine"]
    parts = [f"torch {m['torch']}, {m['threads']} threads, {m['cpu']} ({m['cpu_count']} cores), {m['allocator']}",
             f"command: `{result.get('command', '')}`", ""]  # fmt: skip
    for point in result["points"]:
        parts += [markdown_table(point), ""]
    return "\n".join(parts)


def plot_sweeps(result: Mapping, path_prefix: str, size: str = "small") -> list[str]:
    """Log-log PNGs of median time and peak memory vs N (at the sweep's T) and vs T (at its N)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [p for p in result["points"] if p["size"] == size]
    sweeps = {"N": [p for p in points if "sweep N" in p.get("note", "")],
              "T": [p for p in points if "sweep T" in p.get("note", "")]}  # fmt: skip
    written = []
    for what, key, unit in (("time", "median_s", "median s"), ("memory", "peak_mib", "peak extra MiB")):
        fig, axes = plt.subplots(1, 2, figsize=(12, 5))
        drawn = False
        for ax, (axis, pts) in zip(axes, sweeps.items(), strict=True):
            xs_key = "num_prompts" if axis == "N" else "seq_len"
            names = sorted({n for p in pts for n, r in p["methods"].items() if r.get(key)},
                           key=ALL_METHODS.index)  # fmt: skip
            for name in names:
                xy = sorted(
                    (p[xs_key], p["methods"][name][key]) for p in pts if p["methods"].get(name, {}).get(key)
                )
                if xy:
                    ax.plot(*zip(*xy, strict=True), marker="o", label=name,
                            linestyle="--" if name in BASELINES or name in FORWARDS else "-")  # fmt: skip
                    drawn = True
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("N prompts (x2 responses)" if axis == "N" else "T tokens per row")
            ax.set_ylabel(unit)
            ax.set_title(f"{size}: {what} vs {axis}")
            ax.grid(True, which="both", alpha=0.3)
        if drawn:
            labelled = [ax for ax in axes if ax.get_legend_handles_labels()[0]]
            labelled[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
            fig.tight_layout()
            out = f"{path_prefix}_{size}_{what}.png"
            fig.savefig(out, dpi=110)
            written.append(out)
        plt.close(fig)
    return written


def plot_point(point: Mapping, path: str) -> str:
    """One point's methods as bars: median time / the eager forward (IQR whiskers) and peak MiB."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(n, r) for n, r in point["methods"].items() if r.get("median_s")]
    base = point["methods"]["forward_eager"]["median_s"]
    names = [n for n, _ in rows]
    fig, (time_ax, mem_ax) = plt.subplots(1, 2, figsize=(12, 0.4 * len(rows) + 1.5), sharey=True)
    ratio = [r["median_s"] / base for _, r in rows]
    err = [[(r["median_s"] - r.get("q1_s", r["median_s"])) / base for _, r in rows],
           [(r.get("q3_s", r["median_s"]) - r["median_s"]) / base for _, r in rows]]  # fmt: skip
    colors = ["0.6" if n in BASELINES or n in FORWARDS else "C0" for n in names]
    time_ax.barh(names, ratio, xerr=err, color=colors, capsize=2)
    time_ax.axvline(1.0, color="k", lw=0.8)
    time_ax.set_xlabel("median time / transformers eager forward (grey: baselines)")
    time_ax.invert_yaxis()
    mem_ax.barh(names, [r.get("peak_mib") or 0.0 for _, r in rows], color=colors)
    mem_ax.set_xlabel("peak MiB over the loaded model (0: not measured)")
    fig.suptitle(f"{point['size']}, N={point['num_prompts']} x G={point['group']}, T={point['seq_len']}, "
                 f"{point['repeats']} repeats", fontsize=10)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def profile_method(runner: Callable[[], object], rows: int = 20) -> str:
    """One call under torch.profiler: the top ops by self CPU time."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        runner()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def save_result(result: Mapping, directory: str, stem: str) -> dict[str, str]:
    """Write <stem>.json and <stem>.md (and plots where sweeps exist) into `directory`."""
    os.makedirs(directory, exist_ok=True)
    base = os.path.join(directory, stem)
    with open(base + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(base + ".md", "w") as f:
        f.write(markdown_report(result) + "\n")
    out = {"json": base + ".json", "md": base + ".md"}
    for size in sorted({p["size"] for p in result["points"]}):
        for png in plot_sweeps(result, base, size):
            out[png] = png
    for p in result["points"]:
        if "sweep" not in p.get("note", "") and p["methods"].get("forward_eager", {}).get("median_s"):
            png = plot_point(p, f"{base}_{p['size']}_N{p['num_prompts']}_T{p['seq_len']}.png")
            out[png] = png
    return out
