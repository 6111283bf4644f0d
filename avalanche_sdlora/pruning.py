"""The growth and pruning decision: whether the model grows, and which adapters the gate no longer uses.

After an experience's training, with no gradient, every active adapter gets a fate:

- ``rule="eval_beta"`` (the default) marks the adapters whose evaluation beta,
  ``sparsemax(l / tau_final)``, is exactly zero. The evaluated network is unchanged by pruning them, and
  no noise is involved, so re-drawing the noise always gives the same decision.
- ``rule="frequency"`` is the seed's rule: ``num_samples`` Gumbel-Sparsemax draws at ``tau`` give each
  adapter a selection frequency (the share of draws with ``beta > 0``); adapters below ``threshold``
  are marked, except the most selected one.

A marked new adapter is pruned at once; an old one only once the rule has marked it in ``patience``
consecutive decisions (its count restarts when it is used again), because old adapters serve earlier
tasks whose data is gone. ``patience=1`` is the one-step verdict.

The growth decision is the new adapter's (``growth``): ``"always"`` leaves it to the rule above (which,
with the new adapter protected, keeps it); ``"phase1"`` is the seed's, taken at the end of phase 1,
where the new adapter is still at its zero init and its logit is the "none of the old adapters" option:
the rule's verdict on it there prunes it before phase 2; ``"gain"`` keeps the trained new adapter only
when pruning it would cost at least ``growth_gain`` points of accuracy on its experience's classes
(:func:`accuracy_on` over the experience's training data; the plugin measures it).

The draws come from a generator seeded with ``(seed, experience, draw)``, never from torch's global
one, so a decision does not depend on how much noise training consumed. Each decision records its
``agreement``: the share of ``redraws`` independent re-draws (other generator seeds) that give the
adapter the same fate. :class:`RandomPruner` is the control that tells selection from chance.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
from torch import Tensor

from avalanche_sdlora.gate import GumbelGate
from avalanche_sdlora.model import SDLoRAViT

__all__ = [
    "GROWTH_RULES",
    "PRUNING_RULES",
    "AdapterDecision",
    "RandomPruner",
    "SelectionPruner",
    "accuracy_on",
    "experiences_without_growth",
]

PRUNING_RULES = ("eval_beta", "frequency")
GROWTH_RULES = ("always", "phase1", "gain")


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
    grew: bool = True
    """Whether the experience's new adapter survived its growth decision (alike on its every row)."""
    unused: int = 0
    """Consecutive decisions, this one included, in which the rule marked the adapter unused."""
    gain: float = math.nan
    """``growth="gain"``: points of accuracy the new adapter adds on its classes (NaN otherwise)."""

    def as_dict(self) -> dict[str, float | int | bool]:
        return asdict(self)


class SelectionPruner:
    """Decides whether the model grows and which active adapters to prune (see the module docstring).

    Args:
        rule: ``"eval_beta"`` or ``"frequency"``.
        num_samples: Gumbel draws per decision (the frequency rule's sample; reported for both).
        threshold: the frequency rule marks adapters selected in fewer than this share of draws.
        tau: temperature of the draws; ``None`` uses the gate's ``tau_final``.
        seed: seeds the decision's generators.
        redraws: independent re-draws that measure each decision's agreement.
        growth: ``"always"``, ``"phase1"`` or ``"gain"``: how the new adapter's fate is decided.
        growth_gain: ``growth="gain"``: the points of accuracy the new adapter must add to stay.
        patience: consecutive decisions that must mark an old adapter before it is pruned.
    """

    def __init__(
        self,
        rule: str = "eval_beta",
        num_samples: int = 200,
        threshold: float = 0.2,
        tau: float | None = None,
        seed: int = 0,
        redraws: int = 20,
        growth: str = "gain",
        growth_gain: float = 1.0,
        patience: int = 3,
    ):
        for name, value, allowed in (
            ("rule", rule, PRUNING_RULES),
            ("growth", growth, GROWTH_RULES),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")
        for name, value in (
            ("num_samples", num_samples),
            ("redraws", redraws),
            ("patience", patience),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        if not 0.0 <= growth_gain <= 100.0:
            raise ValueError(
                f"growth_gain must be in [0, 100] (points of accuracy), got {growth_gain}"
            )
        if tau is not None and tau <= 0:
            raise ValueError(f"tau must be > 0 or None, got {tau}")
        self.rule = rule
        self.num_samples = num_samples
        self.threshold = threshold
        self.tau = tau
        self.seed = int(seed)
        self.redraws = redraws
        self.growth = growth
        self.growth_gain = float(growth_gain)
        self.patience = patience
        self.unused: dict[int, int] = {}
        """Per active adapter: the consecutive decisions that marked it unused (pickled with the
        strategy, so a resumed run keeps counting)."""

    def generator(self, experience: int, draw: int) -> torch.Generator:
        """The CPU generator of one draw of one decision, independent of torch's global state."""
        state = np.random.SeedSequence([self.seed, experience, draw]).generate_state(1)[0]
        return torch.Generator().manual_seed(int(state))

    def _betas(self, gate: GumbelGate, generator: torch.Generator) -> torch.Tensor:
        """``num_samples`` draws of beta over the active adapters (rows: draws)."""
        return gate.sample_betas(self.num_samples, self.tau, generator)[:, gate.active_indices]

    def choose(self, gate: GumbelGate, experience: int, generator: torch.Generator) -> set[int]:
        """The adapters the rule marks unused, given the noise of ``generator``."""
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

    def fates(self, marked: set[int], new: Iterable[int] = ()) -> set[int]:
        """The adapters pruned when the rule ``marked`` these: a ``new`` one at once, an old one once
        this is its ``patience``-th marking in a row."""
        new = set(new)
        return {i for i in marked if i in new or self.unused.get(i, 0) + 1 >= self.patience}

    @torch.no_grad()
    def agreement(
        self, gate: GumbelGate, experience: int, chosen: set[int], new: Iterable[int] = ()
    ) -> dict[int, float]:
        """Per active adapter, the share of ``redraws`` re-draws that give it the fate in ``chosen``."""
        redrawn = [
            self.fates(self.choose(gate, experience, self.generator(experience, draw)), new)
            for draw in range(1, self.redraws + 1)
        ]
        return {
            index: float(np.mean([(index in other) == (index in chosen) for other in redrawn]))
            for index in gate.active_indices
        }

    @torch.no_grad()
    def decide(self, model: SDLoRAViT, experience: int) -> list[AdapterDecision]:
        """The decision for every active adapter of a gated model; neither the model nor the
        counts change (:meth:`apply` does that)."""
        gate = model.gate
        active = gate.active_indices
        betas = self._betas(gate, self.generator(experience, 0))
        frequency, mean_beta = (betas > 0).float().mean(dim=0), betas.mean(dim=0)
        eval_beta = gate.beta(noise=False)
        marked = self.choose(gate, experience, self.generator(experience, 0))
        pending = set(model.pending_adapters)
        chosen = self.fates(marked, pending)
        agreement = self.agreement(gate, experience, chosen, pending)
        rows = [
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
                unused=self.unused.get(index, 0) + 1 if index in marked else 0,
            )
            for k, index in enumerate(active)
        ]
        return _with_growth(rows)

    def phase1_growth(self, model: SDLoRAViT, experience: int) -> list[AdapterDecision]:
        """``growth="phase1"``, at the end of phase 1: the rows of the new adapters the rule marks,
        to be pruned before phase 2 (none when the model grows)."""
        return [d for d in self.decide(model, experience) if d.new and d.pruned]

    def with_gain(self, decisions: list[AdapterDecision], gain: float) -> list[AdapterDecision]:
        """``growth="gain"``: the decisions once the new adapter's ``gain`` (points of accuracy; NaN
        where it was not measured) is known. Below ``growth_gain`` the new adapter is pruned."""
        declined = gain < self.growth_gain
        return _with_growth(
            [replace(d, pruned=d.pruned or declined, gain=gain) if d.new else d for d in decisions]
        )

    def apply(self, model: SDLoRAViT, decisions: list[AdapterDecision]) -> None:
        """Prune what the decisions say, and keep each surviving adapter's count of markings."""
        model.prune([d.adapter for d in decisions if d.pruned])
        for d in decisions:
            if d.pruned:
                self.unused.pop(d.adapter, None)
            else:
                self.unused[d.adapter] = d.unused


def _with_growth(decisions: list[AdapterDecision]) -> list[AdapterDecision]:
    """``decisions`` with ``grew``: whether a new adapter survives them."""
    grew = any(d.new and not d.pruned for d in decisions)
    return [replace(d, grew=grew) for d in decisions]


def experiences_without_growth(decisions: Iterable[Mapping]) -> list[int]:
    """The experiences of a decision table (``AdapterDecision`` dicts, from any version of the
    table) in which no new adapter survived: the model did not grow."""
    rows = list(decisions)
    grew = {row["experience"] for row in rows if row["new"] and not row["pruned"]}
    return sorted({row["experience"] for row in rows} - grew)


@torch.no_grad()
def accuracy_on(
    model: SDLoRAViT,
    batches: Iterable[Sequence[Tensor]],
    classes: Sequence[int],
    device: torch.device | str = "cpu",
) -> float:
    """Accuracy (%) of ``model`` on ``batches`` (``x, y, ...``) when it chooses among ``classes``
    alone, as the training loss on the current classes does."""
    columns = torch.as_tensor(sorted(classes), device=device)
    correct = total = 0
    for x, y, *_ in batches:
        x, y = x.to(device), y.to(device)
        predicted = columns[model(x)[:, columns].argmax(dim=1)]
        correct += int((predicted == y).sum())
        total += len(y)
    return 100.0 * correct / total


class RandomPruner(SelectionPruner):
    """The control: prunes ``counts[experience]`` active adapters chosen uniformly at random.

    Give it the numbers a gated run pruned at each experience (``counts_from``) and it removes as many
    adapters at the same experiences, so the two runs differ only in *which* adapters go. At least one
    adapter always stays. The logged frequencies and betas are the gate's, for comparison.
    """

    def __init__(
        self,
        counts: Mapping[int, int],
        seed: int = 0,
        growth: str = "always",
        patience: int = 1,
        **kwargs,
    ):
        super().__init__(seed=seed, growth=growth, patience=patience, **kwargs)
        if self.growth != "always" or self.patience != 1:
            raise ValueError(
                "RandomPruner takes growth='always' and patience=1: the counts it is given are "
                "the gated run's whole decisions"
            )
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
