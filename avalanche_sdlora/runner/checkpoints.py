"""Avalanche checkpoints of a run: written atomically, without loggers, and picklable.

``torch.optim`` deletes its submodule attributes (``torch.optim.sgd`` ...) after importing them, so
dill (which Avalanche's ``save_checkpoint`` uses) cannot find ``torch.optim.sgd.SGD`` by reference,
pickles the class by value and fails with a ``PicklingError``. :func:`save_checkpoint` puts the
attributes back just before it writes, so nothing changes on import.

The checkpoint is written through a Python file, so a full disk raises ``OSError`` (``ENOSPC``), not
torch's "unexpected pos" ``RuntimeError``; its provenance
(:func:`~avalanche_sdlora.runner.ownership.provenance`) goes into the same zip archive, as one more
record beside the pickle, before the file is renamed into place: a checkpoint and its provenance are
never apart.
"""

from __future__ import annotations

import json
import pkgutil
import sys
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import dill
import torch.optim
from avalanche import checkpointing
from avalanche.checkpointing import constructor_based_serialization
from avalanche.training.templates import SupervisedTemplate

from avalanche_sdlora.runner.outputs import atomic_write
from avalanche_sdlora.runner.ownership import PROVENANCE_RECORD

__all__ = ["checkpoint_by_constructor", "restore_torch_optim_submodules", "save_checkpoint"]


def checkpoint_by_constructor(cls: type, arguments: Callable[[Any], Mapping[str, Any]]) -> None:
    """Avalanche checkpoints store an object of ``cls`` as the keyword arguments that rebuild it,
    ``arguments(obj)``, not its contents (a dataset's images), as Avalanche does for its own
    datasets; equal ones load as one object."""

    def save(pickler: dill.Pickler, obj: Any) -> None:
        kwargs = dict(arguments(obj))
        constructor_based_serialization(pickler, obj, cls, deduplicate=True, kwargs=kwargs)

    dill.register(cls)(save)


def restore_torch_optim_submodules() -> None:
    """Put back ``torch.optim.<name>`` for every already imported ``torch.optim`` submodule."""
    for info in pkgutil.iter_modules(torch.optim.__path__):
        module = sys.modules.get(f"torch.optim.{info.name}")
        if module is not None and not hasattr(torch.optim, info.name):
            setattr(torch.optim, info.name, module)


def save_checkpoint(
    strategy: SupervisedTemplate, path: Path, provenance: Mapping[str, Any] | None = None
) -> None:
    """Avalanche's checkpoint of ``strategy`` at ``path``, written atomically, with ``provenance``
    (when given) in its archive and without the loggers: unpickled, they would write to the run
    folder from every rank that resumes; each resumed run keeps the loggers it was built with."""

    def write(target: Path) -> None:
        with open(target, "wb") as file:
            checkpointing.save_checkpoint(strategy, file)
        if provenance is not None:
            with zipfile.ZipFile(target, "a") as archive:  # torch reads records in its folder only
                folder = archive.namelist()[0].partition("/")[0]
                archive.writestr(f"{folder}/{PROVENANCE_RECORD}", json.dumps(provenance))

    restore_torch_optim_submodules()
    loggers, strategy.evaluator.loggers = strategy.evaluator.loggers, []
    try:
        atomic_write(path, write)
    finally:
        strategy.evaluator.loggers = loggers
