"""What a finished run writes into its folder: metrics, tables, summary and plots.

Layout of a run folder::

    config.json               the resolved configuration
    metrics.json              every metric of docs/METHOD.md per method and seed, and mean +- std
    accuracy_matrix.csv       R[t][j] per method and seed
    pruning.csv               the pruning decisions of the gated SD-LoRA runs
    absorption.csv            the direction fits of the SD-LoRA-KD runs
    summary.md                one table row per method
    plots/*.png               seen-class accuracy (top-1, nearest class mean, top-5), old- and
                              new-class accuracy, accuracy matrices, alpha/beta per adapter, last
                              accuracy against trainable parameters (several methods)
    <method>/seed<k>/         Avalanche's CSV and TensorBoard logs, checkpoint.pkl, progress.json
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from avalanche_sdlora.runner.outputs import write_csv, write_json, write_text
from avalanche_sdlora.runner.plots import (
    plot_accuracy_matrix,
    plot_adapters,
    plot_gate_trace,
    plot_old_new_accuracy,
    plot_params_vs_accuracy,
    plot_seen_accuracy,
)
from avalanche_sdlora.runner.report import RunReport

__all__ = [
    "SUMMARY_METRICS",
    "final_value",
    "jsonable",
    "summarize_seeds",
    "summary_table",
    "write_run_folder",
]

SUMMARY_METRICS = (
    "last_accuracy",
    "last_top5_accuracy",
    "last_old_class_accuracy",
    "last_new_class_accuracy",
    "nme_last_accuracy",
    "average_incremental_accuracy",
    "average_forgetting",
    "backward_transfer",
    "active_adapters",
    "trainable_parameters",
    "train_seconds",
    "wall_seconds",
    "data_seconds",
    "forward_backward_seconds",
    "eval_seconds",
    "peak_memory_mb",
    "experiences_without_growth",
)

_LAST_OF = {
    "last_old_class_accuracy": "old_class_accuracy",
    "last_new_class_accuracy": "new_class_accuracy",
}
"""Summary metrics that are the last entry of a per-experience list of the report."""


def jsonable(value: Any) -> Any:
    """Metric dictionaries hold floats, tensors and NumPy scalars; keep the JSON-able numbers."""
    if isinstance(value, Mapping):
        converted = {str(k): jsonable(v) for k, v in value.items()}
        return {k: v for k, v in converted.items() if v is not None}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    if isinstance(value, np.generic) or (isinstance(value, torch.Tensor) and value.numel() == 1):
        return value.item()
    return None


def final_value(report: RunReport, key: str) -> float:
    """One run's figure for a summary metric: totals of time (NaN for a part of the time split
    that a run recorded before it existed lacks), the maximum of memory, the adapter and
    parameter counts and the old- and new-class accuracies after the last experience; NaN for
    what the run did not measure."""
    if key in ("train_seconds", "wall_seconds"):
        return float(sum(r.get(key, 0.0) for r in report.experiences))
    if key.endswith("_seconds"):
        parts = [r[key] for r in report.experiences if key in r]
        return float(sum(parts)) if parts else float("nan")
    if key == "peak_memory_mb":
        return float(max(r.get(key, 0.0) for r in report.experiences))
    if key in ("active_adapters", "trainable_parameters"):
        return float(report.experiences[-1].get(key, float("nan")))
    value = getattr(report, _LAST_OF[key])[-1] if key in _LAST_OF else getattr(report, key)
    return float("nan") if value is None else float(value)


def summarize_seeds(reports: Sequence[RunReport]) -> dict[str, dict[str, float]]:
    """Mean and std over seeds of every summary metric (:func:`final_value`)."""
    summary = {}
    for key in SUMMARY_METRICS:
        values = np.asarray([final_value(report, key) for report in reports])
        summary[key] = {"mean": float(values.mean()), "std": float(values.std())}
    return summary


def write_run_folder(
    run_dir: Path, metrics: dict, results: dict[str, dict[int, RunReport]]
) -> None:
    """Write ``metrics`` and the tables and plots of ``results`` (method -> seed -> report)."""
    write_json(run_dir / "metrics.json", jsonable(metrics))
    experiences = len(next(iter(next(iter(results.values())).values())).accuracy_matrix)
    write_csv(
        run_dir / "accuracy_matrix.csv",
        ["method", "seed", "after_experience", *[f"exp{j}" for j in range(experiences)]],
        (
            [method, seed, t, *(f"{v:.2f}" for v in row)]
            for method, per_seed in results.items()
            for seed, report in per_seed.items()
            for t, row in enumerate(report.accuracy_matrix)
        ),
    )
    decision_fields = [
        "experience",
        "adapter",
        "alpha",
        "logit",
        "eval_beta",
        "mean_beta",
        "frequency",
        "pruned",
        "new",
        "agreement",
        "grew",
        "unused",
        "gain",
    ]
    write_csv(
        run_dir / "pruning.csv",
        ["method", "seed", *decision_fields],
        (
            [method, seed, *(row[f] for f in decision_fields)]
            for method, per_seed in results.items()
            for seed, report in per_seed.items()
            for row in report.pruning
        ),
    )
    fit_fields = ["experience", "adapter", "block", "projection", "residual", "absorbed"]
    write_csv(
        run_dir / "absorption.csv",
        ["method", "seed", *fit_fields, "coefficients"],
        (
            [method, seed, *(row[f] for f in fit_fields), json.dumps(row["coefficients"])]
            for method, per_seed in results.items()
            for seed, report in per_seed.items()
            for row in report.absorption
        ),
    )
    write_text(run_dir / "summary.md", summary_table(metrics))
    plots = run_dir / "plots"
    if len(results) > 1:
        plot_params_vs_accuracy(
            {
                method: [
                    (final_value(r, "trainable_parameters"), r.last_accuracy)
                    for r in per_seed.values()
                ]
                for method, per_seed in results.items()
            },
            plots / "params_vs_accuracy.png",
        )
    nme = {
        f"{m} (NME)": [r.nme_seen_class_accuracy for r in s.values()]
        for m, s in results.items()
        if all(r.nme_seen_class_accuracy for r in s.values())
    }
    plot_seen_accuracy(
        {**{m: [r.seen_class_accuracy for r in s.values()] for m, s in results.items()}, **nme},
        plots / "seen_accuracy.png",
    )
    top5 = {
        m: [r.top5_seen_class_accuracy for r in s.values()]
        for m, s in results.items()
        if all(r.top5_seen_class_accuracy for r in s.values())
    }
    if top5:
        plot_seen_accuracy(
            top5, plots / "seen_top5_accuracy.png", "top-5 accuracy on seen classes (%)"
        )
    plot_old_new_accuracy(
        {
            m: (
                [r.old_class_accuracy for r in s.values()],
                [r.new_class_accuracy for r in s.values()],
            )
            for m, s in results.items()
        },
        plots / "old_new_accuracy.png",
    )
    for method, per_seed in results.items():
        seed, report = next(iter(per_seed.items()))
        plot_accuracy_matrix(
            report.accuracy_matrix,
            f"{method} (seed {seed})",
            plots / f"accuracy_matrix_{method}.png",
        )
        if report.gate_trace:
            plot_gate_trace(
                report.gate_trace, f"{method} (seed {seed})", plots / f"gate_trace_{method}.png"
            )
        if report.experiences and report.experiences[-1].get("adapters"):  # head_only has none
            plot_adapters(
                report.experiences, f"{method} (seed {seed})", plots / f"adapters_{method}.png"
            )


def _cell(statistic: Mapping[str, float], seeds: int, digits: int = 2) -> str:
    """``mean +- std`` over seeds (just the value for one seed; ``-`` where not applicable)."""
    mean, std = statistic["mean"], statistic["std"]
    if np.isnan(mean):
        return "-"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if seeds > 1 else f"{mean:.{digits}f}"


def summary_table(metrics: Mapping[str, Any]) -> str:
    measured_nme = any(
        not np.isnan(entry["summary"]["nme_last_accuracy"]["mean"])
        for entry in metrics["methods"].values()
    )
    columns = (
        ("last acc. (%)", "last_accuracy", 2),
        ("top-5 last acc. (%)", "last_top5_accuracy", 2),
        ("last acc., old classes (%)", "last_old_class_accuracy", 2),
        ("last acc., new classes (%)", "last_new_class_accuracy", 2),
        *((("NME last acc. (%)", "nme_last_accuracy", 2),) if measured_nme else ()),
        ("avg. incremental acc. (%)", "average_incremental_accuracy", 2),
        ("avg. forgetting (%)", "average_forgetting", 2),
        ("active adapters", "active_adapters", 1),
        ("trainable params", "trainable_parameters", 0),
        ("train time (s)", "train_seconds", 1),
        ("wall time (s)", "wall_seconds", 1),
    )
    lines = [
        "| method | seeds | " + " | ".join(title for title, _, _ in columns) + " |",
        "|---|---|" + "---|" * len(columns),
    ]
    for method, entry in metrics["methods"].items():
        seeds, summary = len(entry["seeds"]), entry["summary"]
        cells = [_cell(summary[key], seeds, digits) for _, key, digits in columns]
        lines.append(f"| {method} | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
