"""The SD-LoRA strategy: two training phases per experience on an :class:`SDLoRAViT`.

Phase 1 (learn selection) trains the gate logits and the head with every alpha and every adapter frozen
(the new one at its zero init); loss CE + ``lambda_sparsity * Omega(beta)``. Phase 2 (learn the new task)
trains the new adapter, every active alpha and the head with the logits frozen; loss CE +
``lambda_alpha * sum_i alpha_i^2``. With the gate off there is one phase (plain SD-LoRA); with
``two_phase=False`` one joint phase trains everything at once (the seed's identifiability ablation).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import resource
import time
from collections.abc import Sequence
from contextlib import contextmanager
from typing import Any

import torch
from avalanche.core import BasePlugin
from avalanche.distributed import DistributedHelper
from avalanche.training.templates import SupervisedTemplate
from avalanche.training.utils import trigger_plugins
from torch import Tensor, nn

from avalanche_sdlora.compatibility import PhaseRestarts, check_plugins
from avalanche_sdlora.gate import (
    annealed_temperature,
    entropy_sparsity,
    gini_sparsity,
    phase_temperature,
)
from avalanche_sdlora.model import SDLoRAViT
from avalanche_sdlora.plugins import GumbelPruningPlugin, SDLoRAPlugin
from avalanche_sdlora.settings import OPTIMIZERS, OptimizerFactory, SDLoRASettings

__all__ = ["JOINT_PHASE", "SDLoRA", "peak_memory_mb"]

JOINT_PHASE = 0
"""``strategy.phase`` of the single phase used with the gate off or ``two_phase=False``."""

SPARSITY = {"gini": gini_sparsity, "entropy": entropy_sparsity}
PARAMETER_ROLES = ("adapters", "alphas", "logits", "head")


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocations on a GPU, resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _build(
    optimizer: str | OptimizerFactory, groups: list[dict], settings: SDLoRASettings
) -> torch.optim.Optimizer:
    """An optimizer over ``groups``: a named ``torch.optim`` class (SGD with the settings' momentum)
    or the user's factory."""
    if callable(optimizer):
        return optimizer(groups)
    extra = {"momentum": settings.momentum} if optimizer == "sgd" else {}
    return OPTIMIZERS[optimizer](groups, lr=groups[0]["lr"], **extra)


class SDLoRA(SupervisedTemplate):
    """SD-LoRA with a Gumbel-Sparsemax adapter gate, used like any Avalanche strategy.

    Settings (:class:`~avalanche_sdlora.settings.SDLoRASettings`: each one's default, meaning
    and check) are keyword arguments, e.g. ``SDLoRA(model=model, lr=0.01, gate_lr=0.05)``, or a
    ready ``settings=SDLoRASettings(...)`` that keyword arguments override. Every other keyword
    argument goes to Avalanche's ``SupervisedTemplate`` (``device``, ``evaluator``,
    ``eval_every``, ...) with its meaning there; ``eval_mb_size`` defaults to ``train_mb_size``.
    ``optimizer`` names a ``torch.optim`` class (``"sgd"``, ``"adam"``, ``"adamw"``) or is a
    factory called with the parameter groups, e.g. ``functools.partial(torch.optim.SGD,
    momentum=0.5)``.

    One optimizer lives as long as the strategy (``strategy.optimizer``), with four parameter groups
    (adapters, alphas, logits, head), each with its own learning rate; each phase refills the groups
    with its trainable tensors and clears the optimizer state, i.e. a fresh optimizer per phase. A
    learning-rate scheduler built on ``strategy.optimizer`` therefore follows whichever phase runs:
    add it after construction, ``strategy.plugins.append(LRSchedulerPlugin(StepLR(strategy.optimizer,
    ...)))``; its epochs count across both phases and restart each experience.

    Each phase fires the plugin events ``before_training_phase`` and ``after_training_phase``
    (``strategy.phase`` tells which) on plugins that define them (:class:`SDLoRAPlugin`). Avalanche plugins that know only experiences are told through
    :class:`~avalanche_sdlora.compatibility.PhaseRestarts`: an ``EarlyStoppingPlugin`` acts per phase
    (stopping ends the running phase; its patience restarts with each) and RWalk's snapshot includes
    the experience's adapter. Plugins that cannot train with SD-LoRA (docs/plugins.md) raise
    :class:`~avalanche_sdlora.compatibility.IncompatiblePluginError` here, naming the reason.
    """

    PLUGIN_CLASS = SDLoRAPlugin

    def __init__(
        self,
        *,
        model: SDLoRAViT,
        settings: SDLoRASettings | None = None,
        criterion: nn.Module | None = None,
        train_mb_size: int = 128,
        train_epochs: int = 20,
        eval_mb_size: int | None = None,
        plugins: Sequence[BasePlugin] | None = None,
        **kwargs: Any,
    ):
        if not isinstance(model, SDLoRAViT):
            raise TypeError(f"SDLoRA trains an SDLoRAViT, got {type(model).__name__}")
        for name, value in (("train_mb_size", train_mb_size), ("train_epochs", train_epochs)):
            if not (isinstance(value, int) and value >= 1):
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not (eval_mb_size is None or (isinstance(eval_mb_size, int) and eval_mb_size >= 1)):
            raise ValueError(f"eval_mb_size must be an int >= 1 or None, got {eval_mb_size!r}")
        chosen = {name: kwargs.pop(name) for name in SDLoRASettings.names() if name in kwargs}
        self.settings = dataclasses.replace(settings or SDLoRASettings(), **chosen)
        """The method's settings (read-only)."""

        plugins = list(plugins or [])
        check_plugins(plugins, model)
        if self.settings.pruning and not any(isinstance(p, GumbelPruningPlugin) for p in plugins):
            plugins.insert(0, GumbelPruningPlugin())
        _check_growth(plugins, self.settings)
        phase_restarts = PhaseRestarts(plugins)
        if phase_restarts.targets:
            plugins.append(phase_restarts)
        super().__init__(
            model=model,
            optimizer=self._build_optimizer(),
            criterion=nn.CrossEntropyLoss() if criterion is None else criterion,
            train_mb_size=train_mb_size,
            train_epochs=train_epochs,
            eval_mb_size=eval_mb_size,
            plugins=plugins,
            **kwargs,
        )
        model.gate.tau_final = self.settings.gumbel_tau_final
        self.gate_optimizer: torch.optim.Optimizer | None = None
        """The logits' own optimizer (``gate_optimizer``), or ``None`` when they train in ``optimizer``."""
        if self.settings.gate_optimizer is not None:
            gate_lr = self.settings.gate_lr
            gate_group = {"params": [], "name": "logits", "lr": gate_lr, "weight_decay": 0.0}
            self.gate_optimizer = _build(self.settings.gate_optimizer, [gate_group], self.settings)
        self.phase: int | None = None
        """1 (selection), 2 (new task) or ``JOINT_PHASE`` while training; ``None`` otherwise."""
        self.gate_step = 0
        """Training steps taken in the current experience: the temperature schedule's clock."""
        self.anneal_steps = 0
        """Steps of the current experience over which ``gumbel_schedule="phase"`` anneals."""
        self.experience_log: list[dict] = []
        """One record per trained experience: adapters, parameters, wall time, peak memory."""
        self._phase_seconds: dict[str, float] = {}

    def _build_optimizer(self) -> torch.optim.Optimizer:
        """The main optimizer, one (empty) parameter group per role with its learning rate."""
        rates = self.settings.learning_rates()
        decay = self.settings.weight_decay
        groups = [
            {
                "params": [],
                "name": role,
                "lr": rates[role],
                "weight_decay": decay if role in ("adapters", "head") else 0.0,
            }
            for role in PARAMETER_ROLES
        ]
        return _build(self.settings.optimizer, groups, self.settings)

    @property
    def pruning_plugin(self) -> GumbelPruningPlugin | None:
        return next((p for p in self.plugins if isinstance(p, GumbelPruningPlugin)), None)

    # ------------------------------------------------------------------ phases

    def phase_plan(self) -> list[tuple[int, int]]:
        """``(phase, epochs)`` of the current settings, phases without epochs left out."""
        if not (self.model.gate_enabled and self.settings.two_phase):
            return [(JOINT_PHASE, self.train_epochs)]
        first = math.floor(self.settings.phase1_fraction * self.train_epochs)
        if self.train_epochs >= 2:
            first = max(first, 1)
        return [(p, e) for p, e in ((1, first), (2, self.train_epochs - first)) if e > 0]

    def _configure_phase(self, phase: int) -> None:
        """Set what trains in ``phase`` (see the module docstring) and refill the optimizer."""
        model: SDLoRAViT = self.model
        gate, active = model.gate, model.gate.active_indices
        learns_task = phase in (2, JOINT_PHASE)
        learns_selection = model.gate_enabled and phase in (1, JOINT_PHASE)
        for index in model.pending_adapters:
            model.set_adapter_trainable(index, learns_task)
            if learns_task and model.gate_enabled and self.settings.protect_new_adapter:
                gate.raise_logit(index, max(gate.logits[i].item() for i in active))
        (gate.unfreeze_alphas if learns_task else gate.freeze_alphas)(active)
        (gate.unfreeze_logits if learns_selection else gate.freeze_logits)(active)
        model.head.requires_grad_(True)
        self.make_optimizer()

    @contextmanager
    def _running_phase(self, phase: int, epochs: int):
        """Within the block, the template's epoch loop runs ``epochs`` epochs of ``phase``."""
        total_epochs = self.train_epochs
        self.phase, self.train_epochs = phase, epochs
        self._stop_training = False  # a stop request (early stopping) ends the phase it came in
        if phase == 2:  # tau is at tau_final from phase 2 on, even after a phase 1 cut short
            self.gate_step = max(self.gate_step, self.anneal_steps)
        self._configure_phase(phase)
        trigger_plugins(self, "before_training_phase")
        start = time.perf_counter()
        try:
            yield
            self._phase_seconds[str(phase)] = time.perf_counter() - start
            trigger_plugins(self, "after_training_phase")
        finally:
            self.phase, self.train_epochs = None, total_epochs

    def _selection_steps(self, plan: list[tuple[int, int]], steps_per_epoch: int) -> int:
        """Steps that learn selection: phase 1's, or ``phase1_fraction`` of a joint phase's."""
        epochs = dict(plan)
        if 1 in epochs:
            return epochs[1] * steps_per_epoch
        joint = epochs.get(JOINT_PHASE, 0) * steps_per_epoch
        return max(1, round(self.settings.phase1_fraction * joint)) if joint else 0

    def make_optimizer(self, **kwargs) -> None:
        """Refill the optimizer's groups with the parameters that train now; clear its state.

        Overrides Avalanche's version, which puts every model parameter (frozen ones too) into one
        group and cannot handle several groups.
        """
        trainable = self.model.parameter_groups()
        if self.gate_optimizer is not None:
            self.gate_optimizer.param_groups[0]["params"] = trainable.pop("logits")
            self.gate_optimizer.state.clear()
            trainable["logits"] = []
        for group in self.optimizer.param_groups:
            group["params"] = trainable[group["name"]]
        self.optimizer.state.clear()

    def optimizer_step(self) -> None:
        """The template's step, plus the logits' own optimizer."""
        super().optimizer_step()
        if self.gate_optimizer is not None:
            self.gate_optimizer.step()

    def _train_exp(self, experience, eval_streams=None, **kwargs) -> None:
        self.gate_step = 0
        self._phase_seconds = {}
        plan = self.phase_plan()
        self.anneal_steps = self._selection_steps(plan, len(self.dataloader))
        for phase, epochs in plan:
            with self._running_phase(phase, epochs):
                super()._train_exp(experience, eval_streams, **kwargs)

    def _after_training_exp(self, **kwargs) -> None:
        if self.pruning_plugin is None:
            self.model.consolidate()
        super()._after_training_exp(**kwargs)
        model: SDLoRAViT = self.model
        self.experience_log.append(
            {
                "experience": self.clock.train_exp_counter - 1,
                "adapters_added": model.num_adapters,
                "active_adapters": model.num_active_adapters,
                "trainable_parameters": model.trainable_parameter_count(),
                "phase_seconds": dict(self._phase_seconds),
                "train_seconds": sum(self._phase_seconds.values()),
                "peak_memory_mb": peak_memory_mb(self.device),
                "adapters": model.adapter_summary(),
            }
        )

    # ------------------------------------------------------------ step and loss

    def forward(self) -> Tensor:
        if self.is_training:
            model: SDLoRAViT = DistributedHelper.unwrap_model(self.model)  # DDP in a process group
            if not model.training:  # a plugin switched it to eval (Avalanche's LFL does)
                model.train()
            if self.gate_optimizer is not None:  # the template clears only the main optimizer
                self.gate_optimizer.zero_grad()
            if model.gate_enabled:
                model.gate.tau = self.temperature(self.gate_step)
                self.gate_step += 1
        return super().forward()

    def temperature(self, step: int) -> float:
        """The Gumbel temperature of training step ``step`` of the current experience.

        It anneals towards the model's own ``gate.tau_final`` (its evaluation temperature, which
        travels with its state dict); ``gumbel_tau_final`` only sets it when the strategy is built.
        """
        tau_final = DistributedHelper.unwrap_model(self.model).gate.tau_final
        tau_init = self.settings.gumbel_tau_init
        if self.settings.gumbel_schedule == "step":
            return annealed_temperature(step, tau_init, tau_final, self.settings.gumbel_anneal_rate)
        return phase_temperature(step, self.anneal_steps, tau_init, tau_final)

    def criterion(self) -> Tensor:
        """Cross-entropy (over the current classes in training, if so set) plus the phase's penalty."""
        if not self.is_training:
            return self._criterion(self.mb_output, self.mb_y)
        logits, targets = self.mb_output, self.mb_y
        if self.settings.loss_on == "current":
            logits, targets = self._restrict_to_current_classes(logits, targets)
        loss = self._criterion(logits, targets)
        model: SDLoRAViT = self.model
        if (
            model.gate_enabled
            and self.phase in (1, JOINT_PHASE)
            and self.settings.lambda_sparsity > 0
        ):
            loss = loss + self.settings.lambda_sparsity * SPARSITY[self.settings.sparsity](
                model.last_beta
            )
        if (
            model.gate_enabled
            and self.phase in (2, JOINT_PHASE)
            and self.settings.lambda_alpha > 0
            and model.gate.active_indices
        ):
            alphas = model.gate.alpha_vector()[model.gate.active_indices]
            loss = loss + self.settings.lambda_alpha * alphas.square().sum()
        return loss

    def _restrict_to_current_classes(
        self, logits: Tensor, targets: Tensor
    ) -> tuple[Tensor, Tensor]:
        """The columns of this experience's classes and of the batch's labels, targets renumbered."""
        current = torch.as_tensor(
            list(self.experience.classes_in_this_experience), device=targets.device
        )
        columns = torch.unique(torch.cat([current, targets]))
        renumber = torch.full((logits.shape[1],), -1, dtype=torch.long, device=targets.device)
        renumber[columns] = torch.arange(len(columns), device=targets.device)
        return logits[:, columns], renumber[targets]


def _check_growth(plugins: Sequence[BasePlugin], settings: SDLoRASettings) -> None:
    """``growth="phase1"`` decides at the end of phase 1, which a joint phase does not have."""
    if settings.two_phase:
        return
    for plugin in plugins:
        if isinstance(plugin, GumbelPruningPlugin) and plugin.pruner.growth == "phase1":
            raise ValueError(
                "growth 'phase1' decides at the end of phase 1, and two_phase=False trains one "
                "joint phase; use growth 'gain' or 'always' there"
            )


def _signature_with_settings(init: Any) -> inspect.Signature:
    """``init``'s signature with every setting of :class:`SDLoRASettings` as a keyword argument
    with its default: what ``help(SDLoRA)`` shows, and what Avalanche checks keyword arguments
    against (it refuses names that no ``__init__`` of the class declares)."""
    signature = inspect.signature(init)
    named = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
    rest = [p for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD]
    settings = [
        inspect.Parameter(spec.name, inspect.Parameter.KEYWORD_ONLY, default=spec.default)
        for spec in dataclasses.fields(SDLoRASettings)
    ]
    return signature.replace(parameters=[*named, *settings, *rest])


SDLoRA.__init__.__signature__ = _signature_with_settings(SDLoRA.__init__)
