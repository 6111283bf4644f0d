"""The growth and pruning decision: which adapters the gate no longer uses.

After an experience's training, with no gradient, every active adapter gets a fate:

- ``rule="eval_beta"`` (the default) prunes the adapters whose evaluation beta,
  ``sparsemax(l / tau_final)``, is exactly zero. The evaluated network is unchanged by the pruning, and
  no noise is involved, so re-drawing the noise always gives the same decision.
- ``rule="frequency"`` is the seed's rule: ``num_samples`` Gumbel-Sparsemax draws at ``tau`` give each
  adapter a selection frequency (the share of draws with ``beta > 0``); adapters below ``threshold``
  are pruned, except the most selected one.

The draws come from a generator seeded with ``(seed, experience, draw)``, never from torch's global
one, so a decision does not depend on how much noise training consumed. Each decision records its
``agreement``: the share of ``redraws`` independent re-draws (other generator seeds) that give the
adapter the same fate. :class:`RandomPruner` is the control that tells selection from chance.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np
import torch

from avalanche_sdlora.gate import GumbelGate
from avalanche_sdlora.model import SDLoRAViT

__all__ = ["PRUNING_RULES", "AdapterDecision", "RandomPruner", "SelectionPruner"]

PRUNING_RULES = ("eval_beta", "frequency")


@dataclass(frozen=True)
class AdapterDecision:
    """One row of the decision table: an active adapter's state and its fate."""

    experience: int
    adapter: int
    alpha: float
    logit: float
    eval_beta: float
    mean_beta: float
    frequency: float
    pruned: bool
    new: bool
    agreement: float

    def as_dict(self) -> dict[str, float | int | bool]:
        return asdict(self)


class SelectionPruner:
    """Decides which active adapters to prune (see the module docstring for the rules).

    Args:
        rule: ``"eval_beta"`` or ``"frequency"``.
        num_samples: Gumbel draws per decision (the frequency rule's sample; reported for both).
        threshold: the frequency rule prunes adapters selected in fewer than this share of draws.
        tau: temperature of the draws; ``None`` uses the gate's ``tau_final``.
        seed: seeds the decision's generators.
        redraws: independent re-draws that measure each decision's agreement.
    """

    def __init__(
        self,
        rule: str = "eval_beta",
        num_samples: int = 200,
        threshold: float = 0.2,
        tau: float | None = None,
        seed: int = 0,
        redraws: int = 20,
    ):
        if rule not in PRUNING_RULES:
            raise ValueError(f"rule must be one of {list(PRUNING_RULES)}, got {rule!r}")
        for name, value in (("num_samples", num_samples), ("redraws", redraws)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        if tau is not None and tau <= 0:
            raise ValueError(f"tau must be > 0 or None, got {tau}")
        self.rule = rule
        self.num_samples = num_samples
        self.threshold = threshold
        self.tau = tau
        self.seed = int(seed)
        self.redraws = redraws

    def generator(self, experience: int, draw: int) -> torch.Generator:
        """The CPU generator of one draw of one decision, independent of torch's global state."""
        state = np.random.SeedSequence([self.seed, experience, draw]).generate_state(1)[0]
        return torch.Generator().manual_seed(int(state))

    def _betas(self, gate: GumbelGate, generator: torch.Generator) -> torch.Tensor:
        """``num_samples`` draws of beta over the active adapters (rows: draws)."""
        return gate.sample_betas(self.num_samples, self.tau, generator)[:, gate.active_indices]

    def choose(self, gate: GumbelGate, experience: int, generator: torch.Generator) -> set[int]:
        """The adapters to prune, given the noise of ``generator``."""
        active = gate.active_indices
        if self.rule == "eval_beta":
            beta = gate.beta(noise=False)
            return {index for index in active if beta[index].item() == 0.0}
        betas = self._betas(gate, generator)
        frequency, mean_beta = (betas > 0).float().mean(dim=0), betas.mean(dim=0)
        # the most selected adapter (ties: larger mean beta) is never pruned
        keep = max(range(len(active)), key=lambda k: (frequency[k].item(), mean_beta[k].item()))
        return {
            index
            for k, index in enumerate(active)
            if k != keep and frequency[k].item() < self.threshold
        }

    @torch.no_grad()
    def agreement(self, gate: GumbelGate, experience: int, chosen: set[int]) -> dict[int, float]:
        """Per active adapter, the share of ``redraws`` re-draws that give it the fate in ``chosen``."""
        redrawn = [
            self.choose(gate, experience, self.generator(experience, draw))
            for draw in range(1, self.redraws + 1)
        ]
        return {
            index: float(np.mean([(index in other) == (index in chosen) for other in redrawn]))
            for index in gate.active_indices
        }

    @torch.no_grad()
    def decide(self, model: SDLoRAViT, experience: int) -> list[AdapterDecision]:
        """The decision for every active adapter of a gated model; the model is not changed."""
        gate = model.gate
        active = gate.active_indices
        betas = self._betas(gate, self.generator(experience, 0))
        frequency, mean_beta = (betas > 0).float().mean(dim=0), betas.mean(dim=0)
        eval_beta = gate.beta(noise=False)
        chosen = self.choose(gate, experience, self.generator(experience, 0))
        agreement = self.agreement(gate, experience, chosen)
        pending = set(model.pending_adapters)
        return [
            AdapterDecision(
                experience=experience,
                adapter=index,
                alpha=gate.alphas[index].item(),
                logit=gate.logits[index].item(),
                eval_beta=eval_beta[index].item(),
                mean_beta=mean_beta[k].item(),
                frequency=frequency[k].item(),
                pruned=index in chosen,
                new=index in pending,
                agreement=agreement[index],
            )
            for k, index in enumerate(active)
        ]

    def apply(self, model: SDLoRAViT, decisions: list[AdapterDecision]) -> None:
        """Prune what the decision says."""
        model.prune([d.adapter for d in decisions if d.pruned])


class RandomPruner(SelectionPruner):
    """The control: prunes ``counts[experience]`` active adapters chosen uniformly at random.

    Give it the numbers a gated run pruned at each experience (``counts_from``) and it removes as many
    adapters at the same experiences, so the two runs differ only in *which* adapters go. At least one
    adapter always stays. The logged frequencies and betas are the gate's, for comparison.
    """

    def __init__(self, counts: Mapping[int, int], seed: int = 0, **kwargs):
        super().__init__(seed=seed, **kwargs)
        bad = {k: v for k, v in counts.items() if not (isinstance(v, int) and v >= 0)}
        if bad:
            raise ValueError(f"counts must map experiences to ints >= 0, got {bad}")
        self.counts = {int(k): v for k, v in counts.items()}

    @staticmethod
    def counts_from(decisions: list[Mapping]) -> dict[int, int]:
        """Adapters pruned per experience in a run's decision table (``AdapterDecision`` dicts)."""
        counts: dict[int, int] = {}
        for row in decisions:
            counts[row["experience"]] = counts.get(row["experience"], 0) + int(row["pruned"])
        return counts

    def choose(self, gate: GumbelGate, experience: int, generator: torch.Generator) -> set[int]:
        active = gate.active_indices
        count = min(self.counts.get(experience, 0), len(active) - 1)
        order = torch.randperm(len(active), generator=generator)[:count]
        return {active[k] for k in order.tolist()}
