"""What SD-LoRA-KD's fits saw in a run: how many projections were absorbed, and the residuals.

    python benchmarks/absorption_stats.py runs/results_variants/metrics.json

Reads the direction fits (``absorption`` in ``metrics.json``) of every run that has them and prints
markdown: per method and seed, fits and absorptions; per experience, the residuals' minimum, median
and maximum over all seeds; and how many fits fall below a range of thresholds. The counts at other
thresholds are read off the recorded fits, which followed the run's own absorptions (none, when
nothing was absorbed), so they show where a threshold would start to act, not a rerun's outcome.
They use no test data: a threshold chosen from them is chosen on training quantities only.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

THRESHOLDS = (9e-4, 1e-2, 0.1, 0.3, 0.5)


def fits_by_method(metrics: Mapping) -> dict[str, dict[str, list[Mapping]]]:
    """``{method: {seed: fits}}`` of the runs with direction fits."""
    return {
        method: {seed: report["absorption"] for seed, report in entry["seeds"].items()}
        for method, entry in metrics["methods"].items()
        if any(report.get("absorption") for report in entry["seeds"].values())
    }


def residual_table(fits: Sequence[Mapping]) -> list[tuple[int, int, float, float, float]]:
    """``(experience, fits, min, median, max)`` of the residuals, per experience."""
    by_experience: dict[int, list[float]] = defaultdict(list)
    for fit in fits:
        by_experience[fit["experience"]].append(fit["residual"])
    return [
        (experience, len(values), min(values), statistics.median(values), max(values))
        for experience, values in sorted(by_experience.items())
    ]


def below(fits: Sequence[Mapping], thresholds: Sequence[float] = THRESHOLDS) -> dict[float, int]:
    """How many fits have a residual below each threshold."""
    return {t: sum(fit["residual"] < t for fit in fits) for t in thresholds}


def report(metrics: Mapping) -> str:
    lines = []
    for method, per_seed in fits_by_method(metrics).items():
        lines += [f"## {method}", "", "| seed | fits | absorbed |", "|---|---|---|"]
        for seed, fits in per_seed.items():
            lines.append(f"| {seed} | {len(fits)} | {sum(f['absorbed'] for f in fits)} |")
        every = [fit for fits in per_seed.values() for fit in fits]
        lines += [
            "",
            "| experience | fits | min residual | median | max |",
            "|---|---|---|---|---|",
        ]
        for experience, count, low, middle, high in residual_table(every):
            lines.append(f"| {experience} | {count} | {low:.4f} | {middle:.4f} | {high:.4f} |")
        counts = below(every)
        lines += [
            "",
            "| threshold | " + " | ".join(f"{t:g}" for t in counts) + " |",
            "|---|" + "---|" * len(counts),
            "| fits below | " + " | ".join(str(c) for c in counts.values()) + " |",
            "",
        ]
    return "\n".join(lines) if lines else "no run with direction fits\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("metrics", type=Path)
    args = parser.parse_args()
    print(report(json.loads(args.metrics.read_text())))


if __name__ == "__main__":
    main()
