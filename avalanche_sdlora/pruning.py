"""The growth and pruning decision: which adapters the gate rarely selects.

After an experience's training, with no gradient, ``num_samples`` Gumbel-Sparsemax draws at the final
temperature give each active adapter a selection frequency (the fraction of draws with ``beta > 0``).
Adapters below ``threshold`` are pruned, except the most selected one, so at least one stays. When
the new adapter is pruned the model did not grow.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from avalanche_sdlora.model import SDLoRAViT

__all__ = ["AdapterDecision", "SelectionPruner"]


@dataclass(frozen=True)
class AdapterDecision:
    """One row of the decision table: an active adapter's state and its fate."""

    experience: int
    adapter: int
    alpha: float
    logit: float
    mean_beta: float
    frequency: float
    pruned: bool
    new: bool

    def as_dict(self) -> dict[str, float | int | bool]:
        return asdict(self)


class SelectionPruner:
    """Decides, from Gumbel-Sparsemax selection frequencies, which adapters to prune.

    Args:
        num_samples: Gumbel draws per decision.
        threshold: adapters selected in fewer than this fraction of draws are pruned.
        tau: temperature of the draws; ``None`` uses the gate's ``tau_final``.
    """

    def __init__(self, num_samples: int = 10, threshold: float = 0.2, tau: float | None = None):
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        if tau is not None and tau <= 0:
            raise ValueError(f"tau must be > 0 or None, got {tau}")
        self.num_samples = num_samples
        self.threshold = threshold
        self.tau = tau

    @torch.no_grad()
    def decide(
        self, model: SDLoRAViT, experience: int, generator: torch.Generator | None = None
    ) -> list[AdapterDecision]:
        """The decision for every active adapter; the model is not changed."""
        gate = model.gate
        active = gate.active_indices
        betas = gate.sample_betas(self.num_samples, self.tau, generator)[:, active]
        frequency = (betas > 0).float().mean(dim=0)
        mean_beta = betas.mean(dim=0)
        # the most selected adapter (ties: larger mean beta) is never pruned
        keep = max(range(len(active)), key=lambda k: (frequency[k].item(), mean_beta[k].item()))
        pending = set(model.pending_adapters)
        return [
            AdapterDecision(
                experience=experience,
                adapter=index,
                alpha=gate.alphas[index].item(),
                logit=gate.logits[index].item(),
                mean_beta=mean_beta[k].item(),
                frequency=frequency[k].item(),
                pruned=k != keep and frequency[k].item() < self.threshold,
                new=index in pending,
            )
            for k, index in enumerate(active)
        ]

    def apply(self, model: SDLoRAViT, decisions: list[AdapterDecision]) -> None:
        """Prune what the decision says."""
        model.prune([d.adapter for d in decisions if d.pruned])
