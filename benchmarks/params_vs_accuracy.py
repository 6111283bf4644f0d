"""Accuracy per parameter across runs: last accuracy against trainable parameters at the end.

    python benchmarks/params_vs_accuracy.py A/metrics.json B/metrics.json --output plot.png

Gathers the methods of several runs made on the same settings (such as the study's two runs,
``benchmarks/results.sh`` and ``benchmarks/variants.sh``) into one plot (one point per method and
seed, as a run's own ``plots/params_vs_accuracy.png``) and prints one markdown row per method. A
method present in more than one file is an error: which run would it be?
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

from avalanche_sdlora.runner.plots import plot_params_vs_accuracy


def points(runs: Sequence[Mapping]) -> dict[str, list[tuple[float, float]]]:
    """``{method: [(trainable parameters, last accuracy) per seed]}`` over every run."""
    gathered: dict[str, list[tuple[float, float]]] = {}
    for metrics in runs:
        for method, entry in metrics["methods"].items():
            if method in gathered:
                raise ValueError(f"method {method!r} appears in more than one metrics file")
            gathered[method] = [
                (report["experiences"][-1]["trainable_parameters"], report["last_accuracy"])
                for report in entry["seeds"].values()
            ]
    return gathered


def table(gathered: Mapping[str, Sequence[tuple[float, float]]]) -> str:
    lines = ["| method | seeds | trainable params | last acc. (%) |", "|---|---|---|---|"]
    for method, per_seed in sorted(gathered.items(), key=lambda item: item[1][0][0]):
        params = statistics.fmean(p for p, _ in per_seed)
        accuracy = [a for _, a in per_seed]
        spread = f" ± {statistics.pstdev(accuracy):.2f}" if len(accuracy) > 1 else ""
        mean = statistics.fmean(accuracy)
        lines.append(f"| {method} | {len(per_seed)} | {params:,.0f} | {mean:.2f}{spread} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("metrics", type=Path, nargs="+")
    parser.add_argument("--output", type=Path, required=True, help="the PNG to write")
    args = parser.parse_args()
    try:
        gathered = points([json.loads(path.read_text()) for path in args.metrics])
    except ValueError as error:
        parser.error(str(error))
    plot_params_vs_accuracy(gathered, args.output)
    print(table(gathered), end="")


if __name__ == "__main__":
    main()
