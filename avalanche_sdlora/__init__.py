"""SD-LoRA with a Gumbel-Sparsemax adapter gate, as an Avalanche continual-learning strategy.

The method lives in this package's modules; the experiment runner (config, CLI, data streams,
baselines, outputs) in :mod:`avalanche_sdlora.runner`, which the method never imports. Importing
either changes no global state.
"""

import warnings

with warnings.catch_warnings():
    # qpsolvers, which Avalanche imports for GEM, warns "no QP solver found"; nothing here solves a QP
    warnings.filterwarnings("ignore", message="no QP solver found", category=UserWarning)
    from avalanche_sdlora.batch_transforms import BatchTransforms
    from avalanche_sdlora.compatibility import IncompatiblePluginError
    from avalanche_sdlora.gate import GumbelGate
    from avalanche_sdlora.model import SDLoRAViT
    from avalanche_sdlora.plugins import (
        BatchTransformPlugin,
        GumbelPruningPlugin,
        KnowledgeDistillationPlugin,
        SDLoRAPlugin,
        TimeSplitPlugin,
    )
    from avalanche_sdlora.strategy import SDLoRA

__all__ = [
    "BatchTransformPlugin",
    "BatchTransforms",
    "GumbelGate",
    "GumbelPruningPlugin",
    "IncompatiblePluginError",
    "KnowledgeDistillationPlugin",
    "SDLoRA",
    "SDLoRAPlugin",
    "SDLoRAViT",
    "TimeSplitPlugin",
]
