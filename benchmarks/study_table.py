"""The study's table: one row per method over the parts it ran in, with the difference from head_only.

    python benchmarks/study_table.py benchmarks/results/study/*/metrics.json

The study (``benchmarks/study.sh``) runs in parts, each with its own ``metrics.json``; a method's
seeds may come from several parts (replay: seed 0 with the baselines, seeds 1 and 2 on their own).
Each row gives last accuracy and average forgetting (mean ± population std over seeds, %, as in
the runner's summary), average incremental accuracy, the adapters active at the end, the trainable
parameters at the end, the mean wall time of a run, and last accuracy minus ``head_only``'s: how
much the method buys over a trained head. A second table gives every seed's last accuracy of the
methods run on several. A part run with growth settings other than the defaults names its gated
rows by them, ``sdlora (growth=always, prune_patience=1)``, so each setting is a row of its own (a
config from before those settings existed ran ``always`` with patience 1); an EWC
run without the importance cap (``baselines.ewc.max_stiffness``, or from before it) is
``ewc (max_stiffness=null)``.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from avalanche_sdlora.runner.config import defaults

CONTROL = "head_only"
ORDER = (
    "head_only",
    "sdlora",
    "sdlora_random",
    "sdlora_joint",
    "sdlora_plain",
    "sdlora_rr",
    "sdlora_kd",
    "simplecil",
    "ranpac",
    "naive",
    "ewc",
    "lwf",
    "replay",
    "cumulative",
    "l2p",
)
GROWTH_SETTINGS = ("growth", "growth_gain", "prune_patience")
BEFORE_GROWTH = {"growth": "always", "growth_gain": 1.0, "prune_patience": 1}
"""A config from before the growth settings existed kept every new adapter and pruned in one step."""
EWC_SETTINGS = ("max_stiffness",)
BEFORE_EWC_CAP = {"max_stiffness": None}
"""A config from before the cap existed ran Avalanche's EWC, uncapped."""


def settings_label(
    chosen: Mapping[str, Any],
    default: Mapping[str, Any],
    names: Iterable[str],
    before: Mapping[str, Any] | None = None,
) -> str:
    """The settings ``names`` whose ``chosen`` value differs from ``default``, as a row name's
    suffix (empty for none); a config from before a setting existed has the value ``before``
    gives it, else its default."""
    before = before or {}
    changed = []
    for name in names:
        value = chosen.get(name, before.get(name, default[name]))
        if value != default[name]:
            changed.append(f"{name}={value if isinstance(value, str) else json.dumps(value)}")
    return f" ({', '.join(changed)})" if changed else ""


def growth_label(config: Mapping[str, Any]) -> str:
    """The growth settings of a run's config that differ from the method's defaults."""
    chosen, default = config.get("sdlora", {}), defaults()["sdlora"]
    return settings_label(chosen, default, GROWTH_SETTINGS, BEFORE_GROWTH)


def ewc_label(config: Mapping[str, Any]) -> str:
    """EWC's cap, where a run's config differs from the default (or predates the cap)."""
    chosen = config.get("baselines", {}).get("ewc", {})
    default = defaults()["baselines"]["ewc"]
    return settings_label(chosen, default, EWC_SETTINGS, BEFORE_EWC_CAP)


def load_part(metrics_path: Path) -> dict[str, Any]:
    """A part's ``metrics.json``, its rows renamed by the settings of the ``config.json`` beside it
    that differ from the defaults: the gated rows (those with a decision table) by their growth
    settings, EWC by its cap."""
    metrics = json.loads(metrics_path.read_text())
    config_path = metrics_path.with_name("config.json")
    if not config_path.exists():  # no config: the names as they are
        return metrics
    config = json.loads(config_path.read_text())
    growth, ewc = growth_label(config), ewc_label(config)

    def name(method: str, entry: Mapping[str, Any]) -> str:
        if all(report.get("pruning") for report in entry["seeds"].values()):
            return method + growth
        return method + ewc if method == "ewc" else method

    metrics["methods"] = {name(m, entry): entry for m, entry in metrics["methods"].items()}
    return metrics


def _rank(method: str) -> tuple[int, str]:
    base = method.split(" (")[0]
    return (ORDER.index(base) if base in ORDER else len(ORDER), method)


def seeds_by_method(metrics: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Mapping]]:
    """Every method's per-seed reports, gathered over the parts; a seed run twice is an error."""
    gathered: dict[str, dict[str, Mapping]] = {}
    for part in metrics:
        for method, entry in part["methods"].items():
            seeds = gathered.setdefault(method, {})
            for seed, report in entry["seeds"].items():
                if seed in seeds:
                    raise ValueError(f"{method} seed {seed} appears in two parts")
                seeds[seed] = report
    ranked = sorted(gathered, key=_rank)
    return {method: gathered[method] for method in ranked}


def _mean_std(values: list[float]) -> str:
    spread = f" ± {statistics.pstdev(values):.2f}" if len(values) > 1 else ""
    return f"{statistics.fmean(values):.2f}{spread}"


def row(method: str, seeds: Mapping[str, Mapping], control: float | None) -> str:
    """One markdown row of the table."""
    reports = list(seeds.values())
    last = [r["last_accuracy"] for r in reports]
    final = [r["experiences"][-1] for r in reports]
    adapters = [e["active_adapters"] for e in final if e.get("active_adapters") is not None]
    gain = "" if control is None else f"{statistics.fmean(last) - control:+.2f}"
    cells = [
        method,
        str(len(reports)),
        _mean_std(last),
        f"{statistics.fmean(r['average_incremental_accuracy'] for r in reports):.2f}",
        _mean_std([r["average_forgetting"] for r in reports]),
        f"{statistics.fmean(adapters):g}" if adapters else "",
        f"{round(statistics.fmean(e['trainable_parameters'] for e in final)):,}",
        f"{statistics.fmean(sum(e['wall_seconds'] for e in r['experiences']) for r in reports):.0f}",
        gain,
    ]
    return "| " + " | ".join(cells) + " |"


def table(metrics: Iterable[Mapping[str, Any]]) -> str:
    """The markdown table of the study's parts."""
    methods = seeds_by_method(metrics)
    control = None
    if CONTROL in methods:
        control = statistics.fmean(r["last_accuracy"] for r in methods[CONTROL].values())
    lines = [
        "| method | seeds | last acc. (%) | avg. incremental acc. (%) | avg. forgetting (%) "
        f"| adapters kept | trainable params | wall time per run (s) | last acc. minus {CONTROL} |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines.extend(row(method, seeds, control) for method, seeds in methods.items())
    return "\n".join(lines)


def per_seed(metrics: Iterable[Mapping[str, Any]]) -> str:
    """Last accuracy of every seed of every method run on more than one, as a markdown table:
    where two rows are close, the seeds tell whether one is ahead on every seed."""
    methods = {m: s for m, s in seeds_by_method(metrics).items() if len(s) > 1}
    seeds = sorted({seed for runs in methods.values() for seed in runs}, key=int)
    lines = [
        "| method | " + " | ".join(f"seed {seed}" for seed in seeds) + " |",
        "|---|" + "---|" * len(seeds),
    ]
    for method, runs in methods.items():
        cells = [f"{runs[seed]['last_accuracy']:.2f}" if seed in runs else "" for seed in seeds]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("metrics", nargs="+", type=Path, help="metrics.json of each part")
    args = parser.parse_args(argv)
    metrics = [load_part(path) for path in args.metrics]
    text = f"{table(metrics)}\n\nLast accuracy (%) per seed:\n\n{per_seed(metrics)}"
    print(text)
    return text


if __name__ == "__main__":
    main()
