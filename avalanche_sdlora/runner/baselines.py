"""Avalanche's built-in strategies as baselines, on the same pretrained backbone as SD-LoRA.

Naive (full fine-tuning), EWC, LwF, Replay and Cumulative train the whole ViT with a linear head that
grows with the classes seen (Avalanche's ``IncrementalClassifier``); L2P is Avalanche's
``LearningToPrompt`` through :mod:`avalanche_sdlora.runner.l2p`; SimpleCIL and RanPAC keep the
backbone frozen and fit their classifiers in closed form (:mod:`avalanche_sdlora.runner.frozen`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from avalanche.models import IncrementalClassifier
from avalanche.training import LwF, Naive, Replay
from avalanche.training.supervised import Cumulative
from avalanche.training.templates import SupervisedTemplate
from torch import Tensor, nn

from avalanche_sdlora.runner.ewc import StableEWCPlugin, importance_cap
from avalanche_sdlora.settings import OPTIMIZERS

__all__ = ["FineTunedViT", "make_baseline", "make_optimizer"]


class FineTunedViT(nn.Module):
    """A timm ViT trained end to end, with a linear head grown by Avalanche's model adaptation."""

    def __init__(self, backbone: nn.Module, initial_classes: int = 2):
        super().__init__()
        backbone.reset_classifier(0)
        self.backbone = backbone
        self.head = IncrementalClassifier(
            backbone.num_features, initial_out_features=initial_classes
        )

    def forward(self, x: Tensor) -> Tensor:
        features = self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)
        return self.head(features)


def make_optimizer(parameters, settings: Mapping[str, Any]) -> torch.optim.Optimizer:
    """SGD (with momentum), Adam or AdamW over ``parameters`` from a baseline's config section."""
    name = settings["optimizer"]
    extra = {"momentum": settings["momentum"]} if name == "sgd" else {}
    return OPTIMIZERS[name](
        parameters, lr=settings["lr"], weight_decay=settings["weight_decay"], **extra
    )


def ewc_plugin(settings: Mapping[str, Any]) -> StableEWCPlugin:
    """Avalanche's EWC penalty from the ``baselines.ewc`` section, its importances capped at
    ``max_stiffness`` of SGD's stability limit (:mod:`avalanche_sdlora.runner.ewc`); Adam and
    AdamW scale their steps by the gradient's size, so no cap applies to them, nor where
    ``max_stiffness`` is null."""
    stable = (
        settings["optimizer"] == "sgd"
        and settings["ewc_lambda"] > 0
        and settings["max_stiffness"] is not None
    )
    cap = (
        importance_cap(
            settings["lr"], settings["momentum"], settings["ewc_lambda"], settings["max_stiffness"]
        )
        if stable
        else float("inf")
    )
    online = settings["mode"] == "online"
    return StableEWCPlugin(
        settings["ewc_lambda"],
        cap=cap,
        mode=settings["mode"],
        decay_factor=settings["decay_factor"] if online else None,
    )


def make_baseline(
    method: str,
    backbone: nn.Module,
    settings: Mapping[str, Any],
    *,
    num_classes: int,
    seed: int = 0,
    **template: Any,
) -> SupervisedTemplate:
    """The Avalanche strategy ``method`` on ``backbone``; ``template`` holds the shared template
    arguments (train_mb_size, train_epochs, eval_mb_size, device, plugins, evaluator).
    ``num_classes`` (all classes of the stream) sizes the fixed heads of L2P, SimpleCIL and
    RanPAC; ``seed`` draws RanPAC's random projection."""
    if method in ("simplecil", "ranpac"):
        from avalanche_sdlora.runner.frozen import make_frozen_feature_method

        return make_frozen_feature_method(
            method, backbone, settings, num_classes=num_classes, seed=seed, **template
        )
    if method == "l2p":
        from avalanche_sdlora.runner.l2p import make_l2p

        return make_l2p(
            backbone=backbone,
            num_classes=num_classes,
            lr=settings["lr"],
            pool_size=settings["pool_size"],
            prompt_length=settings["prompt_length"],
            top_k=settings["top_k"],
            **template,
        )
    model = FineTunedViT(backbone)
    common = {
        "model": model,
        "optimizer": make_optimizer(model.parameters(), settings),
        "criterion": nn.CrossEntropyLoss(),
        **template,
    }
    if method == "naive":
        return Naive(**common)
    if method == "ewc":
        return Naive(
            **{**common, "plugins": [*(template.get("plugins") or []), ewc_plugin(settings)]}
        )
    if method == "lwf":
        return LwF(**common, alpha=settings["alpha"], temperature=settings["temperature"])
    if method == "replay":
        return Replay(**common, mem_size=settings["mem_size"])
    if method == "cumulative":
        return Cumulative(**common)
    raise ValueError(
        f"unknown baseline {method!r}; choose from naive, ewc, lwf, replay, cumulative, l2p, "
        "simplecil, ranpac"
    )
