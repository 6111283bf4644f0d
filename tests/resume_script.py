"""Trains SD-LoRA on the separable stream, optionally resuming from / saving an Avalanche checkpoint.

Run as a separate process by the checkpoint tests: prints the final metrics and the pruning decisions
(experience, adapter, pruned, unused) as JSON on the last line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from avalanche.checkpointing import maybe_load_checkpoint
from avalanche.evaluation.metrics import accuracy_metrics, loss_metrics
from avalanche.training.determinism.rng_manager import RNGManager
from avalanche.training.plugins import EvaluationPlugin

sys.path.insert(0, str(Path(__file__).parent))
from conftest import make_small_vit
from streams import separable_benchmark

from avalanche_sdlora import GumbelPruningPlugin, SDLoRA, SDLoRAViT
from avalanche_sdlora.runner.checkpoints import save_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stop-after", type=int, default=None)
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--patience", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--experiences", type=int, default=3)
    args = parser.parse_args()
    RNGManager.set_random_seeds(args.seed)
    torch.use_deterministic_algorithms(True)
    benchmark = separable_benchmark(experiences=args.experiences)
    evaluator = EvaluationPlugin(
        accuracy_metrics(experience=True, stream=True), loss_metrics(epoch=True), loggers=[]
    )
    strategy = SDLoRA(
        model=SDLoRAViT(make_small_vit(), rank=4),
        train_mb_size=16,
        train_epochs=args.epochs,
        evaluator=evaluator,
        lr=0.05,
        plugins=[GumbelPruningPlugin(patience=args.patience, growth="always")],
    )
    start = 0
    if args.checkpoint is not None:
        strategy, start = maybe_load_checkpoint(strategy, args.checkpoint)
    results = {}
    for experience in benchmark.train_stream[start : args.stop_after]:
        strategy.train(experience)
        results = strategy.eval(benchmark.test_stream)
        if args.checkpoint is not None:
            save_checkpoint(strategy, args.checkpoint)
    printed = {k: v for k, v in results.items() if isinstance(v, float)}
    printed["pruning"] = [
        (d.experience, d.adapter, d.pruned, d.unused) for d in strategy.pruning_plugin.history
    ]
    print(json.dumps(printed))


if __name__ == "__main__":
    main()
