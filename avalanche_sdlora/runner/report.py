"""Turn a finished run into the metrics of docs/METHOD.md.

The input is what an Avalanche run leaves behind: the dictionaries ``strategy.eval(test_stream)``
returned after each training experience (Avalanche's per-experience accuracy metrics), and, for SD-LoRA,
the strategy's ``experience_log`` and the pruning plugin's ``history``. Accuracies are in percent.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from avalanche_sdlora.absorption import DirectionFit
from avalanche_sdlora.pruning import AdapterDecision

__all__ = ["RunReport", "accuracy_matrix", "summarize_run"]

_EXPERIENCE_KEY = re.compile(r"^Top1_Acc_Exp/eval_phase/(?P<stream>[^/]+)/Task\d+/Exp(?P<exp>\d+)$")


def accuracy_matrix(
    eval_results: Sequence[Mapping[str, float]], stream: str = "test_stream"
) -> np.ndarray:
    """``R[t][j]``: accuracy (%) on experience j's test data after training experience t.

    ``eval_results[t]`` is the dictionary returned by ``strategy.eval(<stream>)`` after experience t,
    with Avalanche's ``accuracy_metrics(experience=True)``.
    """
    if not eval_results:
        raise ValueError("no evaluation results: evaluate the test stream after each experience")
    rows = []
    for t, results in enumerate(eval_results):
        found = {}
        for key, value in results.items():
            match = _EXPERIENCE_KEY.match(key)
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
    """The metrics of one run (docs/METHOD.md); accuracies in percent."""

    accuracy_matrix: list[list[float]]
    last_accuracy: float
    average_incremental_accuracy: float
    average_forgetting: float
    backward_transfer: float
    seen_class_accuracy: list[float]
    experiences: list[dict] = field(default_factory=list)
    pruning: list[dict] = field(default_factory=list)
    gate_trace: list[dict] = field(default_factory=list)
    absorption: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def summarize_run(
    eval_results: Sequence[Mapping[str, float]],
    experience_log: Sequence[Mapping] = (),
    pruning_history: Sequence[AdapterDecision] = (),
    gate_trace: Sequence[Mapping] = (),
    test_sizes: Sequence[int] | None = None,
    stream: str = "test_stream",
    absorption_fits: Sequence[DirectionFit] = (),
) -> RunReport:
    """Accuracy matrix, last and average incremental accuracy, forgetting and BWT, plus the per-
    experience records (active adapters, trainable parameters, wall time per phase, peak memory),
    the pruning decisions, the per-epoch alpha/beta trace (``GateTracePlugin.trace``) and the
    SD-LoRA-KD direction fits.

    ``test_sizes`` (samples per experience's test set) weights the accuracy on the classes seen so
    far; without it every experience weighs the same (the benchmarks here have equal sizes).
    """
    matrix = accuracy_matrix(eval_results, stream)
    steps = matrix.shape[0]
    weights = np.ones(steps) if test_sizes is None else np.asarray(test_sizes, dtype=float)
    if weights.shape != (steps,):
        raise ValueError(
            f"test_sizes must have one entry per experience ({steps}), got {test_sizes}"
        )
    seen = [float(np.average(matrix[t, : t + 1], weights=weights[: t + 1])) for t in range(steps)]
    if steps > 1:
        earlier = matrix[:-1, :-1]
        trained = np.tril(np.ones_like(earlier, dtype=bool))  # R[t][j] with t >= j
        final, best_before = matrix[-1, :-1], np.where(trained, earlier, -np.inf).max(axis=0)
        forgetting = float(np.mean(best_before - final))
        bwt = float(np.mean(final - np.diag(matrix)[:-1]))
    else:
        forgetting = bwt = 0.0
    return RunReport(
        accuracy_matrix=matrix.tolist(),
        last_accuracy=seen[-1],
        average_incremental_accuracy=float(np.mean(seen)),
        average_forgetting=forgetting,
        backward_transfer=bwt,
        seen_class_accuracy=seen,
        experiences=[dict(record) for record in experience_log],
        pruning=[decision.as_dict() for decision in pruning_history],
        gate_trace=[dict(row) for row in gate_trace],
        absorption=[fit.as_dict() for fit in absorption_fits],
    )
