"""SD-LoRA-KD's fit: how well a new adapter's direction is spanned by the old ones, per projection.

For one adapted projection p, the new adapter's unit direction ``D_t^p`` is fitted by least squares on
the old adapters' unit directions ``D_i^p`` (flattened). Where the relative residual
``||D_t^p - sum_i c_i D_i^p||_F^2`` is small, the new slice is redundant: its contribution
``a_t D_t^p`` is taken over by the old adapters, whose magnitude on p grows by ``a_t c_i``. The fit
needs only the Gram matrix of the directions, which :meth:`LoRAQKV.gram` computes from r x r
products, so no ``d_out x d_in`` matrix is ever formed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor

__all__ = ["KD_THRESHOLD", "DirectionFit", "fit_direction"]

KD_THRESHOLD = 9e-4
"""LibContinual's threshold on the relative residual."""


@dataclass(frozen=True)
class DirectionFit:
    """One projection's fit of an adapter's direction on the older adapters' directions."""

    experience: int
    adapter: int
    block: int
    projection: str
    residual: float
    coefficients: dict[int, float]
    """Old adapter index -> ``c_i``."""
    absorbed: bool

    def as_dict(self) -> dict:
        return asdict(self)


def fit_direction(gram: Tensor) -> tuple[Tensor, float]:
    """Least-squares coefficients and relative residual of the last direction on the others.

    ``gram`` (n + 1, n + 1) holds the inner products of the unnormalised directions, the fitted one
    last. Directions are normalised here; a zero direction (nothing learnt) fits exactly with
    ``c = 0``, and linearly dependent old directions get the minimum-norm solution.
    """
    norms = gram.diagonal().clamp_min(torch.finfo(gram.dtype).tiny).sqrt()
    unit = gram / (norms[:, None] * norms[None, :])
    old, rhs, target = unit[:-1, :-1], unit[:-1, -1], unit[-1, -1]
    coefficients = torch.linalg.lstsq(old.cpu(), rhs.cpu()[:, None], driver="gelsd").solution[:, 0]
    if target.item() == 0.0:
        return coefficients.zero_(), 0.0
    residual = (target - rhs.cpu() @ coefficients) / target
    return coefficients, max(residual.item(), 0.0)
