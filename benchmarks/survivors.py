"""Which adapters survive a run, per method and seed, and how much the survivors overlap across seeds.

    python benchmarks/survivors.py benchmarks/results/metrics.json [more metrics.json ...]

The stability of the growth and pruning decision over training seeds (issue 17): a rule without
noise always agrees with itself when its noise is re-drawn (the decisions' ``agreement``), so what
decides its outcome is the noise of training, and that is measured by running the same method on
several seeds. An adapter is named by the experience that added it (one per experience, in every
run); it survives when no decision of the run pruned it. Two seeds' survivors overlap by their
Jaccard index ``|A & B| / |A | B|``; a method's figure is the mean (and the minimum) over its pairs
of seeds. The decision tables of ``metrics.json`` (``pruning``) are read; methods without one (no
gate) are left out. Experiences without growth are those whose new adapter did not survive its
growth decision. Seeds may come from several files, as the study's parts (``study_table.py``).
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from avalanche_sdlora.pruning import experiences_without_growth

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling script, run or loaded
from study_table import load_part, seeds_by_method


def survivors(decisions: Iterable[Mapping[str, Any]]) -> set[int]:
    """The adapters of a decision table that no decision pruned."""
    rows = list(decisions)
    return {row["adapter"] for row in rows} - {row["adapter"] for row in rows if row["pruned"]}


def jaccard(a: set[int], b: set[int]) -> float:
    """``|a & b| / |a | b|``; 1 for two empty sets."""
    return len(a & b) / len(a | b) if a | b else 1.0


def _names(adapters: Iterable[int]) -> str:
    return ", ".join(str(a) for a in sorted(adapters)) or "none"


def per_seed(methods: Mapping[str, Mapping[str, Mapping]]) -> str:
    """One markdown row per method and seed: survivors, kept share, experiences without growth."""
    lines = [
        "| method | seed | survivors | kept | experiences without growth |",
        "|---|---|---|---|---|",
    ]
    for method, seeds in methods.items():
        for seed, report in sorted(seeds.items(), key=lambda item: int(item[0])):
            table = report["pruning"]
            added = len({row["adapter"] for row in table})
            declined = experiences_without_growth(table)
            without = f"{len(declined)}" + (f" ({_names(declined)})" if declined else "")
            kept = f"{len(survivors(table))}/{added}"
            lines.append(f"| {method} | {seed} | {_names(survivors(table))} | {kept} | {without} |")
    return "\n".join(lines)


def overlap(methods: Mapping[str, Mapping[str, Mapping]]) -> str:
    """One markdown row per method run on several seeds: the survivors' pairwise Jaccard index
    (mean and minimum) and the adapters that survive in every seed."""
    lines = [
        "| method | seeds | mean pairwise Jaccard | min | survive in every seed |",
        "|---|---|---|---|---|",
    ]
    for method, seeds in methods.items():
        sets = [survivors(report["pruning"]) for report in seeds.values()]
        if len(sets) < 2:
            continue
        pairs = [jaccard(a, b) for a, b in itertools.combinations(sets, 2)]
        common = set.intersection(*sets)
        cells = [method, str(len(sets)), f"{statistics.fmean(pairs):.3f}", f"{min(pairs):.3f}"]
        lines.append("| " + " | ".join([*cells, _names(common)]) + " |")
    return "\n".join(lines)


def gated(metrics: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Mapping]]:
    """The seeds of every method whose runs have a decision table."""
    return {
        method: seeds
        for method, seeds in seeds_by_method(metrics).items()
        if all(report.get("pruning") for report in seeds.values())
    }


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("metrics", nargs="+", type=Path, help="metrics.json of each run or part")
    args = parser.parse_args(argv)
    methods = gated(load_part(path) for path in args.metrics)
    text = (
        f"Surviving adapters per seed (adapter i: experience i's):\n\n{per_seed(methods)}\n\n"
        f"Overlap of the survivors across seeds:\n\n{overlap(methods)}"
    )
    print(text)
    return text


if __name__ == "__main__":
    main()
