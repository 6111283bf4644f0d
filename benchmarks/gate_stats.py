"""What the gate did in a run: logit spread and agreement of its pruning decisions, per method and seed.

    python benchmarks/gate_stats.py runs/results/metrics.json [--accuracy]

Reads the decision table of every gated run (``pruning`` in ``metrics.json``) and prints one markdown
row per method and seed: the median logit spread (max minus min over the active adapters at each
decision, experiences >= ``--from-experience``), the mean agreement of the decisions over their
re-draws, the agreement the seed's rule (10 Gumbel samples, prune below a frequency of 0.2) would have
on the same logits, the adapters pruned (and how many right after their own experience), the
adapters kept at the end, and the mean last-epoch training loss. ``--accuracy`` adds last accuracy
(test data): leave it out when the numbers choose settings.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from avalanche_sdlora.gate import GumbelGate
from avalanche_sdlora.pruning import SelectionPruner

SEED_RULE = SelectionPruner(
    rule="frequency", num_samples=10, threshold=0.2, growth="always", patience=1
)
"""The seed's rule: 10 draws, prune below 0.2, in one step."""


def seed_rule_agreement(group: Sequence[Mapping], experience: int, tau_final: float) -> float:
    """Mean agreement, over 20 re-draws, of the seed's sampled rule on one decision's logits."""
    gate = GumbelGate(tau_final=tau_final)
    for row in group:
        gate.add_adapter()
        gate.logits[-1].data.fill_(row["logit"])
    with torch.no_grad():
        chosen = SEED_RULE.choose(gate, experience, SEED_RULE.generator(experience, 0))
        return statistics.fmean(SEED_RULE.agreement(gate, experience, chosen).values())


def decision_stats(
    rows: Sequence[Mapping], from_experience: int = 2, tau_final: float = 0.5
) -> dict[str, float]:
    """Spread, agreement and pruning counts of one run's decision rows."""
    by_experience: dict[int, list[Mapping]] = defaultdict(list)
    for row in rows:
        by_experience[row["experience"]].append(row)
    spreads = [
        max(r["logit"] for r in group) - min(r["logit"] for r in group)
        for experience, group in sorted(by_experience.items())
        if experience >= from_experience
    ]
    agreements = [r["agreement"] for r in rows if "agreement" in r]
    seed_rule = [
        seed_rule_agreement(group, experience, tau_final)
        for experience, group in sorted(by_experience.items())
        if len(group) > 1
    ]
    return {
        "median_spread": statistics.median(spreads) if spreads else float("nan"),
        "max_spread": max(spreads) if spreads else float("nan"),
        "mean_agreement": statistics.fmean(agreements) if agreements else float("nan"),
        "seed_rule_agreement": statistics.fmean(seed_rule) if seed_rule else float("nan"),
        "pruned": sum(bool(r["pruned"]) for r in rows),
        "pruned_new": sum(bool(r["pruned"]) and bool(r["new"]) for r in rows),
    }


def run_rows(metrics: Mapping, from_experience: int = 2, tau_final: float = 0.5) -> list[dict]:
    """One dictionary per gated method and seed."""
    table = []
    for method, entry in metrics["methods"].items():
        for seed, report in entry["seeds"].items():
            if not report.get("pruning"):
                continue
            losses = [
                r["train_loss"] for r in report["experiences"] if r.get("train_loss") is not None
            ]
            table.append(
                {
                    "method": method,
                    "seed": seed,
                    **decision_stats(report["pruning"], from_experience, tau_final),
                    "kept": report["experiences"][-1]["active_adapters"],
                    "added": report["experiences"][-1]["adapters_added"],
                    "train_loss": statistics.fmean(losses) if losses else float("nan"),
                    "last_accuracy": report["last_accuracy"],
                }
            )
    return table


def markdown(table: Sequence[Mapping], accuracy: bool) -> str:
    columns = [
        ("median spread", "median_spread", ".2f"),
        ("max spread", "max_spread", ".2f"),
        ("agreement", "mean_agreement", ".3f"),
        ("seed rule's agreement", "seed_rule_agreement", ".3f"),
        ("pruned (new)", None, ""),
        ("kept", None, ""),
        ("mean train loss", "train_loss", ".3f"),
    ]
    if accuracy:
        columns.append(("last acc. (%)", "last_accuracy", ".2f"))
    lines = [
        "| method | seed | " + " | ".join(title for title, _, _ in columns) + " |",
        "|---|---|" + "---|" * len(columns),
    ]
    for row in table:
        cells = []
        for title, key, spec in columns:
            if title == "pruned (new)":
                cells.append(f"{row['pruned']} ({row['pruned_new']})")
            elif title == "kept":
                cells.append(f"{row['kept']}/{row['added']}")
            else:
                cells.append("-" if math.isnan(row[key]) else format(row[key], spec))
        lines.append(f"| {row['method']} | {row['seed']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("metrics", type=Path, nargs="+", help="metrics.json of one or more runs")
    parser.add_argument("--from-experience", type=int, default=2)
    parser.add_argument("--tau-final", type=float, default=0.5, help="the runs' gumbel_tau_final")
    parser.add_argument("--accuracy", action="store_true", help="add last accuracy (test data)")
    args = parser.parse_args(argv)
    table = []
    for path in args.metrics:
        metrics = json.loads(path.read_text())
        for row in run_rows(metrics, args.from_experience, args.tau_final):
            if len(args.metrics) > 1:
                row["method"] = f"{path.parent.name}/{row['method']}"
            table.append(row)
    print(markdown(table, args.accuracy), end="")


if __name__ == "__main__":
    main()
