"""One markdown row per (run, method) of several runs, with the difference from ``head_only``.

    python benchmarks/lever_table.py runs/levers/*/metrics.json

Each run is named by its folder. Rows give last accuracy, average incremental accuracy and average
forgetting (mean over seeds, %) and last accuracy minus the same run's ``head_only`` row (blank when
the run has none): how much the adapters buy at that run's settings.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Mapping
from pathlib import Path

CONTROL = "head_only"
COLUMNS = ("last_accuracy", "average_incremental_accuracy", "average_forgetting")


def rows(name: str, metrics: Mapping) -> list[str]:
    """The markdown rows of one run's ``metrics.json``."""
    means = {
        method: {c: statistics.fmean(s[c] for s in entry["seeds"].values()) for c in COLUMNS}
        for method, entry in metrics["methods"].items()
    }
    control = means.get(CONTROL, {}).get("last_accuracy")
    lines = []
    for method, values in means.items():
        seeds = len(metrics["methods"][method]["seeds"])
        gain = "" if control is None else f"{values['last_accuracy'] - control:+.2f}"
        numbers = " | ".join(f"{values[c]:.2f}" for c in COLUMNS)
        lines.append(f"| {name} | {method} | {seeds} | {numbers} | {gain} |")
    return lines


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("metrics", nargs="+", type=Path, help="metrics.json of each run")
    args = parser.parse_args(argv)
    lines = [
        "| run | method | seeds | last acc. (%) | avg. incremental acc. (%) | avg. forgetting (%) "
        f"| last acc. minus {CONTROL} |",
        "|---|---|---|---|---|---|---|",
    ]
    for path in args.metrics:
        lines.extend(rows(path.parent.name, json.loads(path.read_text())))
    text = "\n".join(lines)
    print(text)
    return text


if __name__ == "__main__":
    main()
