"""The latency report's plots: per-step latency against position, and paper Table 5 bars."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from melle_bench.latency_figures import measured
from melle_bench.latency_workload import PAPER_TABLE5, TABLE5_SECONDS

PAPER_LABEL = "paper (its GPU)"


def panels(n: int):
    """A figure with ``n`` side-by-side panels, drawn with the file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, n, figsize=(5.5 * n, 4), squeeze=False)


def save(fig, path: Path) -> None:
    """Write ``fig`` as a PNG and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_steps(report: dict, path: Path) -> None:
    """Per-step latency against position, one panel per preset, one line per backend (and ORT mode)."""
    presets = list(report["results"])
    fig, axes = panels(len(presets))
    for ax, preset in zip(axes[0], presets):
        for backend, entry in report["results"][preset].items():
            for mode, steps in entry.get("step", {}).items():
                if steps:
                    xs = sorted(map(int, steps))
                    label = f"{backend} ({mode})" if mode != "prefix" else backend
                    ax.plot(xs, [steps[str(x)]["median_ms"] for x in xs], marker="o", label=label)
        ax.set(title=preset, xlabel="position", ylabel="ms per step", yscale="log")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    save(fig, path)


def plot_table5(report: dict, path: Path) -> None:
    """Table 5 bars per backend, grouped by r, one panel per preset, beside the paper's figures."""
    rs = [str(r) for r in report["settings"]["rs"]]
    presets = list(report["results"])
    fig, axes = panels(len(presets))
    for ax, preset in zip(axes[0], presets):
        series = {b: [e["table5"].get(r, {}) for r in rs] for b, e in report["results"][preset].items()
                  if measured(e)}
        series[PAPER_LABEL] = [{"mean_s": PAPER_TABLE5.get(int(r), np.nan)} for r in rs]
        width = 0.8 / len(series)
        for i, (name, rows) in enumerate(series.items()):
            means = [row.get("mean_s", np.nan) for row in rows]  # skipped runs leave a gap
            stds = [row.get("std_s") or 0.0 for row in rows]
            paper = name == PAPER_LABEL  # grey and hatched: another machine, not a competitor
            ax.bar(np.arange(len(rs)) + i * width, means, width, yerr=stds, label=name,
                   color="0.75" if paper else None, hatch="//" if paper else None)
        ax.set_xticks(np.arange(len(rs)) + 0.4 - width / 2, [f"r={r}" for r in rs])
        ax.set(title=f"{preset}: time for {TABLE5_SECONDS:g} s of speech", ylabel="seconds", yscale="log")
        ax.legend(fontsize=8)
    save(fig, path)
