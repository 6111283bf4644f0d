"""Trains SD-LoRA on the separable stream, optionally resuming from / saving an Avalanche checkpoint.

Run as a separate process by the checkpoint test: prints the final metrics as JSON on the last line.
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

from avalanche_sdlora import SDLoRA, SDLoRAViT
from avalanche_sdlora.runner.checkpoints import save_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stop-after", type=int, default=None)
    parser.add_argument("--checkpoint", type=Path, default=None)
    args = parser.parse_args()
    RNGManager.set_random_seeds(args.seed)
    torch.use_deterministic_algorithms(True)
    benchmark = separable_benchmark()
    evaluator = EvaluationPlugin(
        accuracy_metrics(experience=True, stream=True), loss_metrics(epoch=True), loggers=[]
    )
    strategy = SDLoRA(
        model=SDLoRAViT(make_small_vit(), rank=4),
        train_mb_size=16,
        train_epochs=3,
        evaluator=evaluator,
        lr=0.05,
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
    print(json.dumps({k: v for k, v in results.items() if isinstance(v, float)}))


if __name__ == "__main__":
    main()
