"""One pass of a model's features over an experience's training images, as the classifiers fitted
without gradients need them: the evaluation transforms (no augmentation), dataset order, no
gradient, and the evaluation's precision."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from avalanche.training.templates import SupervisedTemplate
from torch import Tensor
from torch.utils.data import DataLoader

from avalanche_sdlora.plugins import AutocastPlugin

__all__ = ["autocast_dtype", "collect_features", "feature_loader"]


def feature_loader(dataset, batch_size: int, num_workers: int = 0) -> DataLoader:
    """The images of an Avalanche ``dataset`` with its evaluation transforms, in dataset order."""
    return DataLoader(dataset.eval(), batch_size=batch_size, num_workers=num_workers)


def autocast_dtype(strategy: SupervisedTemplate) -> torch.dtype | None:
    """The dtype the strategy's evaluation forward runs in under an ``AutocastPlugin`` (``None``:
    full precision)."""
    return next((p.dtype for p in strategy.plugins if isinstance(p, AutocastPlugin)), None)


@torch.no_grad()
def collect_features(
    encode: Callable[[Tensor], Tensor],
    batches: Iterable,
    device: torch.device,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """``(features, labels)`` of every ``(x, y, ...)`` batch, on ``device``; features in float32,
    computed under autocast to ``dtype`` when it is given."""
    features, labels = [], []
    for x, y, *_ in batches:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            features.append(encode(x.to(device)).float())
        labels.append(y.to(device))
    return torch.cat(features), torch.cat(labels)
