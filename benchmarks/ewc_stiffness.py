"""Why EWC turns NaN on the study: its penalty grows stiffer than SGD can follow.

    python benchmarks/ewc_stiffness.py DATA_ROOT [--experiences 10] [--set key=value ...]

Trains the runner's EWC baseline (exps/tiny_imagenet.json; ``--set
baselines.ewc.max_stiffness=null`` for Avalanche's EWC, which turned NaN, with ``--set
baselines.ewc.mode=separate`` for its first mode) experience by experience and prints, after each,
the largest importance its penalty carries (separate mode: ``max_i sum_k F_k[i]``; online mode:
the decayed sum) and the ratio of the penalty's curvature to SGD-with-momentum's stability limit,
``lr * 2 * lambda * max F / (2 * (1 + momentum))``. Past 1 the penalty alone makes the parameter
oscillate with growing amplitude, and the training loss soon turns NaN.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence

import torch
from avalanche.training.plugins import EWCPlugin

from avalanche_sdlora.runner.backbones import build_backbone
from avalanche_sdlora.runner.baselines import make_baseline
from avalanche_sdlora.runner.config import load_config
from avalanche_sdlora.runner.experiment import _build_benchmark


def stiffest(importances: Sequence[Mapping[str, torch.Tensor]]) -> tuple[float, str]:
    """``(max_i sum_k F_k[i], parameter name)`` over the experiences' importances; a tensor that
    grew (the head) is summed over the rows every experience has."""
    best, where = 0.0, ""
    for name in importances[-1]:
        tensors = [imp[name] for imp in importances if name in imp]
        rows = min(t.shape[0] for t in tensors)
        total = sum(t[:rows] for t in tensors).max().item()
        if total > best:
            best, where = total, name
    return best, where


def penalty_importances(
    importances: Mapping[int, Mapping[str, torch.Tensor]], index: int, mode: str
) -> list[dict[str, torch.Tensor]]:
    """The importances EWC's penalty carries after experience ``index``: separate mode sums one per
    finished experience; online mode keeps one, the old ones already decayed into it."""
    kept = range(index + 1) if mode == "separate" else [index]
    return [{name: value.data for name, value in importances[i].items()} for i in kept]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="the cl/ split of Tiny-ImageNet")
    parser.add_argument("--experiences", type=int, default=10)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args(argv)
    config = load_config(
        "exps/tiny_imagenet.json", [f"benchmark.root={args.data}", *args.overrides]
    )
    settings, training = config["baselines"]["ewc"], config["training"]
    torch.manual_seed(0)
    benchmark = _build_benchmark(config, build_backbone(config["backbone"]))
    strategy = make_baseline(
        "ewc",
        build_backbone(config["backbone"]),
        settings,
        num_classes=100,
        train_mb_size=training["batch_size"],
        train_epochs=training["epochs"],
        eval_mb_size=training["eval_batch_size"],
        device="cpu",
    )
    ewc = next(p for p in strategy.plugins if isinstance(p, EWCPlugin))
    limit = 2 * (1 + settings["momentum"])
    for index, experience in enumerate(benchmark.train_stream[: args.experiences]):
        strategy.train(experience)
        stiffness, where = stiffest(penalty_importances(ewc.importances, index, settings["mode"]))
        ratio = settings["lr"] * 2 * settings["ewc_lambda"] * stiffness / limit
        print(
            f"experience {index}: max sum_k F = {stiffness:.3g} "
            f"({where}); curvature / SGD limit = {ratio:.2f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
