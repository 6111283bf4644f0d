"""Shared fixtures: small random-init ViTs (no downloads) and seeded RNGs."""

from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer


def make_small_vit(embed_dim: int = 32, depth: int = 2, img_size: int = 16) -> VisionTransformer:
    """A random-init ViT small enough for many CPU steps: 16 px images, 4 px patches."""
    return VisionTransformer(
        img_size=img_size,
        patch_size=4,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=2,
        mlp_ratio=2.0,
        num_classes=0,
        global_pool="avg",
    )


def make_blind_vit() -> VisionTransformer:
    """A small ViT whose blocks are the identity: the value slice of every ``qkv`` and every MLP
    output are zero, so its features are the mean patch's token and only an adapter on the values
    sees more."""
    vit = make_small_vit()
    with torch.no_grad():
        for block in vit.blocks:
            width = block.attn.qkv.out_features // 3
            block.attn.qkv.weight[2 * width :].zero_()
            block.attn.qkv.bias[2 * width :].zero_()
            block.mlp.fc2.weight.zero_()
            block.mlp.fc2.bias.zero_()
    return vit


# The test models are tiny: one thread is as fast, and it does not stall when the machine is shared
# (two spinning OpenMP threads slow down many times when another process takes a core).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


@pytest.fixture
def small_vit() -> VisionTransformer:
    return make_small_vit()
