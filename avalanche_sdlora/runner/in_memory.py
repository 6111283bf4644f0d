"""Datasets decoded once into one uint8 tensor, for the batched data path.

A :class:`DecodedImages` holds the images a benchmark uses as one ``(N, C, H, W)`` uint8 tensor and
serves them as they are: the transforms run later on whole batches, on the training device
(:class:`~avalanche_sdlora.plugins.BatchTransformPlugin`). Every image goes through the same
per-image steps the PIL path takes first (RGB, a rendition), so both paths see the same pixels.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from avalanche_sdlora.runner.checkpoints import checkpoint_by_constructor

__all__ = ["MAX_DECODED_BYTES", "DecodedImages", "in_memory_problem"]

MAX_DECODED_BYTES = 4 * 2**30
"""The largest ImageFolder tree that is decoded into memory (per process): 4 GiB of uint8 pixels."""


def _pixels(
    source: Dataset, index: int, decode: Callable[[Image.Image], Image.Image]
) -> np.ndarray:
    image, _ = source[index]
    return np.asarray(decode(image))


class DecodedImages(Dataset):
    """The images ``indices`` of ``source`` (a dataset of PIL images with ``targets``), each
    through ``decode`` (its RGB conversion and rendition), as one uint8 tensor ``images``
    ``(N, C, H, W)``; an item is ``(image, target)``. The images must all have one size.

    Checkpoints store ``source``, ``indices`` and ``decode``, not the pixels: a resumed run decodes
    them again.
    """

    def __init__(
        self,
        source: Dataset,
        indices: Sequence[int],
        decode: Callable[[Image.Image], Image.Image],
    ) -> None:
        self.source, self.indices, self.decode = source, [int(i) for i in indices], decode
        with ThreadPoolExecutor(os.cpu_count()) as pool:  # PIL decodes without the GIL
            arrays = list(pool.map(lambda i: _pixels(source, i, decode), self.indices))
        shapes = sorted({array.shape for array in arrays})
        if len(shapes) > 1:
            raise ValueError(
                f"benchmark.augmentation_device: the images differ in size ({shapes[0]}, "
                f"{shapes[-1]}, ...), so they cannot be one batch; use pil"
            )
        stacked = np.stack(arrays) if arrays else np.zeros((0, 1, 1, 3), np.uint8)
        self.images = torch.from_numpy(stacked).permute(0, 3, 1, 2).contiguous()
        self.targets = [int(source.targets[i]) for i in self.indices]
        self.classes = source.classes

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], self.targets[index]


checkpoint_by_constructor(
    DecodedImages, lambda obj: {"source": obj.source, "indices": obj.indices, "decode": obj.decode}
)


def _image_size(path: str) -> tuple[int, int]:
    with Image.open(path) as image:  # reads the header only
        return image.size


def in_memory_problem(name: str, root: str | Path | None) -> str | None:
    """Why the benchmark's images cannot be decoded into one uint8 tensor (``None`` when they
    can): CIFAR-100 and digits always can; an ImageFolder tree can when all its images have one
    size and, decoded, take at most :data:`MAX_DECODED_BYTES` (only their headers are read)."""
    if name != "imagefolder":
        return None
    root = Path(root)
    paths = []
    for split in ("train", "val"):
        index = find_classes(root / split)[1]
        paths += [path for path, _ in make_dataset(root / split, index, IMG_EXTENSIONS)]
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        sizes = list(pool.map(_image_size, paths))
    distinct = sorted(set(sizes))
    if len(distinct) > 1:
        return (
            f"the images of {root} have {len(distinct)} sizes ({distinct[0][0]}x{distinct[0][1]}, "
            f"{distinct[-1][0]}x{distinct[-1][1]}, ...), not one"
        )
    decoded = sum(3 * width * height for width, height in sizes)
    if decoded > MAX_DECODED_BYTES:
        return (
            f"the images of {root} take {decoded / 2**30:.1f} GiB decoded, more than "
            f"{MAX_DECODED_BYTES / 2**30:.0f} GiB"
        )
    return None
