"""Which plugins cannot train with SD-LoRA, and why: ``SDLoRA`` refuses them when built.

Every plugin Avalanche 0.6.0 exports was tried on two tiny experiences (docs/plugins.md);
those below fail or would silently do something else. The check is made once, on the plugins given
to the constructor.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence

from avalanche.core import BasePlugin
from avalanche.training.plugins import (
    BiCPlugin,
    CoPEPlugin,
    CurrentDataFeCAMUpdate,
    CurrentDataNCMUpdate,
    CWRStarPlugin,
    EarlyStoppingPlugin,
    FeCAMOracle,
    FromScratchTrainingPlugin,
    GEMPlugin,
    GenerativeReplayPlugin,
    MemoryFeCAMUpdate,
    MemoryNCMUpdate,
    NCMOracle,
    RARPlugin,
    RWalkPlugin,
)

from avalanche_sdlora.model import SDLoRAViT
from avalanche_sdlora.plugins import KnowledgeDistillationPlugin, SDLoRAPlugin

__all__ = ["PHASE_RESTARTS", "IncompatiblePluginError", "PhaseRestarts", "check_plugins"]


class IncompatiblePluginError(ValueError):
    """A plugin that cannot train with SD-LoRA, named with the reason."""


_CLASS_MEAN_UPDATES = (
    "updates the class means of an NCMClassifier/FeCAMClassifier held as model.eval_classifier; "
    "SDLoRAViT classifies with its linear head and has none"
)

REFUSED: dict[type, str] = {
    CWRStarPlugin: "it freezes every layer but the head and consolidates per-class head weights, "
    "but each SD-LoRA phase sets what trains (adapters, alphas, logits, head) and would silently "
    "undo the freezing",
    RARPlugin: "it traces the model with torch.fx, and the gate's Gumbel-Sparsemax has "
    "data-dependent control flow that torch.fx cannot trace",
    CoPEPlugin: "its pseudo-prototypical loss needs the model to output a fixed-size embedding "
    "(p_size); SDLoRAViT outputs the logits of a head that grows with the classes",
    BiCPlugin: "its bias-correction stage builds MultiStepLR(verbose=...), which this torch "
    "version no longer accepts (it fails with any strategy), and its bias layers wrap the model's "
    "output, which the SD-LoRA phases and pruning do not know about",
    CurrentDataNCMUpdate: _CLASS_MEAN_UPDATES,
    MemoryNCMUpdate: _CLASS_MEAN_UPDATES,
    NCMOracle: _CLASS_MEAN_UPDATES,
    CurrentDataFeCAMUpdate: _CLASS_MEAN_UPDATES,
    MemoryFeCAMUpdate: _CLASS_MEAN_UPDATES,
    FeCAMOracle: _CLASS_MEAN_UPDATES,
}
"""Plugins that never compose, with the reason."""


def _from_scratch_problem(plugin: FromScratchTrainingPlugin, model: SDLoRAViT) -> str | None:
    if not plugin.reset_optimizer:
        return None
    return (
        "its reset_optimizer=True calls Avalanche's reset_optimizer, which supports one parameter "
        "group, and SDLoRA's optimizer has four; pass reset_optimizer=False: SDLoRA refills and "
        "clears its optimizer at the start of every phase, after the plugin re-initialises the model"
    )


def _gem_problem(plugin: GEMPlugin, model: SDLoRAViT) -> str | None:
    if importlib.util.find_spec("quadprog") is not None:
        return None
    return (
        "it solves its quadratic programme with qpsolvers' 'quadprog' solver, which is not "
        "installed (pip install quadprog; it is GPL-licensed, so not a dependency of this package)"
    )


def _generative_replay_problem(plugin: GenerativeReplayPlugin, model: SDLoRAViT) -> str | None:
    if plugin.generator_strategy is not None:
        return None
    return (
        "without generator_strategy it asks the trained model to generate samples "
        "(model.generate), and SDLoRAViT is a classifier; pass a generator strategy, e.g. "
        "VAETraining, and add TrainGeneratorAfterExpPlugin to train it after each experience"
    )


def _knowledge_distillation_problem(
    plugin: KnowledgeDistillationPlugin, model: SDLoRAViT
) -> str | None:
    if not model.gate_enabled:
        return None
    return (
        "SD-LoRA-KD is defined for plain SD-LoRA: build the SDLoRAViT with gate=False (with the "
        "gate on, beta would scale the absorbed contribution)"
    )


CONDITIONS: dict[type, Callable[[BasePlugin, SDLoRAViT], str | None]] = {
    FromScratchTrainingPlugin: _from_scratch_problem,
    GEMPlugin: _gem_problem,
    GenerativeReplayPlugin: _generative_replay_problem,
    KnowledgeDistillationPlugin: _knowledge_distillation_problem,
}
"""Plugins that compose only with some settings, installed packages or models: what is wrong, or
``None``."""


def check_plugins(plugins: Sequence[BasePlugin], model: SDLoRAViT) -> None:
    """Raise :class:`IncompatiblePluginError` naming every plugin that cannot train ``model``."""
    problems = []
    for plugin in plugins:
        name = type(plugin).__name__
        for kind, reason in REFUSED.items():
            if isinstance(plugin, kind):
                problems.append(f"{name}: {reason}")
        for kind, condition in CONDITIONS.items():
            if isinstance(plugin, kind) and (reason := condition(plugin, model)) is not None:
                problems.append(f"{name}: {reason}")
    if problems:
        raise IncompatiblePluginError(
            "SDLoRA cannot train with these plugins:\n" + "\n".join(f"  - {p}" for p in problems)
        )


def _restart_early_stopping(plugin: EarlyStoppingPlugin, strategy) -> None:
    plugin.before_training_exp(strategy)  # patience restarts with each phase


def _refresh_rwalk_snapshot(plugin: RWalkPlugin, strategy) -> None:
    if strategy.clock.train_exp_epochs == 0:  # the first phase: the snapshot misses the new adapter
        plugin.before_training(strategy)


PHASE_RESTARTS: dict[type, Callable[[BasePlugin, object], None]] = {
    EarlyStoppingPlugin: _restart_early_stopping,
    RWalkPlugin: _refresh_rwalk_snapshot,
}
"""Avalanche plugins whose per-experience state must follow SD-LoRA's phases: what to do when a
phase starts."""


class PhaseRestarts(SDLoRAPlugin, supports_distributed=True):
    """Hands SD-LoRA's ``before_training_phase`` event to the Avalanche plugins that know only
    experiences (:data:`PHASE_RESTARTS`): EarlyStopping's patience restarts with each phase, and
    RWalk's parameter snapshot is taken again once the experience's adapter exists."""

    def __init__(self, plugins: Sequence[BasePlugin]):
        super().__init__()
        self.targets = [
            (plugin, restart)
            for plugin in plugins
            for kind, restart in PHASE_RESTARTS.items()
            if isinstance(plugin, kind)
        ]

    def before_training_phase(self, strategy, **kwargs) -> None:
        for plugin, restart in self.targets:
            restart(plugin, strategy)
