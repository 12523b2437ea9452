"""PNG figures of a comparison (matplotlib, drawn off-screen)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["plot_all"]


def _smooth(values: list[float], window: int) -> list[float]:
    """Trailing mean over ``window`` steps: single batch losses are noisy."""
    out, total = [], 0.0
    for index, value in enumerate(values):
        total += value
        if index >= window:
            total -= values[index - window]
        out.append(total / min(index + 1, window))
    return out


def _ok_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    return [row for row in report["rows"] if row["status"] != "skipped" and any("error" not in r for r in row["runs"])]


def plot_all(report: dict[str, Any], folder: Path) -> list[Path]:
    """Draw the four figures into ``folder``; return their paths."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("fprecond compare draws its plots with matplotlib: pip install 'fprecond[examples]'"
                          ) from error

    rows = _ok_rows(report)
    paths = []
    title = f"{report['task_description']}"
    for axis_name, filename in (("steps", "loss_vs_steps.png"), ("time", "loss_vs_time.png")):
        figure, axes = plt.subplots(figsize=(7, 4.5))
        for row in rows:
            run = next(run for run in row["runs"] if "error" not in run)
            if not run["losses"]:
                continue
            smoothed = _smooth(run["losses"], 10)
            xs = range(1, len(smoothed) + 1) if axis_name == "steps" else run["times"]
            axes.plot(list(xs), smoothed, label=row["method"])
        axes.set_xlabel("step" if axis_name == "steps" else "training time (s)")
        axes.set_ylabel("training loss (mean of 10 steps, seed 0)")
        axes.set_yscale("log")
        axes.set_title(title, fontsize=9)
        axes.legend(fontsize=8)
        figure.tight_layout()
        path = folder / filename
        figure.savefig(path, dpi=110)
        plt.close(figure)
        paths.append(path)

    figure, axes = plt.subplots(figsize=(7, 4.5))
    names = [row["method"] for row in rows]
    finals = [row.get("final_accuracy") or 0.0 for row in rows]
    spreads = [row.get("final_accuracy_std") or 0.0 for row in rows]
    axes.bar(range(len(rows)), finals, yerr=spreads, capsize=3, color="tab:blue", alpha=0.8, label="final")
    axes.scatter(range(len(rows)), [row.get("best_accuracy") or 0.0 for row in rows], color="tab:red", zorder=3,
                 label="best")
    axes.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=8)
    axes.set_ylabel("test accuracy")
    low = min([value for value in finals if value > 0] or [0.0])
    axes.set_ylim(max(0.0, low - 0.1), 1.0)
    axes.set_title(title, fontsize=9)
    axes.legend(fontsize=8)
    figure.tight_layout()
    path = folder / "test_accuracy.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    paths.append(path)

    figure, axes = plt.subplots(figsize=(7, 4.5))
    # The rise above the run's start separates methods better than the process total,
    # which the interpreter and torch dominate on small models.
    above = all(row.get("peak_above_start_mib") is not None for row in rows)
    field = "peak_above_start_mib" if above else "peak_mib"
    for row in rows:
        if row.get("samples_per_s") and row.get(field) is not None:
            axes.scatter(row[field], row["samples_per_s"])
            axes.annotate(row["method"], (row[field], row["samples_per_s"]), fontsize=8,
                          xytext=(4, 4), textcoords="offset points")
    axes.set_xlabel("peak memory during the run (MiB)" if above else "peak memory (MiB)")
    axes.set_ylabel("throughput (samples/s)")
    axes.set_yscale("log")
    axes.set_title(title, fontsize=9)
    figure.tight_layout()
    path = folder / "throughput_vs_memory.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    paths.append(path)
    return paths
