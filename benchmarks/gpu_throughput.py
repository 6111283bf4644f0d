"""SD-LoRA's training throughput on a GPU against its floor, and the data share of its steps.

- Floor: a bare frozen ViT-B/16 (random weights: nothing is downloaded), forward and backward in
  bf16 at batch 128 and 224 px. The backward runs down to the input, as the adapters in every block
  need it, but computes no weight gradient.
- SD-LoRA: the runner trains ``exps/c100.json`` (bf16, batch 128, the batched data path) on a
  generated CIFAR-100 (random 32 px images, ``--classes`` classes of ``--per-class`` images), one
  experience, one epoch. Its ``metrics.json`` gives the time of its training steps, split into data
  and forward/backward (docs/outputs.md): images/s = images / (data + forward/backward).

    python benchmarks/gpu_throughput.py [--folder /tmp/gpu_throughput]
    python benchmarks/gpu_throughput.py --tiny   # a tiny ViT on the CPU, to try the script anywhere

Aims (issue 19): SD-LoRA at 0.85 of the floor or more, data under 5% of its steps. The last line
reads ``SD-LoRA X img/s, floor Y img/s (ratio R), data share S%``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).parent))
from ddp_gpu_smoke import ROOT, TINY, write_cifar100

PAPER_BACKBONE = "vit_base_patch16_224.augreg2_in21k_ft_in1k"
TINY_KWARGS = {"img_size": 32, "patch_size": 8, "depth": 2}


def floor_rate(args: argparse.Namespace, batch: int, steps: int = 20) -> float:
    """Images/s of the frozen backbone's forward and backward (bf16 autocast)."""
    device = torch.device(args.device)
    name = "vit_tiny_patch16_224" if args.tiny else PAPER_BACKBONE
    kwargs = TINY_KWARGS if args.tiny else {}
    model = timm.create_model(name, pretrained=False, num_classes=100, **kwargs).to(device)
    model.requires_grad_(False)
    size = model.patch_embed.img_size
    images = torch.randn(batch, 3, *size, device=device, requires_grad=True)
    labels = torch.randint(0, 100, (batch,), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = torch.nn.functional.cross_entropy(model(images).float(), labels)
        loss.backward()

    for _ in range(3):  # warm-up: kernels chosen, memory cached
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return batch * steps / (time.perf_counter() - started)


def sdlora_rate(args: argparse.Namespace, batch: int) -> tuple[float, float]:
    """Images/s of SD-LoRA's training steps in the runner, and their data share."""
    run = args.folder / "run"
    shutil.rmtree(run, ignore_errors=True)
    write_cifar100(args.folder / "data", args.per_class, test_per_class=args.per_class // 10)
    command = [sys.executable, "-m", "avalanche_sdlora.run", "--config", "exps/c100.json"]
    command += [
        "--output", str(run),
        "--device", args.device,
        "--set", "backbone.pretrained=false",
        "--set", "backbone.precision=bf16",
        "--set", f"benchmark.root={args.folder / 'data'}",
        "--set", f"benchmark.num_classes={args.classes}",
        "--set", "benchmark.n_experiences=1",
        "--set", "training.epochs=1",
        "--set", f"training.batch_size={batch}",
        *(TINY if args.tiny else []),
    ]  # fmt: skip
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    metrics = json.loads((run / "metrics.json").read_text())
    (record,) = metrics["methods"]["sdlora"]["seeds"]["1993"]["experiences"]
    steps = record["data_seconds"] + record["forward_backward_seconds"]
    return args.classes * args.per_class / steps, record["data_seconds"] / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", type=Path, default=Path("/tmp/gpu_throughput"))
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--per-class", type=int, default=1280)
    parser.add_argument("--tiny", action="store_true", help="a tiny ViT on the CPU")
    args = parser.parse_args()
    args.device = "cpu" if args.tiny else "cuda"
    batch = 8 if args.tiny else 128
    floor = floor_rate(args, batch)
    rate, share = sdlora_rate(args, batch)
    print(
        f"SD-LoRA {rate:.0f} img/s, floor {floor:.0f} img/s (ratio {rate / floor:.2f}), "
        f"data share {100 * share:.1f}%"
    )


if __name__ == "__main__":
    main()
