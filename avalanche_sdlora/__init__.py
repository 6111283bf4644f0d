"""SD-LoRA with a Gumbel-Sparsemax adapter gate, as an Avalanche continual-learning strategy."""

from avalanche_sdlora import _compat  # noqa: F401  (fixes checkpoint pickling on import)
from avalanche_sdlora.compatibility import IncompatiblePluginError
from avalanche_sdlora.gate import GumbelGate
from avalanche_sdlora.model import SDLoRAViT
from avalanche_sdlora.plugins import GumbelPruningPlugin, KnowledgeDistillationPlugin
from avalanche_sdlora.strategy import SDLoRA

__all__ = [
    "GumbelGate",
    "GumbelPruningPlugin",
    "IncompatiblePluginError",
    "KnowledgeDistillationPlugin",
    "SDLoRA",
    "SDLoRAViT",
]
