"""Turn a finished run into the metrics of docs/METHOD.md.

The input is what an Avalanche run leaves behind: the dictionaries ``strategy.eval(test_stream)``
returned after each training experience (Avalanche's per-experience accuracy metrics, with the top-5
and nearest-class-mean accuracies of :mod:`avalanche_sdlora.runner.metrics` where they were
measured), and, for SD-LoRA, the strategy's ``experience_log`` and the pruning plugin's ``history``.
Accuracies are in percent.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from avalanche_sdlora.absorption import DirectionFit
from avalanche_sdlora.pruning import AdapterDecision, experiences_without_growth
from avalanche_sdlora.runner.metrics import NME_METRIC, TOP5_METRIC

__all__ = ["RunReport", "accuracy_matrix", "summarize_run"]

TOP1_METRIC = "Top1_Acc_Exp"


def _experience_key(metric: str) -> re.Pattern:
    return re.compile(
        rf"^{re.escape(metric)}/eval_phase/(?P<stream>[^/]+)/Task\d+/Exp(?P<exp>\d+)$"
    )


def accuracy_matrix(
    eval_results: Sequence[Mapping[str, float]],
    stream: str = "test_stream",
    metric: str = TOP1_METRIC,
) -> np.ndarray:
    """``R[t][j]``: accuracy (%) on experience j's test data after training experience t.

    ``eval_results[t]`` is the dictionary returned by ``strategy.eval(<stream>)`` after experience t,
    with Avalanche's ``accuracy_metrics(experience=True)`` (or another per-experience ``metric``).
    """
    if not eval_results:
        raise ValueError("no evaluation results: evaluate the test stream after each experience")
    pattern = _experience_key(metric)
    rows = []
    for t, results in enumerate(eval_results):
        found = {}
        for key, value in results.items():
            match = pattern.match(key)
            if match and match["stream"] == stream:
                found[int(match["exp"])] = 100.0 * float(value)
        if sorted(found) != list(range(len(found))) or len(found) < len(eval_results):
            raise ValueError(
                f"evaluation {t} lacks per-experience accuracies on {stream!r} for experiences "
                f"0..{len(eval_results) - 1} (found {sorted(found)}); use "
                "accuracy_metrics(experience=True) and evaluate the whole test stream"
            )
        rows.append([found[j] for j in range(len(eval_results))])
    return np.asarray(rows)


@dataclass
class RunReport:
    """The metrics of one run (docs/METHOD.md); accuracies in percent.

    Old classes after experience t are those of experiences 0..t-1 (none after the first), new ones
    those of experience t. The top-5 and nearest-class-mean (``nme_``) figures are ``None`` where
    they were not measured (``nme_`` only with ``sdlora.eval_nme``).
    """

    accuracy_matrix: list[list[float]]
    last_accuracy: float
    average_incremental_accuracy: float
    average_forgetting: float
    backward_transfer: float
    seen_class_accuracy: list[float]
    old_class_accuracy: list[float | None] = field(default_factory=list)
    new_class_accuracy: list[float] = field(default_factory=list)
    top5_accuracy_matrix: list[list[float]] | None = None
    top5_seen_class_accuracy: list[float] | None = None
    last_top5_accuracy: float | None = None
    nme_accuracy_matrix: list[list[float]] | None = None
    nme_seen_class_accuracy: list[float] | None = None
    nme_last_accuracy: float | None = None
    experiences: list[dict] = field(default_factory=list)
    pruning: list[dict] = field(default_factory=list)
    gate_trace: list[dict] = field(default_factory=list)
    absorption: list[dict] = field(default_factory=list)
    experiences_without_growth: int | None = None
    """Experiences whose new adapter did not survive the growth decision (``None``: no decision)."""

    def as_dict(self) -> dict:
        return asdict(self)


def _seen(matrix: np.ndarray, weights: np.ndarray) -> list[float]:
    """After each experience t, the accuracy on the test images of experiences 0..t."""
    steps = len(matrix)
    return [float(np.average(matrix[t, : t + 1], weights=weights[: t + 1])) for t in range(steps)]


def _measured(
    eval_results: Sequence[Mapping[str, float]], stream: str, metric: str, weights: np.ndarray
) -> tuple[list[list[float]] | None, list[float] | None, float | None]:
    """``metric``'s accuracy matrix, seen-class accuracies and last accuracy, or ``None`` for each
    when the run did not measure it."""
    if not any(key.startswith(f"{metric}/") for key in eval_results[0]):
        return None, None, None
    matrix = accuracy_matrix(eval_results, stream, metric)
    seen = _seen(matrix, weights)
    return matrix.tolist(), seen, seen[-1]


def summarize_run(
    eval_results: Sequence[Mapping[str, float]],
    experience_log: Sequence[Mapping] = (),
    pruning_history: Sequence[AdapterDecision] = (),
    gate_trace: Sequence[Mapping] = (),
    test_sizes: Sequence[int] | None = None,
    stream: str = "test_stream",
    absorption_fits: Sequence[DirectionFit] = (),
) -> RunReport:
    """Accuracy matrix, last and average incremental accuracy, forgetting and BWT, old- and new-class
    accuracy after each experience, the top-5 and nearest-class-mean accuracies where measured, plus
    the per-experience records (active adapters, trainable parameters, wall time per phase, peak
    memory), the pruning decisions (and the number of experiences in which the model did not
    grow), the per-epoch alpha/beta trace (``GateTracePlugin.trace``) and
    the SD-LoRA-KD direction fits.

    ``test_sizes`` (samples per experience's test set) weights the accuracy over several
    experiences; without it every experience weighs the same.
    """
    matrix = accuracy_matrix(eval_results, stream)
    steps = matrix.shape[0]
    weights = np.ones(steps) if test_sizes is None else np.asarray(test_sizes, dtype=float)
    if weights.shape != (steps,):
        raise ValueError(
            f"test_sizes must have one entry per experience ({steps}), got {test_sizes}"
        )
    seen = _seen(matrix, weights)
    if steps > 1:
        earlier = matrix[:-1, :-1]
        trained = np.tril(np.ones_like(earlier, dtype=bool))  # R[t][j] with t >= j
        final, best_before = matrix[-1, :-1], np.where(trained, earlier, -np.inf).max(axis=0)
        forgetting = float(np.mean(best_before - final))
        bwt = float(np.mean(final - np.diag(matrix)[:-1]))
    else:
        forgetting = bwt = 0.0
    old = [
        float(np.average(matrix[t, :t], weights=weights[:t])) if t else None for t in range(steps)
    ]
    top5 = _measured(eval_results, stream, TOP5_METRIC, weights)
    nme = _measured(eval_results, stream, NME_METRIC, weights)
    decisions = [decision.as_dict() for decision in pruning_history]
    return RunReport(
        accuracy_matrix=matrix.tolist(),
        last_accuracy=seen[-1],
        average_incremental_accuracy=float(np.mean(seen)),
        average_forgetting=forgetting,
        backward_transfer=bwt,
        seen_class_accuracy=seen,
        old_class_accuracy=old,
        new_class_accuracy=[float(matrix[t, t]) for t in range(steps)],
        top5_accuracy_matrix=top5[0],
        top5_seen_class_accuracy=top5[1],
        last_top5_accuracy=top5[2],
        nme_accuracy_matrix=nme[0],
        nme_seen_class_accuracy=nme[1],
        nme_last_accuracy=nme[2],
        experiences=[dict(record) for record in experience_log],
        pruning=decisions,
        gate_trace=[dict(row) for row in gate_trace],
        absorption=[fit.as_dict() for fit in absorption_fits],
        experiences_without_growth=len(experiences_without_growth(decisions))
        if decisions
        else None,
    )
