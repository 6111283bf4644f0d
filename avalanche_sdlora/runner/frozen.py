"""SimpleCIL and RanPAC: a frozen pretrained backbone whose features feed a classifier fitted in
closed form, with no training loop.

Each experience is one pass of the backbone over its training images (the evaluation transforms, no
augmentation); the head (:class:`~avalanche_sdlora.runner.prototypes.ClassMeans` for SimpleCIL,
:class:`~avalanche_sdlora.runner.ranpac.RanPACClassifier` for RanPAC) learns from those features.
Evaluation is Avalanche's own, so every metric and logger works as for the other methods. The
optional first-session adaptation (RanPAC's Phase 1, APER's for SimpleCIL) trains one LoRA adapter
and a head on the first experience with :class:`~avalanche_sdlora.strategy.SDLoRA` (gate off), then
merges the adapter into the backbone, which stays frozen from then on.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from avalanche.benchmarks import CLExperience
from avalanche.core import BasePlugin
from avalanche.training.plugins import EvaluationPlugin
from avalanche.training.templates import SupervisedTemplate
from torch import Tensor, nn

from avalanche_sdlora.model import SDLoRAViT
from avalanche_sdlora.plugins import BatchTransformPlugin
from avalanche_sdlora.runner.features import (
    autocast_dtype,
    collect_features,
    evaluation_inputs,
    feature_loader,
)
from avalanche_sdlora.runner.prototypes import ClassMeans, seen_scores
from avalanche_sdlora.runner.ranpac import RanPACClassifier
from avalanche_sdlora.strategy import SDLoRA, peak_memory_mb

__all__ = [
    "FirstSessionAdaptation",
    "FrozenBackboneClassifier",
    "FrozenFeatureStrategy",
    "make_frozen_feature_method",
]


class FrozenBackboneClassifier(nn.Module):
    """A frozen timm ViT (always in eval mode) and a head that scores its pre-logits features;
    classes the head has not learned score below every learned one."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        backbone.reset_classifier(0)
        self.backbone = backbone.requires_grad_(False)
        self.head = head

    def features(self, x: Tensor) -> Tensor:
        """The backbone's pre-logits features (a ViT-B's [CLS] output, a pooled one otherwise)."""
        return self.backbone.forward_head(self.backbone.forward_features(x), pre_logits=True)

    def forward(self, x: Tensor) -> Tensor:
        return seen_scores(self.head, self.features(x).float())

    def train(self, mode: bool = True) -> FrozenBackboneClassifier:
        return super().train(False)  # frozen: no dropout, no drop path, ever


@dataclass(frozen=True)
class FirstSessionAdaptation:
    """Train a rank-``rank`` LoRA adapter on q and v of every block and a linear head on the first
    experience (SGD with momentum 0.9 at ``lr``, ``epochs`` epochs, cross-entropy), then merge the
    adapter into the backbone: RanPAC's Phase 1 with LoRA as its parameter-efficient method."""

    lr: float
    rank: int
    epochs: int
    batch_size: int

    def __call__(
        self,
        backbone: nn.Module,
        experience: CLExperience,
        device: torch.device,
        num_workers: int = 0,
        plugins: Sequence[BasePlugin] = (),
    ) -> nn.Module:
        """The adapted backbone; ``plugins`` go to the training (the batched path's
        ``BatchTransformPlugin``)."""
        model = SDLoRAViT(backbone, rank=self.rank, gate=False)
        strategy = SDLoRA(
            model=model,
            lr=self.lr,
            pruning=False,
            train_mb_size=self.batch_size,
            train_epochs=self.epochs,
            device=device,
            evaluator=EvaluationPlugin(loggers=[]),
            plugins=list(plugins),
        )
        strategy.train(experience, num_workers=num_workers)
        merged = model.merge_and_unload()
        merged.reset_classifier(0)
        return merged.to(device)


class FrozenFeatureStrategy(SupervisedTemplate):
    """An Avalanche strategy with no training loop: ``train(experience)`` runs the frozen backbone
    once over the experience's training images and lets the head learn from the features.

    ``experience_log`` holds one record per experience: the learned values (``trainable_parameters``),
    the pass's time and peak memory and what the head reports (RanPAC's chosen ``ridge``).
    """

    def __init__(
        self,
        *,
        model: FrozenBackboneClassifier,
        adaptation: FirstSessionAdaptation | None = None,
        **template: Any,
    ):
        super().__init__(model=model, optimizer=None, criterion=nn.CrossEntropyLoss(), **template)
        self.adaptation = adaptation
        self.experience_log: list[dict] = []

    def make_optimizer(self, **kwargs) -> None:
        """Nothing trains by gradient here."""

    def make_train_dataloader(self, num_workers: int = 0, **kwargs) -> None:
        """The experience's images with the evaluation transforms, in order: features, not
        augmentations, make the prototypes and statistics."""
        self.dataloader = feature_loader(self.adapted_dataset, self.eval_mb_size, num_workers)

    def _train_exp(self, experience: CLExperience, eval_streams=None, **kwargs) -> None:
        began = time.perf_counter()
        model: FrozenBackboneClassifier = self.model
        if self.adaptation is not None and self.clock.train_exp_counter == 0:
            workers = kwargs.get("num_workers", 0)
            batched = [
                BatchTransformPlugin(p.transforms, p.seed, p.device)  # its own batch count
                for p in self.plugins
                if isinstance(p, BatchTransformPlugin)
            ]
            model.backbone = self.adaptation(
                model.backbone, experience, self.device, workers, batched
            )
        features, labels = collect_features(
            model.features,
            self.dataloader,
            self.device,
            autocast_dtype(self),
            evaluation_inputs(self),
        )
        reported = model.head.learn(features, labels)
        self.experience_log.append(
            {
                "experience": self.clock.train_exp_counter,
                "trainable_parameters": model.head.learned_values(),
                "train_seconds": time.perf_counter() - began,
                "peak_memory_mb": peak_memory_mb(self.device),
                **reported,
            }
        )


def make_frozen_feature_method(
    method: str,
    backbone: nn.Module,
    settings: Mapping[str, Any],
    *,
    num_classes: int,
    seed: int = 0,
    **template: Any,
) -> FrozenFeatureStrategy:
    """``simplecil`` or ``ranpac`` on ``backbone`` from its ``baselines.<method>`` settings;
    ``template`` holds the shared template arguments (train_mb_size, train_epochs, eval_mb_size,
    device, plugins, evaluator); ``seed`` draws RanPAC's projection and held-out splits."""
    width = backbone.num_features
    if method == "simplecil":
        head: nn.Module = ClassMeans(width, num_classes)
    else:
        head = RanPACClassifier(
            width,
            num_classes,
            projection_dim=settings["projection_dim"],
            ridges=settings["ridges"],
            validation_fraction=settings["validation_fraction"],
            seed=seed,
        )
    adaptation = (
        FirstSessionAdaptation(
            lr=settings["adaptation_lr"],
            rank=settings["adaptation_rank"],
            epochs=template["train_epochs"],
            batch_size=template["train_mb_size"],
        )
        if settings["first_session_adaptation"]
        else None
    )
    model = FrozenBackboneClassifier(backbone, head).to(template["device"])
    return FrozenFeatureStrategy(model=model, adaptation=adaptation, **template)
