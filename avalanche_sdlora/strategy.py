"""The SD-LoRA strategy: two training phases per experience on an :class:`SDLoRAViT`.

Phase 1 (learn selection) trains the gate logits and the head with every alpha and every adapter frozen
(the new one at its zero init); loss CE + ``lambda_sparsity * Omega(beta)``. Phase 2 (learn the new task)
trains the new adapter, every active alpha and the head with the logits frozen; loss CE +
``lambda_alpha * sum_i alpha_i^2``. With the gate off there is one phase (plain SD-LoRA); with
``two_phase=False`` one joint phase trains everything at once (the seed's identifiability ablation).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager

import torch
from avalanche.core import BasePlugin
from avalanche.distributed import DistributedHelper
from avalanche.training.plugins import EarlyStoppingPlugin, EvaluationPlugin, RWalkPlugin
from avalanche.training.plugins.evaluation import default_evaluator
from avalanche.training.templates import SupervisedTemplate
from torch import Tensor, nn

from avalanche_sdlora.compatibility import check_plugins
from avalanche_sdlora.gate import (
    annealed_temperature,
    entropy_sparsity,
    gini_sparsity,
    phase_temperature,
)
from avalanche_sdlora.model import SDLoRAViT
from avalanche_sdlora.plugins import GumbelPruningPlugin
from avalanche_sdlora.report import peak_memory_mb

__all__ = ["JOINT_PHASE", "SDLoRA"]

JOINT_PHASE = 0
"""``strategy.phase`` of the single phase used with the gate off or ``two_phase=False``."""

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
}
SPARSITY = {"gini": gini_sparsity, "entropy": entropy_sparsity}
LOSS_ON = ("current", "seen")
GUMBEL_SCHEDULES = ("phase", "step")
PARAMETER_ROLES = ("adapters", "alphas", "logits", "head")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _choice(name: str, value: str, allowed: Sequence[str]) -> str:
    _require(value in allowed, f"{name} must be one of {list(allowed)}, got {value!r}")
    return value


class SDLoRA(SupervisedTemplate):
    """SD-LoRA with a Gumbel-Sparsemax adapter gate, used like any Avalanche strategy.

    The template's arguments keep their meaning (``eval_mb_size`` defaults to ``train_mb_size``).
    The method's own settings default to the seed's values, except where docs/METHOD.md says why not:

    Args:
        lr: learning rate of the new adapter's A and B (and of the head unless ``head_lr``).
        alpha_lr: learning rate of the magnitudes.
        gate_lr: learning rate of the gate logits.
        head_lr: learning rate of the head; ``None`` uses ``lr``.
        optimizer: ``"sgd"`` (with ``momentum``), ``"adam"`` or ``"adamw"``; ``weight_decay`` applies
            to the adapters and the head (alphas have ``lambda_alpha``, logits none).
        gate_optimizer: ``None`` trains the logits in ``optimizer`` (their own group, ``gate_lr``);
            ``"sgd"``, ``"adam"`` or ``"adamw"`` gives them an optimizer of their own
            (``strategy.gate_optimizer``), stepped with the main one.
        phase1_fraction: share of ``train_epochs`` spent in phase 1: ``floor(f * epochs)``, at least 1
            when ``train_epochs >= 2``.
        gumbel_schedule: ``"phase"``: the temperature anneals geometrically from ``tau_init`` to
            ``tau_final`` over phase 1 (in a joint phase: over ``phase1_fraction`` of its steps) and
            stays at ``tau_final`` after, whatever the number of steps; ``"step"``: the seed's
            ``tau_final + (tau_init - tau_final) * gumbel_anneal_rate ** step`` over both phases.
            Either restarts each experience.
        gumbel_tau_init, gumbel_tau_final, gumbel_anneal_rate: the schedule's settings.
            ``gumbel_tau_final`` is also written to the model's gate as its evaluation temperature.
        lambda_sparsity, sparsity: weight and form (``"gini"`` or ``"entropy"``) of the phase-1
            sparsity regulariser on beta.
        lambda_alpha: weight of the phase-2 ``sum_i alpha_i^2``.
        loss_on: ``"current"``: training cross-entropy over the current experience's classes (plus
            the classes of any replayed sample in the batch); ``"seen"``: over every class seen.
        pruning: add a default :class:`GumbelPruningPlugin` unless ``plugins`` holds one.
        two_phase: ``False`` trains logits, alphas and the new adapter jointly in one phase.
        protect_new_adapter: when the new adapter starts training (phase 2, or the joint phase), its
            logit is raised to the highest active logit, so it is selected at least as often as the
            best old adapter and cannot be starved by a phase 1 that judged it at its zero init.

    One optimizer lives as long as the strategy (``strategy.optimizer``), with four parameter groups
    (adapters, alphas, logits, head); each phase refills the groups with its trainable tensors and
    clears the optimizer state, i.e. a fresh optimizer per phase. A learning-rate scheduler built on
    ``strategy.optimizer`` therefore follows whichever phase runs: add it after construction,
    ``strategy.plugins.append(LRSchedulerPlugin(StepLR(strategy.optimizer, ...)))``; its epochs count
    across both phases and restart each experience. An ``EarlyStoppingPlugin`` acts per phase: stopping
    ends the running phase (phase 2 still trains the new adapter) and its patience restarts with each.

    Plugins that cannot train with SD-LoRA (README, *Avalanche plugins*) raise
    :class:`~avalanche_sdlora.compatibility.IncompatiblePluginError` here, naming the reason.
    """

    def __init__(
        self,
        *,
        model: SDLoRAViT,
        criterion: nn.Module | None = None,
        train_mb_size: int = 128,
        train_epochs: int = 20,
        eval_mb_size: int | None = None,
        device: str | torch.device = "cpu",
        plugins: Sequence[BasePlugin] | None = None,
        evaluator: EvaluationPlugin | Callable[[], EvaluationPlugin] = default_evaluator,
        eval_every: int = -1,
        peval_mode: str = "epoch",
        lr: float = 8e-3,
        alpha_lr: float = 0.04,
        gate_lr: float = 0.05,
        head_lr: float | None = None,
        optimizer: str = "sgd",
        gate_optimizer: str | None = "adam",
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        phase1_fraction: float = 0.6,
        gumbel_schedule: str = "phase",
        gumbel_tau_init: float = 5.0,
        gumbel_tau_final: float = 0.5,
        gumbel_anneal_rate: float = 0.999,
        lambda_sparsity: float = 0.1,
        sparsity: str = "gini",
        lambda_alpha: float = 1e-4,
        loss_on: str = "current",
        pruning: bool = True,
        two_phase: bool = True,
        protect_new_adapter: bool = True,
    ):
        if not isinstance(model, SDLoRAViT):
            raise TypeError(f"SDLoRA trains an SDLoRAViT, got {type(model).__name__}")
        for name, value in (("train_mb_size", train_mb_size), ("train_epochs", train_epochs)):
            _require(
                isinstance(value, int) and value >= 1, f"{name} must be an int >= 1, got {value!r}"
            )
        _require(
            eval_mb_size is None or (isinstance(eval_mb_size, int) and eval_mb_size >= 1),
            f"eval_mb_size must be an int >= 1 or None, got {eval_mb_size!r}",
        )
        for name, value in (("lr", lr), ("alpha_lr", alpha_lr), ("gate_lr", gate_lr)):
            _require(value > 0, f"{name} must be > 0, got {value}")
        _require(head_lr is None or head_lr > 0, f"head_lr must be > 0 or None, got {head_lr}")
        _choice("optimizer", optimizer, list(OPTIMIZERS))
        if gate_optimizer is not None:
            _choice("gate_optimizer", gate_optimizer, list(OPTIMIZERS))
        _choice("gumbel_schedule", gumbel_schedule, GUMBEL_SCHEDULES)
        _require(0 <= momentum < 1, f"momentum must be in [0, 1), got {momentum}")
        _require(weight_decay >= 0, f"weight_decay must be >= 0, got {weight_decay}")
        _require(
            0 < phase1_fraction < 1, f"phase1_fraction must be in (0, 1), got {phase1_fraction}"
        )
        _require(gumbel_tau_final > 0, f"gumbel_tau_final must be > 0, got {gumbel_tau_final}")
        _require(
            gumbel_tau_init >= gumbel_tau_final,
            f"gumbel_tau_init ({gumbel_tau_init}) must be >= gumbel_tau_final ({gumbel_tau_final})",
        )
        _require(
            0 < gumbel_anneal_rate <= 1,
            f"gumbel_anneal_rate must be in (0, 1], got {gumbel_anneal_rate}",
        )
        _require(lambda_sparsity >= 0, f"lambda_sparsity must be >= 0, got {lambda_sparsity}")
        _require(lambda_alpha >= 0, f"lambda_alpha must be >= 0, got {lambda_alpha}")
        _choice("sparsity", sparsity, list(SPARSITY))
        _choice("loss_on", loss_on, LOSS_ON)

        plugins = list(plugins or [])
        check_plugins(plugins, model)
        if pruning and not any(isinstance(p, GumbelPruningPlugin) for p in plugins):
            plugins.insert(0, GumbelPruningPlugin())
        learning_rates = {
            "adapters": lr,
            "alphas": alpha_lr,
            "logits": gate_lr,
            "head": lr if head_lr is None else head_lr,
        }
        decay = {"adapters": weight_decay, "alphas": 0.0, "logits": 0.0, "head": weight_decay}
        extra = {"momentum": momentum} if optimizer == "sgd" else {}
        groups = [
            {"params": [], "name": role, "lr": learning_rates[role], "weight_decay": decay[role]}
            for role in PARAMETER_ROLES
        ]
        super().__init__(
            model=model,
            optimizer=OPTIMIZERS[optimizer](groups, lr=lr, **extra),
            criterion=nn.CrossEntropyLoss() if criterion is None else criterion,
            train_mb_size=train_mb_size,
            train_epochs=train_epochs,
            eval_mb_size=eval_mb_size,
            device=device,
            plugins=plugins,
            evaluator=evaluator,
            eval_every=eval_every,
            peval_mode=peval_mode,
        )
        model.gate.tau_final = gumbel_tau_final
        self.gate_optimizer: torch.optim.Optimizer | None = None
        """The logits' own optimizer (``gate_optimizer``), or ``None`` when they train in ``optimizer``."""
        if gate_optimizer is not None:
            gate_group = {"params": [], "name": "logits", "lr": gate_lr, "weight_decay": 0.0}
            gate_extra = {"momentum": momentum} if gate_optimizer == "sgd" else {}
            self.gate_optimizer = OPTIMIZERS[gate_optimizer]([gate_group], lr=gate_lr, **gate_extra)
        self.gumbel_schedule = gumbel_schedule
        self.protect_new_adapter = protect_new_adapter
        self.phase1_fraction = phase1_fraction
        self.gumbel_tau_init = gumbel_tau_init
        self.gumbel_tau_final = gumbel_tau_final
        self.gumbel_anneal_rate = gumbel_anneal_rate
        self.lambda_sparsity = lambda_sparsity
        self.sparsity = sparsity
        self.lambda_alpha = lambda_alpha
        self.loss_on = loss_on
        self.two_phase = two_phase
        self.phase: int | None = None
        """1 (selection), 2 (new task) or ``JOINT_PHASE`` while training; ``None`` otherwise."""
        self.gate_step = 0
        """Training steps taken in the current experience: the temperature schedule's clock."""
        self.anneal_steps = 0
        """Steps of the current experience over which ``gumbel_schedule="phase"`` anneals."""
        self.experience_log: list[dict] = []
        """One record per trained experience: adapters, parameters, wall time, peak memory."""
        self._phase_seconds: dict[str, float] = {}

    @property
    def pruning_plugin(self) -> GumbelPruningPlugin | None:
        return next((p for p in self.plugins if isinstance(p, GumbelPruningPlugin)), None)

    # ------------------------------------------------------------------ phases

    def phase_plan(self) -> list[tuple[int, int]]:
        """``(phase, epochs)`` of the current settings, phases without epochs left out."""
        if not (self.model.gate_enabled and self.two_phase):
            return [(JOINT_PHASE, self.train_epochs)]
        first = math.floor(self.phase1_fraction * self.train_epochs)
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
            if learns_task and model.gate_enabled and self.protect_new_adapter:
                gate.raise_logit(index, max(gate.logits[i].item() for i in active))
        (gate.unfreeze_alphas if learns_task else gate.freeze_alphas)(active)
        (gate.unfreeze_logits if learns_selection else gate.freeze_logits)(active)
        model.head.requires_grad_(True)
        self.make_optimizer()
        for plugin in self.plugins:
            if isinstance(plugin, EarlyStoppingPlugin):
                plugin.before_training_exp(self)  # patience restarts with each phase

    @contextmanager
    def _running_phase(self, phase: int, epochs: int):
        """Within the block, the template's epoch loop runs ``epochs`` epochs of ``phase``."""
        total_epochs = self.train_epochs
        self.phase, self.train_epochs = phase, epochs
        self._configure_phase(phase)
        start = time.perf_counter()
        try:
            yield
        finally:
            self._phase_seconds[str(phase)] = time.perf_counter() - start
            self.phase, self.train_epochs = None, total_epochs

    def _selection_steps(self, plan: list[tuple[int, int]], steps_per_epoch: int) -> int:
        """Steps that learn selection: phase 1's, or ``phase1_fraction`` of a joint phase's."""
        epochs = dict(plan)
        if 1 in epochs:
            return epochs[1] * steps_per_epoch
        joint = epochs.get(JOINT_PHASE, 0) * steps_per_epoch
        return max(1, round(self.phase1_fraction * joint)) if joint else 0

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
        for plugin in self.plugins:
            if isinstance(plugin, RWalkPlugin):  # its snapshot predates this experience's adapter
                plugin.before_training(self)
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
        """The Gumbel temperature of training step ``step`` of the current experience."""
        if self.gumbel_schedule == "step":
            return annealed_temperature(
                step, self.gumbel_tau_init, self.gumbel_tau_final, self.gumbel_anneal_rate
            )
        return phase_temperature(
            step, self.anneal_steps, self.gumbel_tau_init, self.gumbel_tau_final
        )

    def criterion(self) -> Tensor:
        """Cross-entropy (over the current classes in training, if so set) plus the phase's penalty."""
        if not self.is_training:
            return self._criterion(self.mb_output, self.mb_y)
        logits, targets = self.mb_output, self.mb_y
        if self.loss_on == "current":
            logits, targets = self._restrict_to_current_classes(logits, targets)
        loss = self._criterion(logits, targets)
        model: SDLoRAViT = self.model
        if model.gate_enabled and self.phase in (1, JOINT_PHASE) and self.lambda_sparsity > 0:
            loss = loss + self.lambda_sparsity * SPARSITY[self.sparsity](model.last_beta)
        if self.phase in (2, JOINT_PHASE) and self.lambda_alpha > 0 and model.gate.active_indices:
            alphas = model.gate.alpha_vector()[model.gate.active_indices]
            loss = loss + self.lambda_alpha * alphas.square().sum()
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
