"""The method's settings, each written once: type, default, help and check.

:class:`SDLoRASettings` holds the strategy's training settings, as peft's ``LoraConfig`` holds
LoRA's. :class:`~avalanche_sdlora.strategy.SDLoRA` takes them as keyword arguments (or a ready
``SDLoRASettings``), and the runner derives its ``sdlora`` config section, ``--help`` and the keys it
hands the strategy from the same fields, so a default or a check can never differ between them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "OPTIMIZERS",
    "SDLoRASettings",
    "SettingsError",
    "setting",
]

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
}
"""The optimizers a setting can name; ``torch.optim`` classes built over parameter groups."""

OptimizerFactory = Callable[..., torch.optim.Optimizer]
"""Builds an optimizer from parameter groups (a list of dicts with ``params``, ``lr``, ...)."""

Check = Callable[[Any], "str | None"]


class SettingsError(ValueError):
    """Every invalid setting, one per line, each named."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid settings:\n" + "\n".join(f"  - {p}" for p in problems))


def setting(
    default: Any, help: str, *, check: Check | None = None, choices: tuple | None = None
) -> Any:
    """A dataclass field carrying its help text, allowed ``choices`` and ``check`` (which returns
    what is wrong with a value, or ``None``)."""
    return field(default=default, metadata={"help": help, "check": check, "choices": choices})


def positive(value: float) -> str | None:
    return None if value > 0 else "must be > 0"


def at_least(minimum: float) -> Check:
    return lambda value: None if value >= minimum else f"must be >= {minimum}"


def in_open_unit(value: float) -> str | None:
    return None if 0 < value < 1 else "must be in (0, 1)"


def momentum(value: float) -> str | None:
    return None if 0 <= value < 1 else "must be in [0, 1)"


def value_problem(
    value: Any, choices: Sequence | None = None, check: Check | None = None
) -> str | None:
    """What is wrong with a value of the right type: not finite, not among ``choices`` (each item
    of a list is; a callable, such as an optimizer factory, is taken as is), or what ``check``
    says. Shared by these settings and the runner's config."""
    if isinstance(value, float) and not math.isfinite(value):
        return "must be a finite number"
    if choices is not None and not callable(value):
        bad = [v for v in (value if isinstance(value, list) else [value]) if v not in choices]
        if bad:
            return f"{bad[0]!r} is not allowed; choose from {list(choices)}"
    return check(value) if check else None


@dataclass(frozen=True)
class SDLoRASettings:
    """The training settings of :class:`~avalanche_sdlora.strategy.SDLoRA`.

    Defaults are the seed's values except where docs/METHOD.md says why not. Building one checks
    every value and every constraint between values, and raises :class:`SettingsError` naming all
    problems at once.
    """

    lr: float = setting(8e-3, "learning rate of the new adapter's A and B", check=positive)
    alpha_lr: float = setting(0.04, "learning rate of the magnitudes (alphas)", check=positive)
    gate_lr: float = setting(0.05, "learning rate of the gate logits", check=positive)
    head_lr: float | None = setting(None, "learning rate of the head (null: lr)", check=positive)
    optimizer: str | OptimizerFactory = setting(  # noqa: RUF009 (a field, not a shared default)
        "sgd",
        "optimizer of adapters, alphas and head: sgd (with momentum), adam, adamw, or (in Python) "
        "a callable taking parameter groups",
        choices=tuple(OPTIMIZERS),
    )
    gate_optimizer: str | None = setting(
        "adam",
        "optimizer of the gate logits (null: the main optimizer, with gate_lr)",
        choices=tuple(OPTIMIZERS),
    )
    momentum: float = setting(0.9, "SGD momentum", check=momentum)
    weight_decay: float = setting(
        0.0, "weight decay of adapters and head (alphas have lambda_alpha)", check=at_least(0.0)
    )
    phase1_fraction: float = setting(
        0.6,
        "share of the epochs in phase 1: floor(f * epochs), at least 1 with 2 epochs or more",
        check=in_open_unit,
    )
    gumbel_schedule: str = setting(
        "phase",
        "phase: tau reaches tau_final at the end of phase 1 (any step count); step: the seed's "
        "per-step decay",
        choices=("phase", "step"),
    )
    gumbel_tau_init: float = setting(5.0, "initial Gumbel temperature", check=positive)
    gumbel_tau_final: float = setting(
        0.5,
        "final (and evaluation) Gumbel temperature; written to the model's gate, which then holds it",
        check=positive,
    )
    gumbel_anneal_rate: float = setting(
        0.999,
        "per-step temperature decay (gumbel_schedule step)",
        check=lambda v: None if 0 < v <= 1 else "must be in (0, 1]",
    )
    lambda_sparsity: float = setting(0.1, "phase-1 sparsity weight", check=at_least(0.0))
    sparsity: str = setting(
        "gini",
        "sparsity regulariser of beta: gini (1 - sum beta^2) or entropy",
        choices=("gini", "entropy"),
    )
    lambda_alpha: float = setting(
        1e-4,
        "weight of sum alpha^2 in phase 2, with the gate only (plain SD-LoRA, RR and KD have none)",
        check=at_least(0.0),
    )
    loss_on: str = setting(
        "current",
        "training cross-entropy over the current experience's classes or all seen classes",
        choices=("current", "seen"),
    )
    pruning: bool = setting(
        True, "prune adapters the gate does not use (a default GumbelPruningPlugin)"
    )
    two_phase: bool = setting(True, "selection then new task (false: one joint phase)")
    protect_new_adapter: bool = setting(
        True, "raise the new adapter's logit to the highest one when it starts training"
    )

    def __post_init__(self) -> None:
        problems = []
        for spec in dataclasses.fields(self):
            value = getattr(self, spec.name)
            if value is None:  # a field that may not be None never defaults to it
                continue
            problem = value_problem(value, spec.metadata["choices"], spec.metadata["check"])
            if problem is not None:
                problems.append(f"{spec.name}: {problem}, got {value!r}")
        if not problems and self.gumbel_tau_init < self.gumbel_tau_final:
            problems.append(
                f"gumbel_tau_init: must be >= gumbel_tau_final ({self.gumbel_tau_final}), "
                f"got {self.gumbel_tau_init}"
            )
        if problems:
            raise SettingsError(problems)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The settings' names, in declaration order."""
        return tuple(spec.name for spec in dataclasses.fields(cls))

    def learning_rates(self) -> dict[str, float]:
        """The learning rate of each parameter role."""
        return {
            "adapters": self.lr,
            "alphas": self.alpha_lr,
            "logits": self.gate_lr,
            "head": self.lr if self.head_lr is None else self.head_lr,
        }
