"""Does alpha compensate beta? Reads a run's ``metrics.json`` and measures, for every SD-LoRA method
with a gate trace, how each old adapter's alpha and training beta moved after its own experience.

Compensation (the identifiability problem of training the gate and the magnitudes together) shows as
beta falling while |alpha| rises, so that alpha x beta, what the model actually applies, stays put:
|alpha| and beta moving in opposite directions in most epochs (independent moves: about half), and
a product ratio near 1 while the beta ratio is well below 1.

    python benchmarks/compensation.py runs/results/metrics.json
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np


def adapter_paths(trace: Sequence[Mapping]) -> dict[int, list[tuple[float, float]]]:
    """Per adapter, its (|alpha|, beta) after every epoch of the experiences after its own.

    Adapter k is added in experience k. Its own experience is left out: there alpha scales the raw
    ``B A``, and consolidation rescales it by ``||B A||`` when that experience ends.
    """
    paths: dict[int, list[tuple[float, float]]] = {}
    for row in trace:
        if row["experience"] > row["adapter"]:
            paths.setdefault(row["adapter"], []).append((abs(row["alpha"]), row["beta"]))
    return paths


def compensation(trace: Sequence[Mapping]) -> dict[str, float]:
    """Medians over old adapters of the end/start ratios, and the share of epochs in which |alpha| and
    beta moved in opposite directions."""
    ratios, alpha_steps, beta_steps = [], [], []
    for path in adapter_paths(trace).values():
        if len(path) < 2:
            continue
        values = np.asarray(path)
        (alpha0, beta0), (alpha1, beta1) = values[0], values[-1]
        ratios.append((alpha1 / alpha0, beta1 / beta0, alpha1 * beta1 / (alpha0 * beta0)))
        alpha_steps.extend(np.diff(values[:, 0]))
        beta_steps.extend(np.diff(values[:, 1]))
    if not ratios:
        return {}
    alpha_ratio, beta_ratio, product_ratio = np.median(np.asarray(ratios), axis=0)
    steps = np.asarray(alpha_steps) * np.asarray(beta_steps)
    moved = steps != 0  # beta is constant without the gate
    return {
        "alpha_ratio": float(alpha_ratio),
        "beta_ratio": float(beta_ratio),
        "product_ratio": float(product_ratio),
        "opposite_share": float((steps[moved] < 0).mean()) if moved.any() else np.nan,
    }


def table(metrics: Mapping) -> str:
    """One markdown row per method and seed."""
    lines = [
        "| method | seed | median abs(alpha) ratio | median beta ratio | median alpha x beta ratio"
        " | epochs with abs(alpha) and beta moving oppositely |",
        "|---|---|---|---|---|---|",
    ]
    for method, entry in metrics["methods"].items():
        for seed, run in entry["seeds"].items():
            result = compensation(run.get("gate_trace", ()))
            if result:
                cells = " | ".join(f"{result[k]:.3f}" for k in result)
                lines.append(f"| {method} | {seed} | {cells} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("metrics", type=Path, help="a run's metrics.json")
    print(table(json.loads(parser.parse_args().metrics.read_text())), end="")


if __name__ == "__main__":
    main()
