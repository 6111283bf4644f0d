"""The Gumbel-Sparsemax gate that decides which LoRA adapters a step uses.

Every adapter owns one gate logit ``l_i``, one magnitude ``alpha_i`` and a pruned flag. In training a
single Gumbel sample per step gives ``beta = sparsemax((l + G) / tau)`` over the adapters that are not
pruned: exact zeros, summing to one, so "adapter i was selected" is one event shared by every block.
In evaluation there is no noise: ``beta = sparsemax(l / tau_final)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from entmax import sparsemax
from torch import Tensor, nn

__all__ = [
    "GumbelGate",
    "annealed_temperature",
    "entropy_sparsity",
    "gini_sparsity",
    "gumbel_sparsemax",
    "phase_temperature",
]


def gumbel_sparsemax(
    logits: Tensor, tau: float, generator: torch.Generator | None = None, noise: bool = True
) -> Tensor:
    """``sparsemax((logits + G) / tau)`` over the last dimension, ``G ~ Gumbel(0, 1)``.

    ``-inf`` logits are out of the support and get exactly zero. A ``generator`` makes the noise
    reproducible; its device is where the noise is drawn.
    """
    if tau <= 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if noise:
        device = generator.device if generator is not None else logits.device
        exponential = torch.empty(logits.shape, device=device).exponential_(generator=generator)
        logits = logits - exponential.log().to(logits.device)
    finite = torch.isfinite(logits)
    if finite.all():
        return sparsemax(logits / tau, dim=-1)
    if not finite.any(dim=-1).all():
        raise ValueError("gumbel_sparsemax needs at least one finite logit per row")
    # sparsemax over the finite entries only; the others are exact zeros.
    shifted = torch.where(
        finite, logits / tau, torch.full_like(logits, torch.finfo(logits.dtype).min)
    )
    return sparsemax(shifted, dim=-1) * finite


def annealed_temperature(step: int, tau_init: float, tau_final: float, rate: float) -> float:
    """``tau_final + (tau_init - tau_final) * rate ** step``: the per-step Gumbel temperature."""
    return tau_final + (tau_init - tau_final) * rate**step


def phase_temperature(step: int, steps: int, tau_init: float, tau_final: float) -> float:
    """Geometric anneal from ``tau_init`` at step 0 to ``tau_final`` at step ``steps - 1``, then flat.

    The schedule of ``gumbel_schedule="phase"``: it ends at ``tau_final`` whatever the number of
    steps, so the gate behaves the same at 100 steps or 10,000.
    """
    if steps <= 1 or step >= steps - 1:
        return tau_final
    return tau_init * (tau_final / tau_init) ** (step / (steps - 1))


def gini_sparsity(beta: Tensor) -> Tensor:
    """Gini (Tsallis-2) impurity ``1 - sum beta_i^2``: zero exactly at a one-hot ``beta``."""
    return 1.0 - beta.pow(2).sum(dim=-1)


def entropy_sparsity(beta: Tensor) -> Tensor:
    """Shannon entropy ``-sum beta_i log beta_i`` (with ``0 log 0 = 0``)."""
    return -torch.special.xlogy(beta, beta).sum(dim=-1)


class GumbelGate(nn.Module):
    """Per-adapter gate logits, magnitudes (alpha) and pruned flags, and the Gumbel-Sparsemax over them.

    Adapters are indexed in the order they were added; a pruned adapter keeps its index (and its
    tensors, so checkpoints stay aligned) but is never selected again.

    Args:
        init_logit: the logit a new adapter starts with.
        alpha_init: the magnitude a new adapter starts with.
        tau_final: the evaluation temperature (and the end of the training schedule).
    """

    def __init__(self, init_logit: float = 0.0, alpha_init: float = 1.0, tau_final: float = 0.5):
        super().__init__()
        if tau_final <= 0:
            raise ValueError(f"tau_final must be > 0, got {tau_final}")
        self.init_logit = float(init_logit)
        self.alpha_init = float(alpha_init)
        self.tau_final = float(tau_final)
        self.tau = float(tau_final)
        """Training temperature of the next sample; the strategy anneals it per step."""
        self.logits = nn.ParameterList()
        self.alphas = nn.ParameterList()
        self.register_buffer("pruned", torch.zeros(0, dtype=torch.bool))

    def get_extra_state(self) -> dict[str, float]:
        """``tau_final`` travels with the state dict: it defines the evaluated network."""
        return {"tau_final": self.tau_final}

    def set_extra_state(self, state: dict[str, float]) -> None:
        self.tau_final = float(state["tau_final"])

    @property
    def num_adapters(self) -> int:
        """Adapters ever added, pruned ones included."""
        return len(self.logits)

    @property
    def active_indices(self) -> list[int]:
        """Indices of the adapters that are not pruned, in order."""
        return [i for i, gone in enumerate(self.pruned.tolist()) if not gone]

    def add_adapter(self) -> int:
        """Append one adapter's logit (``init_logit``) and alpha (``alpha_init``); return its index."""
        device = self.pruned.device
        self.logits.append(nn.Parameter(torch.tensor(self.init_logit, device=device)))
        self.alphas.append(nn.Parameter(torch.tensor(self.alpha_init, device=device)))
        self.pruned = torch.cat([self.pruned, self.pruned.new_zeros(1)])
        return self.num_adapters - 1

    def check_indices(self, indices: Iterable[int], *, allow_pruned: bool = True) -> list[int]:
        """Validate adapter indices (ints, in range, optionally not pruned) and return them as a list."""
        checked = []
        for index in indices:
            if isinstance(index, bool) or not isinstance(index, int | torch.Tensor):
                raise TypeError(f"adapter indices must be ints, got {index!r}")
            index = int(index)
            if not 0 <= index < self.num_adapters:
                raise ValueError(
                    f"adapter index {index} is out of range: the gate has {self.num_adapters} "
                    f"adapters (valid 0..{self.num_adapters - 1})"
                )
            if not allow_pruned and self.pruned[index]:
                raise ValueError(
                    f"adapter {index} is pruned; active adapters: {self.active_indices}"
                )
            checked.append(index)
        return checked

    def _set_requires_grad(
        self, params: nn.ParameterList, indices: Iterable[int], flag: bool
    ) -> None:
        for index in self.check_indices(indices, allow_pruned=not flag):
            params[index].requires_grad_(flag)
            if not flag:  # a stale gradient would reach plugins that read every .grad (EWC, SI)
                params[index].grad = None

    def freeze_alphas(self, task_indices: Iterable[int]) -> None:
        """Stop training the magnitudes of these adapters."""
        self._set_requires_grad(self.alphas, task_indices, False)

    def unfreeze_alphas(self, task_indices: Iterable[int]) -> None:
        """Train the magnitudes of these (active) adapters."""
        self._set_requires_grad(self.alphas, task_indices, True)

    def freeze_logits(self, task_indices: Iterable[int]) -> None:
        """Stop training the gate logits of these adapters."""
        self._set_requires_grad(self.logits, task_indices, False)

    def unfreeze_logits(self, task_indices: Iterable[int]) -> None:
        """Train the gate logits of these (active) adapters."""
        self._set_requires_grad(self.logits, task_indices, True)

    @torch.no_grad()
    def raise_logit(self, index: int, floor: float) -> None:
        """Set adapter ``index``'s logit to ``floor`` if it is below it."""
        (index,) = self.check_indices([index], allow_pruned=False)
        self.logits[index].clamp_(min=floor)

    def prune(self, indices: Iterable[int]) -> None:
        """Remove adapters from the selection for good; at least one adapter must stay active."""
        indices = sorted(set(self.check_indices(indices, allow_pruned=False)))
        remaining = [i for i in self.active_indices if i not in indices]
        if indices and not remaining:
            raise ValueError(
                f"cannot prune {indices}: it would leave no active adapter (active: "
                f"{self.active_indices})"
            )
        self._set_requires_grad(self.logits, indices, False)
        self._set_requires_grad(self.alphas, indices, False)
        if indices:
            pruned = self.pruned.clone()
            pruned[indices] = True
            self.pruned = pruned

    def logit_vector(self) -> Tensor:
        """The logits as one tensor, ``-inf`` where pruned (keeps the graph to each logit)."""
        logits = torch.stack(list(self.logits))
        return logits.masked_fill(self.pruned, float("-inf"))

    def alpha_vector(self) -> Tensor:
        """The magnitudes as one tensor (keeps the graph to each alpha)."""
        return torch.stack(list(self.alphas))

    def beta(self, noise: bool, generator: torch.Generator | None = None) -> Tensor:
        """One ``beta`` over all adapters (zeros where pruned).

        With ``noise``, one Gumbel sample at the training temperature ``tau``; without, the
        deterministic ``sparsemax(l / tau_final)`` of evaluation.
        """
        if self.num_adapters == 0:
            return self.pruned.new_zeros(0, dtype=torch.float32)
        if noise:
            return gumbel_sparsemax(self.logit_vector(), self.tau, generator)
        return gumbel_sparsemax(self.logit_vector(), self.tau_final, noise=False)

    def forward(self, generator: torch.Generator | None = None) -> Tensor:
        """``beta``: sampled in training mode, deterministic in evaluation mode."""
        return self.beta(self.training, generator)

    @torch.no_grad()
    def sample_betas(
        self, num_samples: int, tau: float | None = None, generator: torch.Generator | None = None
    ) -> Tensor:
        """``num_samples`` independent Gumbel-Sparsemax draws at ``tau`` (default ``tau_final``)."""
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
        tau = self.tau_final if tau is None else tau
        logits = self.logit_vector().detach()
        return gumbel_sparsemax(logits.expand(num_samples, -1), tau, generator)

    def get_selection_frequency(
        self,
        task_indices: Sequence[int],
        tau: float | None = None,
        num_samples: int = 10,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Fraction of ``num_samples`` Gumbel samples at ``tau`` in which each adapter has ``beta > 0``.

        Returns a 1-D tensor aligned with ``task_indices``; pruned adapters get 0.
        """
        indices = self.check_indices(task_indices)
        frequency = (self.sample_betas(num_samples, tau, generator) > 0).float().mean(dim=0)
        return frequency[indices]
