"""RanPAC's classifier over frozen features (McDonnell et al., NeurIPS 2023).

Features ``f`` (``width`` wide) are projected by a fixed Gaussian ``width x M`` matrix ``W`` with a
ReLU: ``h = ReLU(f W)``. Over every experience so far the Gram matrix ``G = sum h h^T`` (``M x M``)
and ``Q = sum h y^T`` (``y`` one-hot) are accumulated in float64, and the classifier is the ridge
regression ``W_out = (G + lambda I)^-1 Q``, predicting ``h W_out``. ``lambda`` is chosen from a grid
as RanPAC's own code (and LAMDA-PILOT's) does: fitted on a share of the current experience's
training images (80% by default), the one with the smallest mean squared error on the rest.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = [
    "MATRICES_AT_ONCE",
    "PAPER_RIDGES",
    "RanPACClassifier",
    "default_projection_dim",
    "largest_projection_dim",
    "memory_bytes",
]

PAPER_RIDGES = [10.0**k for k in range(-8, 9)]
"""The paper's grid of ridge regularisers: 1e-8, 1e-7, ..., 1e8."""
PAPER_PROJECTION_DIM, PAPER_WIDTH = 10000, 768
"""RanPAC's M for ViT-B/16, whose features are 768 wide."""
MATRICES_AT_ONCE = 5
"""``M x M`` float64 matrices held at once while a ridge is chosen: G, the fit share's Gram matrix,
its eigenvectors and the eigendecomposition's workspace (about two more)."""
_CHUNK = 4096
"""Images projected at once, so that no ``images x M`` matrix is held whole."""


def default_projection_dim(width: int) -> int:
    """The paper's M = 10000 for 768-wide features, scaled with the width (1667 for 128)."""
    return math.ceil(PAPER_PROJECTION_DIM * width / PAPER_WIDTH)


def memory_bytes(projection_dim: int) -> int:
    """Peak memory of learning: the ``M x M`` float64 matrices (:data:`MATRICES_AT_ONCE`) and one
    chunk of projected images in float32 and float64 (measured on the CPU at M = 3000: 409 MiB,
    this says 484)."""
    return MATRICES_AT_ONCE * 8 * projection_dim**2 + _CHUNK * 12 * projection_dim


def largest_projection_dim(free: int) -> int:
    """The largest M whose :func:`memory_bytes` fits in ``free`` bytes."""
    a, b = MATRICES_AT_ONCE * 8, _CHUNK * 12
    m = int((math.sqrt(b * b + 4 * a * free) - b) / (2 * a))
    while memory_bytes(m + 1) <= free:
        m += 1
    while m > 0 and memory_bytes(m) > free:
        m -= 1
    return m


def _chunks(count: int) -> Iterator[slice]:
    return (slice(start, start + _CHUNK) for start in range(0, count, _CHUNK))


class RanPACClassifier(nn.Module):
    """The random projection, the accumulated statistics and the ridge classifier of RanPAC.

    Everything it learns is a buffer (``projection``, ``gram``, ``targets``, ``weights``, ``seen``,
    ``sessions``), so a checkpoint restores it exactly. ``seed`` draws the projection and each
    experience's split of held-out images.
    """

    def __init__(
        self,
        width: int,
        num_classes: int,
        projection_dim: int | None = None,
        ridges: Sequence[float] = PAPER_RIDGES,
        validation_fraction: float = 0.2,
        seed: int = 0,
    ):
        super().__init__()
        m = projection_dim or default_projection_dim(width)
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("projection", torch.randn(width, m, generator=generator))
        self.register_buffer("gram", torch.zeros(m, m, dtype=torch.float64))
        self.register_buffer("targets", torch.zeros(m, num_classes, dtype=torch.float64))
        self.register_buffer("weights", torch.zeros(m, num_classes, dtype=torch.float64))
        self.register_buffer("seen", torch.zeros(num_classes, dtype=torch.bool))
        self.register_buffer("sessions", torch.zeros((), dtype=torch.int64))
        self.ridges = list(ridges)
        self.validation_fraction = validation_fraction
        self.seed = seed

    @property
    def projection_dim(self) -> int:
        return self.projection.shape[1]

    def project(self, features: Tensor) -> Tensor:
        """``h = ReLU(f W)``, in float64 for the statistics."""
        return torch.relu(features.float() @ self.projection).double()

    def statistics(self, features: Tensor, onehot: Tensor) -> tuple[Tensor, Tensor]:
        """``(H^T H, H^T Y)`` of these images."""
        m = self.projection_dim
        gram = features.new_zeros(m, m, dtype=torch.float64)
        targets = features.new_zeros(m, onehot.shape[1], dtype=torch.float64)
        for rows in _chunks(len(features)):
            h = self.project(features[rows])
            gram += h.T @ h
            targets += h.T @ onehot[rows]
        return gram, targets

    def solve(self, gram: Tensor, targets: Tensor, ridge: float) -> Tensor:
        """``(gram + ridge I)^-1 targets`` (a solve, more stable than an inverse)."""
        regularised = gram + ridge * torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
        return torch.linalg.solve(regularised, targets)

    def choose_ridge(self, features: Tensor, onehot: Tensor) -> float:
        """The grid's ridge with the smallest squared error on a held-out share of these images,
        the classifier fitted on the others (a seeded split per experience).

        One eigendecomposition ``V diag(e) V^T`` of the fit share's Gram matrix serves every
        ridge: ``(G + lambda I)^-1 = V diag(1 / (e + lambda)) V^T`` (a solve per ridge costs
        several times more on a CPU).
        """
        count = len(features)
        held = max(1, round(self.validation_fraction * count))
        if count - held < 1:
            raise ValueError(
                f"RanPAC needs at least 2 training images per experience to choose its ridge "
                f"(one to fit, one to validate), got {count}"
            )
        split = torch.Generator().manual_seed(self.seed * 1_000_003 + int(self.sessions))
        order = torch.randperm(count, generator=split).to(features.device)
        fit, check = order[held:], order[:held]
        gram, targets = self.statistics(features[fit], onehot[fit])
        values, vectors = torch.linalg.eigh(gram)
        del gram
        values = values.clamp(min=0)  # a Gram matrix has none below 0; rounding may give some
        rotated = vectors.T @ targets
        errors = torch.zeros(len(self.ridges), dtype=torch.float64)
        for rows in _chunks(held):
            along = self.project(features[check][rows]) @ vectors
            for i, ridge in enumerate(self.ridges):
                predicted = (along / (values + ridge)) @ rotated
                errors[i] += (predicted - onehot[check][rows]).square().sum().item()
        return self.ridges[int(errors.argmin())]

    def learn(self, features: Tensor, labels: Tensor) -> dict[str, float]:
        """Add one experience's features and labels to the statistics, choose the ridge on them and
        solve for the classifier; returns the chosen ``ridge``."""
        onehot = F.one_hot(labels, self.targets.shape[1]).double()
        ridge = self.choose_ridge(features, onehot)
        gram, targets = self.statistics(features, onehot)
        self.gram += gram
        self.targets += targets
        self.weights.copy_(self.solve(self.gram, self.targets, ridge))
        self.seen[labels.unique()] = True
        self.sessions += 1
        return {"ridge": ridge, "projection_dim": self.projection_dim}

    def learned_values(self) -> int:
        """The classifier's weights of the seen classes (``M`` per class)."""
        return self.projection_dim * int(self.seen.sum())

    def forward(self, features: Tensor) -> Tensor:
        return (self.project(features) @ self.weights).float()
