"""Avalanche plugins: the decisions after each experience (pruning, absorption), mixed precision and
the gate's trace."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
from avalanche.evaluation.metric_results import MetricValue
from avalanche.training.plugins import SupervisedPlugin

from avalanche_sdlora.absorption import KD_THRESHOLD, DirectionFit
from avalanche_sdlora.pruning import AdapterDecision, SelectionPruner

__all__ = [
    "AutocastPlugin",
    "GateTracePlugin",
    "GumbelPruningPlugin",
    "KnowledgeDistillationPlugin",
    "SDLoRAPlugin",
]


class SDLoRAPlugin(SupervisedPlugin):
    """A plugin of :class:`~avalanche_sdlora.strategy.SDLoRA`: Avalanche's ``SupervisedPlugin``
    plus the events of its training phases (``strategy.phase`` tells which one: 1 selection,
    2 new task, 0 a joint phase). Subclass it to act at phase boundaries."""

    def before_training_phase(self, strategy, *args, **kwargs) -> None:
        """Called when a phase starts, after its trainable tensors and optimizer are set."""

    def after_training_phase(self, strategy, *args, **kwargs) -> None:
        """Called when a phase's epochs are done."""


def _publish(strategy, origin: SupervisedPlugin, prefix: str, values: Mapping[str, float]) -> None:
    """Hand values to the strategy's evaluator, so every logger records them."""
    x_plot = strategy.clock.train_iterations
    for name, value in values.items():
        strategy.evaluator.publish_metric_value(
            MetricValue(origin, f"{prefix}/{name}", float(value), x_plot)
        )


class GumbelPruningPlugin(SupervisedPlugin, supports_distributed=True):
    """Prunes rarely selected adapters after each training experience, then consolidates the new one.

    The decision (:class:`~avalanche_sdlora.pruning.SelectionPruner`, or the ``pruner`` given, such
    as the :class:`~avalanche_sdlora.pruning.RandomPruner` control) runs in ``after_training_exp``,
    before the experience's evaluation. Each adapter's alpha, logit, betas, frequency, decision and
    agreement is published through the strategy's evaluator, so every logger records it, and kept in
    ``history`` for the report. With the model's gate off there is nothing to select: every adapter
    is kept.

    Place it before plugins that snapshot the model in ``after_training_exp`` (LwF), so they see the
    consolidated model; ``SDLoRA`` puts its default instance first. The experience index is taken
    when the experience starts, so the plugin may sit anywhere in the list.
    """

    def __init__(
        self,
        num_samples: int = 200,
        threshold: float = 0.2,
        rule: str = "eval_beta",
        seed: int = 0,
        pruner: SelectionPruner | None = None,
    ):
        super().__init__()
        self.pruner = pruner or SelectionPruner(
            rule=rule, num_samples=num_samples, threshold=threshold, seed=seed
        )
        self.history: list[AdapterDecision] = []
        self._experience = 0

    def before_training_exp(self, strategy, **kwargs) -> None:
        self._experience = strategy.clock.train_exp_counter

    def after_training_exp(self, strategy, **kwargs) -> None:
        model = strategy.model
        if model.gate_enabled:
            decisions = self.pruner.decide(model, self._experience)
            self.pruner.apply(model, decisions)
            self.history.extend(decisions)
            for d in decisions:
                fields = ("alpha", "logit", "eval_beta", "mean_beta", "frequency", "pruned")
                prefix = f"Pruning/Exp{d.experience:03d}/Adapter{d.adapter:03d}"
                _publish(strategy, self, prefix, {f: getattr(d, f) for f in fields})
        model.consolidate()


class KnowledgeDistillationPlugin(SupervisedPlugin, supports_distributed=True):
    """SD-LoRA-KD: after each training experience, the new adapter is absorbed by the old ones on
    every projection where its direction is their linear combination up to ``threshold``.

    It consolidates the new adapter, fits it (:meth:`SDLoRAViT.direction_fits`) and absorbs it
    (:meth:`SDLoRAViT.absorb`). Every fit's residual and outcome is published through the
    strategy's evaluator and kept in ``history``. Defined for plain SD-LoRA (the model's gate off);
    place it before plugins that snapshot the model in ``after_training_exp`` (LwF).
    """

    def __init__(self, threshold: float = KD_THRESHOLD):
        super().__init__()
        if not threshold > 0:
            raise ValueError(f"threshold must be > 0, got {threshold}")
        self.threshold = threshold
        self.history: list[DirectionFit] = []
        self._experience = 0

    def before_training_exp(self, strategy, **kwargs) -> None:
        self._experience = strategy.clock.train_exp_counter

    def after_training_exp(self, strategy, **kwargs) -> None:
        model = strategy.model
        model.consolidate()
        index = model.num_adapters - 1  # the adapter this experience trained
        fits = model.direction_fits(index, self._experience)
        absorbed = set(model.absorb(index, self.threshold))
        for fit in fits:
            fit = dataclasses.replace(fit, absorbed=(fit.block, fit.projection) in absorbed)
            self.history.append(fit)
            prefix = f"Absorption/Exp{fit.experience:03d}/Block{fit.block:02d}/{fit.projection}"
            _publish(strategy, self, prefix, {"residual": fit.residual, "absorbed": fit.absorbed})


class AutocastPlugin(SupervisedPlugin, supports_distributed=True):
    """Runs every forward pass (training and evaluation) under ``torch.autocast``.

    The outputs are cast back to float32 so losses and metrics are computed in full precision.
    bf16 autocast works on CUDA and on the CPU.
    """

    def __init__(self, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.dtype = dtype
        self._context: torch.autocast | None = None

    def _enter(self, strategy) -> None:
        self._context = torch.autocast(device_type=strategy.device.type, dtype=self.dtype)
        self._context.__enter__()

    def _exit(self, strategy) -> None:
        self._context.__exit__(None, None, None)
        self._context = None
        strategy.mb_output = strategy.mb_output.float()

    def before_forward(self, strategy, **kwargs) -> None:
        self._enter(strategy)

    def after_forward(self, strategy, **kwargs) -> None:
        self._exit(strategy)

    def before_eval_forward(self, strategy, **kwargs) -> None:
        self._enter(strategy)

    def after_eval_forward(self, strategy, **kwargs) -> None:
        self._exit(strategy)


class GateTracePlugin(SupervisedPlugin, supports_distributed=True):
    """Records every adapter's alpha and mean training beta after each training epoch.

    ``trace`` holds one row per epoch and adapter (experience, phase, epoch, adapter, alpha, beta), so
    one can see whether a shrinking beta is compensated by a growing alpha (the seed's
    identifiability problem, which the two phases are meant to remove).
    """

    def __init__(self):
        super().__init__()
        self.trace: list[dict[str, float | int]] = []
        self._beta_sum: torch.Tensor | None = None
        self._steps = 0

    def before_training_epoch(self, strategy, **kwargs) -> None:
        self._beta_sum, self._steps = None, 0

    def after_training_iteration(self, strategy, **kwargs) -> None:
        if strategy.model.last_beta is None:  # no adapter yet, or none at all (head_only)
            return
        beta = strategy.model.last_beta.detach()
        self._beta_sum = beta if self._beta_sum is None else self._beta_sum + beta
        self._steps += 1

    def after_training_epoch(self, strategy, **kwargs) -> None:
        if not self._steps:
            return
        gate, mean_beta = strategy.model.gate, (self._beta_sum / self._steps).tolist()
        for adapter in gate.active_indices:
            self.trace.append(
                {
                    "experience": strategy.clock.train_exp_counter,
                    "phase": strategy.phase,
                    "epoch": strategy.clock.train_exp_epochs,
                    "adapter": adapter,
                    "alpha": gate.alphas[adapter].item(),
                    "beta": mean_beta[adapter],
                }
            )
