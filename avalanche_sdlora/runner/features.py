"""One pass of a model's features over an experience's training images, as the classifiers fitted
without gradients need them: the evaluation transforms (no augmentation; on the batched data path
the :class:`~avalanche_sdlora.plugins.BatchTransformPlugin`'s), dataset order, no gradient, and the
evaluation's precision."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from avalanche.training.templates import SupervisedTemplate
from torch import Tensor
from torch.utils.data import DataLoader

from avalanche_sdlora.plugins import AutocastPlugin, BatchTransformPlugin

__all__ = ["autocast_dtype", "collect_features", "evaluation_inputs", "feature_loader"]


def feature_loader(dataset, batch_size: int, num_workers: int = 0) -> DataLoader:
    """The images of an Avalanche ``dataset`` with its evaluation transforms, in dataset order."""
    return DataLoader(dataset.eval(), batch_size=batch_size, num_workers=num_workers)


def autocast_dtype(strategy: SupervisedTemplate) -> torch.dtype | None:
    """The dtype the strategy's evaluation forward runs in under an ``AutocastPlugin`` (``None``:
    full precision)."""
    return next((p.dtype for p in strategy.plugins if isinstance(p, AutocastPlugin)), None)


def evaluation_inputs(strategy: SupervisedTemplate) -> Callable[[Tensor], Tensor] | None:
    """The evaluation transform of the strategy's ``BatchTransformPlugin`` (the batched data path),
    or ``None`` on the PIL path, where the loader's transforms made the inputs."""
    plugin = next((p for p in strategy.plugins if isinstance(p, BatchTransformPlugin)), None)
    return None if plugin is None else lambda x: plugin.transform(strategy, x, train=False)


@torch.no_grad()
def collect_features(
    encode: Callable[[Tensor], Tensor],
    batches: Iterable,
    device: torch.device,
    dtype: torch.dtype | None = None,
    inputs: Callable[[Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """``(features, labels)`` of every ``(x, y, ...)`` batch, on ``device``; the batch made the
    model's input by ``inputs`` first (:func:`evaluation_inputs`, in full precision), features in
    float32, computed under autocast to ``dtype`` when it is given."""
    features, labels = [], []
    for x, y, *_ in batches:
        x = x.to(device) if inputs is None else inputs(x.to(device))
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            features.append(encode(x).float())
        labels.append(y.to(device))
    return torch.cat(features), torch.cat(labels)
