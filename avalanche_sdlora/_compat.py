"""Compatibility fixes for the avalanche-lib 0.6.0 / torch 2.x stack, applied on import.

qpsolvers, which Avalanche imports for GEM, warns "no QP solver found" on every import; nothing here
solves a QP, so the warning is silenced.

``torch.optim`` deletes its submodule attributes (``torch.optim.sgd`` ...) after importing them, so dill
(which Avalanche's ``save_checkpoint`` uses) cannot find ``torch.optim.sgd.SGD`` by reference, pickles
the class by value and fails with a ``PicklingError``. Restoring the attributes lets it pickle the
optimizer like any other object.
"""

from __future__ import annotations

import pkgutil
import sys
import warnings

import torch.optim

warnings.filterwarnings("ignore", message="no QP solver found", category=UserWarning)


def restore_torch_optim_submodules() -> None:
    """Put back ``torch.optim.<name>`` for every already imported ``torch.optim`` submodule."""
    for info in pkgutil.iter_modules(torch.optim.__path__):
        module = sys.modules.get(f"torch.optim.{info.name}")
        if module is not None and not hasattr(torch.optim, info.name):
            setattr(torch.optim, info.name, module)


restore_torch_optim_submodules()
