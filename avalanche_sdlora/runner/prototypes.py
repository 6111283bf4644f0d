"""Class-mean prototypes over features, scored by cosine similarity: SimpleCIL's classifier (Zhou et
al., 2023) and the nearest-class-mean evaluation of SD-LoRA.

A class's prototype is the mean of its training images' features; an image's score for a class is
the cosine similarity of its feature and the prototype. Classes without a prototype yet score
:data:`UNSEEN_SCORE`, below any cosine, so they are never predicted.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["UNSEEN_SCORE", "ClassMeans", "seen_scores"]

UNSEEN_SCORE = -1000.0
"""The score of a class not learned yet (the mask value of Avalanche's ``IncrementalClassifier``)."""


class ClassMeans(nn.Module):
    """Each class's mean feature, accumulated over the images it is given (buffers: ``sums`` in
    float64 and ``counts``), so a checkpoint restores it exactly."""

    def __init__(self, width: int, num_classes: int):
        super().__init__()
        self.register_buffer("sums", torch.zeros(num_classes, width, dtype=torch.float64))
        self.register_buffer("counts", torch.zeros(num_classes, dtype=torch.int64))

    @property
    def seen(self) -> Tensor:
        """Which classes have a prototype."""
        return self.counts > 0

    def learn(self, features: Tensor, labels: Tensor) -> dict[str, float]:
        """Add these images' features to their classes' means."""
        self.sums.index_add_(0, labels, features.double())
        self.counts += torch.bincount(labels, minlength=len(self.counts))
        return {}

    def learned_values(self) -> int:
        """The prototypes of the seen classes (``width`` values each)."""
        return self.sums.shape[1] * int(self.seen.sum())

    def forward(self, features: Tensor) -> Tensor:
        """Cosine similarity of every feature to every class's mean."""
        means = self.sums / self.counts.clamp(min=1)[:, None]
        return (F.normalize(features.double(), dim=1) @ F.normalize(means, dim=1).T).float()


def seen_scores(head: nn.Module, features: Tensor) -> Tensor:
    """``head``'s scores with the classes it has not learned (``head.seen`` false) at
    :data:`UNSEEN_SCORE`."""
    return head(features).masked_fill(~head.seen, UNSEEN_SCORE)
