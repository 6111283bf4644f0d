"""Tiny, easily separable class-incremental streams built with Avalanche's ``nc_benchmark``."""

from __future__ import annotations

from pathlib import Path

import torch
from avalanche.benchmarks import nc_benchmark
from PIL import Image
from torch.utils.data import TensorDataset

IMAGE_SIZE = 16


def prototype_dataset(classes: int, per_class: int, seed: int, noise: float = 0.3) -> TensorDataset:
    """Each class is a fixed random image (shared across splits) plus Gaussian noise."""
    prototypes = torch.randn(
        classes, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(123)
    )
    targets = torch.arange(classes).repeat_interleave(per_class)
    noise_draw = torch.randn(
        len(targets), 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed)
    )
    dataset = TensorDataset(prototypes[targets] + noise * noise_draw, targets)
    dataset.targets = targets.tolist()
    return dataset


def separable_benchmark(experiences: int = 3, classes_per_experience: int = 2, per_class: int = 40):
    classes = experiences * classes_per_experience
    return nc_benchmark(
        prototype_dataset(classes, per_class, seed=0),
        prototype_dataset(classes, 10, seed=1),
        n_experiences=experiences,
        task_labels=False,
        fixed_class_order=list(range(classes)),
    )


def write_image_tree(root: Path, per_class: int, suffix: str = ".png") -> Path:
    """``root/train`` and ``root/val``, each with 4 class folders of ``per_class`` flat grey images
    (class k, image i: grey level ``50 * k + 20 + 2 * i``, which identifies it)."""
    for split in ("train", "val"):
        for k in range(4):
            folder = root / split / f"class_{k}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                image = Image.new("RGB", (12, 10), (50 * k + 20 + 2 * i,) * 3)
                image.save(folder / f"{i}{suffix}")
    return root
