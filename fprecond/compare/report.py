"""The outputs of ``fprecond compare``: the terminal table, ``results.json``,
``results.csv`` and PNG plots (loss against steps and against training time, test
accuracy per method, throughput against peak memory)."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

from fprecond.bench.runner import json_safe

__all__ = ["header_lines", "add_ratio", "table_header", "table_row", "table_lines", "write_outputs", "CSV_FIELDS"]

CSV_FIELDS: tuple[str, ...] = (
    "method", "status", "seeds", "steps", "step_time_s", "step_time_std_s", "time_ratio_to_sgd", "samples_per_s",
    "peak_mib", "peak_above_start_mib", "final_accuracy", "final_accuracy_std", "best_accuracy",
    "best_accuracy_std", "final_test_loss", "final_test_loss_std", "to_target_reached", "to_target_steps",
    "to_target_s", "diverged", "vmap_speedup", "loop_step_time_s", "note",
)


def header_lines(header: dict[str, Any]) -> list[str]:
    """The run header: machine, versions, device and settings."""
    machine = header["machine"]
    settings = header["settings"]
    budget = (f"{settings['epochs']:g} epochs" if settings["epochs"] is not None else "") + (
        f"{' or ' if settings['epochs'] is not None else ''}{settings['seconds']:g} s of training"
        if settings["seconds"] is not None else "")
    lines = [
        f"fprecond {machine['fprecond']} compare — torch {machine['torch']}, Python {machine['python']}, "
        f"device {machine['device']}{' (' + machine['gpu'] + ')' if machine.get('gpu') else ''}",
        f"machine: {machine['cpu']}, {machine['cpu_count']} CPUs, {machine['platform']}",
        f"task: {header['task_description']} ({header['train_examples']} train / {header['test_examples']} test)",
        f"budget: {budget}, batch {settings['batch_size']}, {settings['seeds']} seed(s)"
        f"{', ensemble of ' + str(settings['ensemble']) + ' (vmap)' if settings['ensemble'] > 1 else ''}, "
        f"evaluation every {header['eval_every']} steps, target accuracy {settings['target_accuracy']}",
        f"each run in its own process; peak memory: "
        f"{'CUDA allocator peak' if machine['device'] == 'cuda' else 'resident-set high-water mark'}; "
        f"time ratios against SGD in this run",
    ]
    for method, values in header["method_settings"].items():
        shown = ", ".join(f"{key}={value}" for key, value in values.items()) or "recipe defaults"
        lines.append(f"  {method}: {shown}")
    return lines


def add_ratio(row: dict[str, Any], base: dict[str, Any] | None) -> None:
    """Set ``time_ratio_to_sgd`` (from the baseline row ``base``) and ``note`` on ``row``."""
    ratio = None
    if base is not None and base.get("step_time_s") and row.get("step_time_s"):
        ratio = row["step_time_s"] / base["step_time_s"]
    row["time_ratio_to_sgd"] = ratio
    if "note" not in row:
        row["note"] = _note(row)


def _note(row: dict[str, Any]) -> str:
    parts = []
    if row.get("diverged"):
        parts.append(f"diverged ({row['diverged']} of {row['seeds']} seeds)")
    if row.get("error"):
        first = row["error"].strip().splitlines()[0] if row["error"].strip() else "?"
        parts.append("error: " + (first if len(first) <= 140 else first[:137] + "..."))
    skipped = [run.get("skipped") for run in row.get("runs", []) if run.get("skipped")]
    if skipped:
        parts.append(f"{max(skipped)} non-finite steps skipped")
    return "; ".join(parts)


def _number(value: float | None, spec: str, scale: float = 1.0) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value * scale:{spec}}"


def _peak(row: dict[str, Any]) -> str:
    """The process's peak and, in brackets, how far it rose during the run itself."""
    text = _number(row.get("peak_mib"), ".0f")
    if row.get("peak_above_start_mib") is not None:
        text += f" (+{row['peak_above_start_mib']:.0f})"
    return text


def _with_spread(value: float | None, spread: float | None, spec: str) -> str:
    text = _number(value, spec)
    if value is not None and spread:
        text += f"±{spread:{spec}}"
    return text


def _columns(ensemble: bool) -> list[tuple[str, int, bool]]:
    columns = [("method", 22, True), ("steps", 6, False), ("step ms", 8, False), ("x SGD", 6, False),
               ("samples/s", 10, False), ("peak MiB (run)", 14, False), ("final acc", 12, False),
               ("best acc", 12, False), ("test loss", 12, False), ("to target", 14, False)]
    if ensemble:
        columns.append(("vmap x loop", 11, False))
    return columns


def _join(cells: list[str], columns: list[tuple[str, int, bool]]) -> str:
    return "  ".join(f"{cell:<{width}}" if text else f"{cell:>{width}}" for cell, (_, width, text) in zip(cells, columns))


def table_header(ensemble: bool) -> list[str]:
    """The table's header lines (the columns of :func:`table_row`)."""
    columns = _columns(ensemble)
    head = _join([name for name, _, _ in columns], columns) + "  note"
    return ["", head, "-" * len(head)]


def table_row(row: dict[str, Any], ensemble: bool) -> str:
    """One method's line of the table."""
    columns = _columns(ensemble)
    if row["status"] == "skipped":
        return _join([row["method"]] + ["-"] * (len(columns) - 1), columns) + f"  {row['note']}"
    target = "-"
    if row.get("to_target_steps") is not None:
        target = f"{row['to_target_steps']:.0f} / {row['to_target_s']:.1f}s"
        if row["to_target_reached"] < row["seeds"]:
            target += f" ({row['to_target_reached']}/{row['seeds']})"
    cells = [row["method"], _number(row.get("steps"), ".0f"), _number(row.get("step_time_s"), ".2f", 1e3),
             _number(row.get("time_ratio_to_sgd"), ".2f"), _number(row.get("samples_per_s"), ".0f"),
             _peak(row),
             _with_spread(row.get("final_accuracy"), row.get("final_accuracy_std"), ".3f"),
             _with_spread(row.get("best_accuracy"), row.get("best_accuracy_std"), ".3f"),
             _with_spread(row.get("final_test_loss"), row.get("final_test_loss_std"), ".3f"), target]
    if ensemble:
        cells.append(_number(row.get("vmap_speedup"), ".2f"))
    return _join(cells, columns) + (f"  {row['note']}" if row.get("note") else "")


def table_lines(report: dict[str, Any]) -> list[str]:
    """The whole comparison as a fixed-width table."""
    ensemble = report["settings"]["ensemble"] > 1
    return table_header(ensemble) + [table_row(row, ensemble) for row in report["rows"]]


def write_outputs(report: dict[str, Any], folder: Path, plots: bool = True) -> list[Path]:
    """Write ``results.json``, ``results.csv`` and (``plots``) the PNG figures into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    json_path = folder / "results.json"
    json_path.write_text(json.dumps(json_safe(report), indent=1, allow_nan=False) + "\n")
    csv_path = folder / "results.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS, extrasaction="ignore")
        writer.writeheader()
        for row in report["rows"]:
            writer.writerow({field: json_safe(row.get(field)) for field in CSV_FIELDS})
    paths = [json_path, csv_path]
    if plots:
        from fprecond.compare.plots import plot_all

        paths += plot_all(report, folder)
    return paths
