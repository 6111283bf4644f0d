"""GPU smoke test of torchrun: the paper's ViT-B/16 in bf16 on every GPU, on generated data.

Writes a CIFAR-100 in torchvision's layout (random images, ``--per-class`` training images per class)
and trains ``exps/c100.json`` on its first ``--classes`` classes with ``torchrun``, one process per
GPU, SD-LoRA and Naive fine-tuning, 1 epoch, randomly initialised weights (no download). It checks
that the run finishes with ``world_size`` processes in ``metrics.json``; accuracies are chance.

    python benchmarks/ddp_gpu_smoke.py [--nproc N] [--folder /tmp/ddp_smoke]

``--tiny`` runs a 2-block ViT on 32 px images on the CPU (gloo) instead, to try the script anywhere.
"""

from __future__ import annotations

import argparse
import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).parents[1]
TINY = [
    "--device", "cpu",
    "--set", "backbone.name=vit_tiny_patch16_224",
    "--set", 'backbone.kwargs={"img_size": 32, "patch_size": 8, "depth": 2}',
    "--set", "training.batch_size=8",
    "--set", "training.eval_batch_size=16",
    "--set", "experiment.threads=1",
]  # fmt: skip


def write_cifar100(root: Path, per_class: int, test_per_class: int, seed: int = 0) -> None:
    """Random 32 x 32 images in ``root/cifar-100-python/{train,test,meta}`` (torchvision's pickles)."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    generator = np.random.default_rng(seed)
    for split, count in (("train", per_class), ("test", test_per_class)):
        labels = [c for c in range(100) for _ in range(count)]
        data = generator.integers(0, 256, (len(labels), 3 * 32 * 32), dtype=np.uint8)
        with open(folder / split, "wb") as handle:
            pickle.dump({"data": data, "fine_labels": labels}, handle)
    with open(folder / "meta", "wb") as handle:
        pickle.dump({"fine_label_names": [f"class_{c}" for c in range(100)]}, handle)


def run_arguments(args: argparse.Namespace) -> list[str]:
    """The ``avalanche_sdlora.run`` arguments of the smoke run."""
    return [
        "--config", str(ROOT / "exps" / "c100.json"),
        "--output", str(args.folder / "run"),
        "--compare", "naive",
        "--set", "backbone.pretrained=false",
        "--set", "backbone.precision=bf16",
        "--set", f"benchmark.root={args.folder / 'data'}",
        "--set", f"benchmark.num_classes={args.classes}",
        "--set", "benchmark.n_experiences=2",
        "--set", "training.epochs=1",
        *(TINY if args.tiny else []),
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=max(torch.cuda.device_count(), 2))
    parser.add_argument("--folder", type=Path, default=Path("/tmp/ddp_smoke"))
    parser.add_argument("--per-class", type=int, default=64)
    parser.add_argument("--classes", type=int, default=20)
    parser.add_argument("--tiny", action="store_true", help="a tiny ViT on the CPU")
    args = parser.parse_args(argv)
    shutil.rmtree(args.folder / "run", ignore_errors=True)
    write_cifar100(args.folder / "data", args.per_class, test_per_class=args.per_class // 4)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += [f"--nproc_per_node={args.nproc}", "-m", "avalanche_sdlora.run"]
    done = subprocess.run([*command, *run_arguments(args)], cwd=ROOT)
    if done.returncode:
        return done.returncode
    metrics = json.loads((args.folder / "run" / "metrics.json").read_text())
    print(f"world_size {metrics['world_size']}; wall time {metrics['wall_seconds']:.0f} s")
    return 0 if metrics["world_size"] == args.nproc else 1


if __name__ == "__main__":
    sys.exit(main())
