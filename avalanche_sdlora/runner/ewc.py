"""EWC whose penalty SGD can always follow: importances capped at a share of the stability limit.

EWC's penalty ``lambda * sum_i F_i (theta_i - theta*_i)^2`` has curvature ``2 * lambda * F_i`` on
weight ``i``. SGD with momentum ``mu`` at learning rate ``lr`` is stable on a quadratic only while
``lr * curvature < 2 * (1 + mu)``; past that the penalty alone makes the weight oscillate with
growing amplitude and the loss turns NaN, which is what Avalanche's EWC did on the study (in both
modes: the importances grow with the epochs as well as with the experiences). Capping every
importance at ``max_stiffness * (1 + mu) / (lr * lambda)`` keeps each weight's penalty below
``max_stiffness`` of that limit whatever the data: a weight at the cap is as stiff as SGD can hold,
so the cap changes what EWC protects only where it would otherwise diverge.
"""

from __future__ import annotations

from avalanche.training.plugins import EWCPlugin

__all__ = ["StableEWCPlugin", "importance_cap"]


def importance_cap(lr: float, momentum: float, ewc_lambda: float, max_stiffness: float) -> float:
    """The largest importance whose penalty curvature is ``max_stiffness`` of SGD's stability limit
    ``2 * (1 + momentum) / lr``."""
    return max_stiffness * (1 + momentum) / (lr * ewc_lambda)


class StableEWCPlugin(EWCPlugin):
    """Avalanche's ``EWCPlugin`` with every importance capped at ``cap`` once it is computed."""

    def __init__(self, ewc_lambda: float, cap: float, **kwargs):
        super().__init__(ewc_lambda, **kwargs)
        self.cap = cap
        self.capped = 0
        """How many importances the cap lowered, over the run."""

    def update_importances(self, importances, t: int) -> None:
        super().update_importances(importances, t)
        for importance in self.importances[t].values():
            self.capped += int((importance.data > self.cap).sum())
            importance.data.clamp_(max=self.cap)
