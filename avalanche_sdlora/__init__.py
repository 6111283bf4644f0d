"""SD-LoRA with a Gumbel-Sparsemax adapter gate, as an Avalanche continual-learning strategy."""

from avalanche_sdlora.gate import GumbelGate
from avalanche_sdlora.model import SDLoRAViT

__all__ = ["GumbelGate", "SDLoRAViT"]
