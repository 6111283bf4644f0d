"""Plots of a run, as PNG: accuracy on the seen classes per method, accuracy on the old and the new
classes, accuracy matrices, each adapter's alpha and beta over the experiences, and last accuracy
against trainable parameters.

Figures are drawn with ``matplotlib.figure.Figure`` and saved by its own canvas, never through
``pyplot``: no backend is chosen and no global state is touched, on import or when drawing."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from avalanche_sdlora.runner.outputs import atomic_write

__all__ = [
    "plot_accuracy_matrix",
    "plot_adapters",
    "plot_gate_trace",
    "plot_old_new_accuracy",
    "plot_params_vs_accuracy",
    "plot_seen_accuracy",
]


def _save(figure: Figure, path: Path) -> None:
    atomic_write(path, lambda target: figure.savefig(target, dpi=120, format="png"))


def _plot_over_seeds(axis, per_seed: Sequence[Sequence[float | None]], **style) -> None:
    """One line: the mean over seeds after each experience (None: not defined there, e.g. old
    classes after the first), with a +-1 std band where there are several seeds."""
    values = np.asarray(per_seed, dtype=float)
    mean, std = values.mean(axis=0), values.std(axis=0)
    steps = np.arange(1, values.shape[1] + 1)
    axis.plot(steps, mean, marker="o", **style)
    if values.shape[0] > 1:
        axis.fill_between(steps, mean - std, mean + std, alpha=0.2)


def plot_seen_accuracy(
    curves: Mapping[str, Sequence[Sequence[float]]],
    path: Path,
    ylabel: str = "accuracy on seen classes (%)",
) -> None:
    """Accuracy (%) on the classes seen so far after each experience; one line per method
    (mean over seeds, with a +-1 std band where there are several)."""
    figure = Figure(figsize=(7, 4.5))
    axis = figure.subplots()
    for method, per_seed in curves.items():
        _plot_over_seeds(axis, per_seed, label=method)
    axis.set_xlabel("experiences trained")
    axis.set_ylabel(ylabel)
    axis.grid(alpha=0.3)
    axis.legend()
    _save(figure, path)


def plot_old_new_accuracy(
    curves: Mapping[str, tuple[Sequence[Sequence[float | None]], Sequence[Sequence[float]]]],
    path: Path,
) -> None:
    """Accuracy (%) on the old classes (dashed) and on the new classes of the experience just
    trained (solid) after each experience, one colour per method (mean over seeds)."""
    figure = Figure(figsize=(7, 4.5))
    axis = figure.subplots()
    for k, (method, (old, new)) in enumerate(curves.items()):
        colour = f"C{k % 10}"
        _plot_over_seeds(axis, new, color=colour, label=f"{method}: new classes")
        _plot_over_seeds(axis, old, color=colour, linestyle="--", label=f"{method}: old classes")
    axis.set_xlabel("experiences trained")
    axis.set_ylabel("accuracy (%)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    _save(figure, path)


def plot_accuracy_matrix(matrix: Sequence[Sequence[float]], title: str, path: Path) -> None:
    """``R[t][j]`` as a heatmap: rows the experience just trained, columns the tested experience."""
    values = np.asarray(matrix, dtype=float)
    size = max(4.0, 0.5 * values.shape[0] + 2)
    figure = Figure(figsize=(size, size))
    axis = figure.subplots()
    image = axis.imshow(values, vmin=0, vmax=100, cmap="viridis")
    for (row, column), value in np.ndenumerate(values):
        axis.text(column, row, f"{value:.0f}", ha="center", va="center", color="w", fontsize=7)
    axis.set_xlabel("tested experience")
    axis.set_ylabel("after training experience")
    axis.set_title(title)
    figure.colorbar(image, ax=axis, label="accuracy (%)")
    _save(figure, path)


def plot_adapters(experience_log: Sequence[Mapping], title: str, path: Path) -> None:
    """Each adapter's alpha and evaluation beta after every experience (pruned: not drawn)."""
    figure = Figure(figsize=(11, 4))
    alpha_axis, beta_axis = figure.subplots(1, 2)
    adapters = {a["adapter"] for record in experience_log for a in record["adapters"]}
    for adapter in sorted(adapters):
        points = [
            (record["experience"], a["alpha"], a["beta"])
            for record in experience_log
            for a in record["adapters"]
            if a["adapter"] == adapter and not a["pruned"]
        ]
        if not points:
            continue
        steps, alphas, betas = zip(*points, strict=True)
        alpha_axis.plot(steps, alphas, marker="o", label=f"adapter {adapter}")
        beta_axis.plot(steps, betas, marker="o", label=f"adapter {adapter}")
    for axis, name in ((alpha_axis, "alpha (magnitude)"), (beta_axis, "beta (gate, evaluation)")):
        axis.set_xlabel("after experience")
        axis.set_ylabel(name)
        axis.grid(alpha=0.3)
    beta_axis.legend(fontsize=7, ncol=2)
    figure.suptitle(title)
    _save(figure, path)


def plot_gate_trace(trace: Sequence[Mapping], title: str, path: Path) -> None:
    """Each adapter's alpha, mean training beta and their product after every training epoch.

    A beta falling while alpha rises, with the product steady, is the compensation the two phases
    are meant to prevent.
    """
    epochs: dict[tuple[int, int], int] = {}
    for row in trace:
        epochs.setdefault((row["experience"], row["epoch"]), len(epochs))
    figure = Figure(figsize=(15, 4))
    axes = figure.subplots(1, 3)
    for adapter in sorted({row["adapter"] for row in trace}):
        rows = [row for row in trace if row["adapter"] == adapter]
        steps = [epochs[(row["experience"], row["epoch"])] for row in rows]
        alphas = np.asarray([row["alpha"] for row in rows])
        betas = np.asarray([row["beta"] for row in rows])
        for axis, values in zip(axes, (alphas, betas, alphas * betas), strict=True):
            axis.plot(steps, values, label=f"adapter {adapter}")
    for axis, name in zip(axes, ("alpha", "mean beta (training)", "alpha x beta"), strict=True):
        axis.set_xlabel("training epoch (all experiences)")
        axis.set_ylabel(name)
        axis.grid(alpha=0.3)
    axes[-1].legend(fontsize=7, ncol=2)
    figure.suptitle(title)
    _save(figure, path)


def plot_params_vs_accuracy(
    points: Mapping[str, Sequence[tuple[float, float]]], path: Path
) -> None:
    """Last accuracy (%) against the trainable parameters at the end, one point per method and
    seed: which way of limiting growth buys most accuracy per parameter (log scale). Methods that
    land on the same point (a variant that changed nothing) stay visible as nested markers."""
    figure = Figure(figsize=(7, 4.5))
    axis = figure.subplots()
    markers = "osD^vPX*"
    for k, (method, per_seed) in enumerate(points.items()):
        parameters, accuracies = zip(*per_seed, strict=True)
        # a marker and size per method, largest first, so that methods on the same point all show
        size = max(20.0, 110.0 - 15.0 * k)
        axis.scatter(parameters, accuracies, s=size, marker=markers[k % len(markers)], label=method)
    axis.set_xscale("log")
    axis.set_xlabel("trainable parameters at the end (log scale)")
    axis.set_ylabel("last accuracy (%)")
    axis.grid(alpha=0.3, which="both")
    axis.legend(fontsize=8)
    _save(figure, path)
