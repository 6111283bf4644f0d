"""Pretrain a small timm ViT from scratch on the 100 "pretrain" classes of Tiny ImageNet.

The class-incremental benchmarks need a frozen ViT backbone whose ``blocks[i].attn.qkv`` are fused
linears; no pretrained weights can be downloaded here, so this script trains one on the 100 Tiny
ImageNet classes that the continual-learning stream does not use (``pretrain/``). The model is kept
cheap (64 px input, 8 px patches -> 64 tokens, 4 blocks of width 128) because the downstream study
runs many trainings over it on 2 CPU cores.

All images are decoded once into a uint8 tensor; augmentation (random resized crop and horizontal flip,
one batched ``grid_sample``) runs on tensors. AdamW with linear warmup and cosine decay, label
smoothing, gradient clipping. The schedule runs on wall-clock progress, so training ends on time
whatever else the machine is doing; ``--steps`` replaces the clock with a fixed step count for an
exact rerun (the JSON records how many steps a run took).

Writes ``<out-dir>/<name>.safetensors`` (fp16 state dict, classifier head included) and
``<out-dir>/<name>.json`` (timm constructor kwargs, preprocessing, val top-1, training time, seed,
command line, sha256 of the weights); before writing the JSON it rebuilds the model from the kwargs
and the fp16 file and checks that they reproduce the val accuracy. Run from the repository root:

    python benchmarks/pretrain_backbone.py [--data data/tiny-imagenet-200] [--minutes 85]
        [--seed 0] [--out-dir benchmarks/weights] [--name vit_tin100]
"""

from __future__ import annotations

import os

# Idle OpenMP threads must sleep rather than spin: on a shared 2-core machine spinning workers make
# every parallel region wait for a descheduled peer (measured: 4x slower steps). libgomp reads this
# when torch loads it, so it is set before the import.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import hashlib
import json
import math
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import VisionTransformer
from timm.optim import param_groups_weight_decay
from torch import Tensor
from torchvision.datasets import ImageFolder

REPO = Path(__file__).resolve().parent.parent
IMAGE_SIZE = 64
MODEL_KWARGS: dict[str, object] = {
    "img_size": IMAGE_SIZE,
    "patch_size": 8,
    "embed_dim": 128,
    "depth": 4,
    "num_heads": 4,
    "mlp_ratio": 4.0,
    "class_token": False,
    "global_pool": "avg",
}
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
MAX_WEIGHTS_BYTES = 12 * 1024 * 1024


def load_split(root: Path) -> tuple[Tensor, Tensor, list[str]]:
    """Every image of an ImageFolder split as one uint8 ``N x 3 x 64 x 64`` tensor, with labels."""
    folder = ImageFolder(root)
    images = torch.empty(len(folder), 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)
    for index, (path, _) in enumerate(folder.samples):
        with Image.open(path) as image:
            array = np.array(image.convert("RGB"))
        if array.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):
            raise ValueError(f"{path}: expected {IMAGE_SIZE}x{IMAGE_SIZE} RGB, got {array.shape}")
        images[index] = torch.from_numpy(array).permute(2, 0, 1)
    return images, torch.tensor(folder.targets), folder.classes


def normalize(images: Tensor) -> Tensor:
    """uint8 or [0, 1] float images -> the normalised float input of the model."""
    if images.dtype == torch.uint8:
        images = images.float().div_(255)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return (images - mean) / std


def augment(images: Tensor, generator: torch.Generator, min_area: float) -> Tensor:
    """Random resized crop (area in [min_area, 1], aspect in [3/4, 4/3]) and horizontal flip."""
    n = images.shape[0]
    area = torch.empty(n).uniform_(min_area, 1.0, generator=generator)
    log_ratio = torch.empty(n).uniform_(math.log(3 / 4), math.log(4 / 3), generator=generator)
    ratio = log_ratio.exp()
    width = (area * ratio).sqrt().clamp(max=1.0)
    height = (area / ratio).sqrt().clamp(max=1.0)
    # Crop centres in grid coordinates ([-1, 1]) that keep the whole crop inside the image.
    cx = (torch.rand(n, generator=generator) * 2 - 1) * (1 - width)
    cy = (torch.rand(n, generator=generator) * 2 - 1) * (1 - height)
    flip = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = width * flip
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = height
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta, [n, 3, IMAGE_SIZE, IMAGE_SIZE], align_corners=False)
    pixels = images.float().div_(255)
    return normalize(F.grid_sample(pixels, grid, mode="bilinear", align_corners=False))


@torch.inference_mode()
def top1(model: torch.nn.Module, images: Tensor, labels: Tensor, batch: int = 500) -> float:
    """Top-1 accuracy on unaugmented uint8 images, in eval mode."""
    was_training = model.training
    model.eval()
    correct = 0
    for start in range(0, len(images), batch):
        logits = model(normalize(images[start : start + batch]))
        correct += int((logits.argmax(1) == labels[start : start + batch]).sum())
    model.train(was_training)
    return correct / len(images)


def learning_rate(progress: float, peak: float, warmup: float, final: float) -> float:
    """Linear warmup over the first ``warmup`` of training, then cosine from ``peak`` to ``final``."""
    if progress < warmup:
        return peak * max(progress, 1e-3) / warmup
    decay = min(1.0, (progress - warmup) / (1 - warmup))
    return final + 0.5 * (peak - final) * (1 + math.cos(math.pi * decay))


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """``write`` to a hidden temporary name next to ``path``, then rename it into place."""
    temporary = path.with_name(f".{path.name}.tmp")
    write(temporary)
    os.replace(temporary, path)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def log(message: str, start: float) -> None:
    print(f"[{(time.perf_counter() - start) / 60:6.2f} min] {message}", flush=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO / "data/tiny-imagenet-200")
    parser.add_argument("--minutes", type=float, default=85.0, help="wall-clock budget, all in")
    parser.add_argument("--steps", type=int, default=None, help="fixed step count (no clock)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=REPO / "benchmarks/weights")
    parser.add_argument("--name", default="vit_tin100")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--warmup", type=float, default=0.05, help="fraction of training")
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--min-crop-area", type=float, default=0.35)
    parser.add_argument("--eval-every", type=int, default=5, help="epochs between val evaluations")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    start = time.perf_counter()
    torch.set_num_threads(2)
    torch.set_flush_denormal(True)  # AdamW's second moments decay into denormals, which crawl
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)

    train_images, train_labels, classes = load_split(args.data / "pretrain" / "train")
    val_images, val_labels, val_classes = load_split(args.data / "pretrain" / "val")
    if val_classes != classes:
        raise ValueError("pretrain/train and pretrain/val have different classes")
    log(
        f"decoded {len(train_images)} train / {len(val_images)} val images, {len(classes)} classes",
        start,
    )

    kwargs = {**MODEL_KWARGS, "num_classes": len(classes)}
    model = VisionTransformer(**kwargs)
    groups = param_groups_weight_decay(model, args.weight_decay, model.no_weight_decay())
    optimizer = torch.optim.AdamW(groups, lr=args.lr, fused=True)
    parameters = sum(p.numel() for p in model.parameters())

    eval_start = time.perf_counter()
    initial = top1(model, val_images, val_labels)
    eval_seconds = time.perf_counter() - eval_start
    log(
        f"ViT {kwargs}: {parameters / 1e6:.2f} M parameters, val top-1 at init {initial:.4f}", start
    )
    # Left for the end: the final evaluation, the fp16 round trip's evaluation and the writes.
    deadline = start + args.minutes * 60 - 2 * eval_seconds - 20
    train_start = time.perf_counter()

    def progress(step: int) -> float:
        if args.steps is not None:
            return step / args.steps
        return (time.perf_counter() - train_start) / (deadline - train_start)

    steps_per_epoch = len(train_images) // args.batch
    step = epoch = 0
    done = False
    model.train()
    while not done:
        epoch += 1
        epoch_start = time.perf_counter()
        order = torch.randperm(len(train_images), generator=generator)
        loss_sum = correct = seen = 0.0
        for batch_index in range(steps_per_epoch):
            if progress(step) >= 1:
                done = True
                break
            lr = learning_rate(progress(step), args.lr, args.warmup, args.lr / 100)
            for group in optimizer.param_groups:
                group["lr"] = lr
            index = order[batch_index * args.batch : (batch_index + 1) * args.batch]
            inputs = augment(train_images[index], generator, args.min_crop_area)
            targets = train_labels[index]
            logits = model(inputs)
            loss = F.cross_entropy(logits, targets, label_smoothing=args.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step += 1
            loss_sum += loss.item() * len(index)
            correct += float((logits.argmax(1) == targets).sum())
            seen += len(index)
            if step % 100 == 0:
                rate = seen / (time.perf_counter() - epoch_start)
                log(
                    f"epoch {epoch} step {step} loss {loss_sum / seen:.3f} lr {lr:.2e} "
                    f"{rate:.0f} img/s ({1e3 / rate:.2f} ms/img) progress {progress(step):.3f}",
                    start,
                )
        if seen:
            message = (
                f"epoch {epoch} done in {time.perf_counter() - epoch_start:.0f} s "
                f"({int(seen)} images): train loss {loss_sum / seen:.3f} "
                f"train top-1 {correct / seen:.4f}"
            )
            if epoch % args.eval_every == 0 and not done:
                message += f", val top-1 {top1(model, val_images, val_labels):.4f}"
            log(message, start)
    train_seconds = time.perf_counter() - train_start

    accuracy = top1(model, val_images, val_labels)
    log(
        f"trained {step} steps ({step / steps_per_epoch:.2f} epochs): val top-1 {accuracy:.4f}",
        start,
    )

    args.out_dir.mkdir(parents=True, exist_ok=True)
    weights = args.out_dir / f"{args.name}.safetensors"
    state = {
        name: tensor.detach().half().contiguous() for name, tensor in model.state_dict().items()
    }
    write_atomic(weights, lambda path: save_file(state, path))
    size = weights.stat().st_size
    if size > MAX_WEIGHTS_BYTES:
        raise RuntimeError(f"{weights} is {size} bytes, over the {MAX_WEIGHTS_BYTES} limit")

    # The round trip the downstream code does: rebuild from the kwargs, load the fp16 file.
    rebuilt = VisionTransformer(**json.loads(json.dumps(kwargs)))
    rebuilt.load_state_dict(load_file(weights))
    reloaded = top1(rebuilt, val_images, val_labels)
    if abs(reloaded - accuracy) > 0.005:
        raise RuntimeError(f"fp16 weights give val top-1 {reloaded:.4f}, fp32 gave {accuracy:.4f}")

    record = {
        "model": "timm.models.vision_transformer.VisionTransformer",
        "kwargs": kwargs,
        "weights": weights.name,
        "weights_sha256": sha256(weights),
        "weights_dtype": "float16",
        "preprocessing": {"input_size": IMAGE_SIZE, "mean": MEAN, "std": STD, "range": "[0, 1]"},
        "data": "tiny-imagenet-200 pretrain/ (100 classes, 400 train / 50 val images each)",
        "classes": classes,
        "val_top1": reloaded,
        "val_top1_fp32": accuracy,
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.perf_counter() - start, 1),
        "steps": step,
        "epochs": round(step / steps_per_epoch, 2),
        "seed": args.seed,
        "command": shlex.join(["python", *sys.argv]),
        "hyperparameters": {
            key: value
            for key, value in vars(args).items()
            if key not in {"data", "out_dir", "name", "minutes", "steps", "seed"}
        },
        "torch": torch.__version__,
        "timm": timm.__version__,
    }
    metadata = args.out_dir / f"{args.name}.json"
    write_atomic(metadata, lambda path: path.write_text(json.dumps(record, indent=2) + "\n"))
    log(
        f"wrote {weights} ({size / 1e6:.2f} MB, fp16 val top-1 {reloaded:.4f}) and {metadata}",
        start,
    )


if __name__ == "__main__":
    main()
