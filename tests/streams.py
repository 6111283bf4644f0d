"""Tiny, easily separable class-incremental streams built with Avalanche's ``nc_benchmark``, and
streams of checkerboard images whose classes only an adapter can tell apart
(``conftest.make_blind_vit``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from avalanche.benchmarks import dataset_benchmark, nc_benchmark
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


PATCH = 4  # the patch size of conftest's small ViTs


def checkerboard(light: torch.Tensor, dark: torch.Tensor) -> torch.Tensor:
    """A 16 px image of 4 x 4 patches, ``light`` and ``dark`` (3 x 4 x 4 each) alternating."""
    rows = [
        torch.cat([light if (r + c) % 2 == 0 else dark for c in range(4)], dim=2) for r in range(4)
    ]
    return torch.cat(rows, dim=1)


def contrast_pair(seed: int) -> list[torch.Tensor]:
    """Two checkerboards around the same mean patch, of contrast 1 and 3: their patches average to
    the same token, so a ViT whose blocks are the identity (conftest.make_blind_vit) cannot tell them apart,
    while an adapter on the attention's values can."""
    mean, step = torch.randn(2, 3, PATCH, PATCH, generator=torch.Generator().manual_seed(seed))
    return [checkerboard(mean + k * step, mean - k * step) for k in (1, 3)]


def plain_pair(seed: int) -> list[torch.Tensor]:
    """Two random images with different mean patches: told apart without any adapter."""
    return list(
        torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(seed))
    )


def image_stream(
    experiences: Sequence[tuple[Sequence[torch.Tensor], Sequence[int]]],
    noise: float = 0.1,
    per_class: int = 40,
):
    """One experience per ``(images, labels)``: each image plus Gaussian noise, ``per_class`` times
    for training and half as many for testing. Labels may repeat across experiences."""

    def dataset(images, labels, count: int, seed: int) -> TensorDataset:
        generator = torch.Generator().manual_seed(seed)
        x = torch.stack([image for image in images for _ in range(count)])
        x = x + noise * torch.randn(x.shape, generator=generator)
        targets = torch.tensor(labels).repeat_interleave(count)
        data = TensorDataset(x, targets)
        data.targets = targets.tolist()
        return data

    return dataset_benchmark(
        [dataset(*e, per_class, 10 + i) for i, e in enumerate(experiences)],
        [dataset(*e, per_class // 2, 50 + i) for i, e in enumerate(experiences)],
    )
