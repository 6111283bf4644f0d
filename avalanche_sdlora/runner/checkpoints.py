"""Avalanche checkpoints of a run: written atomically, without loggers, and picklable.

``torch.optim`` deletes its submodule attributes (``torch.optim.sgd`` ...) after importing them, so
dill (which Avalanche's ``save_checkpoint`` uses) cannot find ``torch.optim.sgd.SGD`` by reference,
pickles the class by value and fails with a ``PicklingError``. :func:`save_checkpoint` puts the
attributes back just before it writes, so nothing changes on import.
"""

from __future__ import annotations

import pkgutil
import sys
from pathlib import Path

import torch.optim
from avalanche import checkpointing
from avalanche.training.templates import SupervisedTemplate

from avalanche_sdlora.runner.outputs import atomic_write

__all__ = ["restore_torch_optim_submodules", "save_checkpoint"]


def restore_torch_optim_submodules() -> None:
    """Put back ``torch.optim.<name>`` for every already imported ``torch.optim`` submodule."""
    for info in pkgutil.iter_modules(torch.optim.__path__):
        module = sys.modules.get(f"torch.optim.{info.name}")
        if module is not None and not hasattr(torch.optim, info.name):
            setattr(torch.optim, info.name, module)


def save_checkpoint(strategy: SupervisedTemplate, path: Path) -> None:
    """Avalanche's checkpoint of ``strategy`` at ``path``, written atomically, without the loggers:
    unpickled, they would write to the run folder from every rank that resumes; each resumed run
    keeps the loggers it was built with."""
    restore_torch_optim_submodules()
    loggers, strategy.evaluator.loggers = strategy.evaluator.loggers, []
    try:
        atomic_write(path, lambda target: checkpointing.save_checkpoint(strategy, target))
    finally:
        strategy.evaluator.loggers = loggers
