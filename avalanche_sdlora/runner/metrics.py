"""The metrics of the field that Avalanche lacks: a top-k accuracy that works while the head has
fewer than k units, and SD-LoRA's nearest-class-mean accuracy beside its linear head.

Both report per tested experience under Avalanche's metric names (``<name>/eval_phase/<stream>/
Task000/Exp<j>``), so the report reads them as it reads the top-1 accuracy.
"""

from __future__ import annotations

import torch
from avalanche.distributed import DistributedHelper
from avalanche.evaluation.metric_results import MetricValue
from avalanche.evaluation.metric_utils import get_metric_name
from avalanche.evaluation.metrics.topk_acc import ExperienceTopkAccuracy, TopkAccuracy
from avalanche.training.plugins import SupervisedPlugin
from torch import Tensor

from avalanche_sdlora.runner.features import (
    autocast_dtype,
    collect_features,
    evaluation_inputs,
    feature_loader,
)
from avalanche_sdlora.runner.prototypes import ClassMeans, seen_scores

__all__ = ["NME_METRIC", "TOP5_METRIC", "NearestMeanPlugin", "top5_accuracy"]

TOP5_METRIC = "Topk_5_Acc_Exp"
NME_METRIC = "NME_Acc_Exp"


class _TopkAccuracy(TopkAccuracy):
    """Avalanche's top-k accuracy, where fewer than k scores make every one of them a guess
    (torchmetrics refuses ``top_k`` above the number of classes, as a head that grows has early)."""

    def _compute_topk_acc(self, pred: Tensor, gt: Tensor, top_k: int) -> float:
        labels = torch.as_tensor(gt).reshape(-1)
        scores = torch.as_tensor(pred).reshape(len(labels), -1)
        guesses = scores.topk(min(top_k, scores.shape[1]), dim=1).indices
        return (guesses == labels[:, None]).any(dim=1).float().mean().item()


def top5_accuracy() -> ExperienceTopkAccuracy:
    """Top-5 accuracy per tested experience (:data:`TOP5_METRIC`)."""
    metric = ExperienceTopkAccuracy(top_k=5)
    metric._metric = _TopkAccuracy(top_k=5)
    return metric


class NearestMeanPlugin(SupervisedPlugin):
    """Evaluates an ``SDLoRAViT`` by the nearest class mean of its features (cosine), beside its
    linear head, and publishes the accuracy per tested experience (:data:`NME_METRIC`);
    ``num_classes`` is the number of classes of the whole stream.

    After each training experience (and after the plugins before it, such as pruning), the model's
    features of the experience's training images (evaluation transforms) give its classes' means,
    which are kept: without stored images, an old class's mean is never taken again.
    """

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.means: ClassMeans | None = None
        self._correct = self._tested = 0

    def after_training_exp(self, strategy, num_workers: int = 0, **kwargs) -> None:
        model = DistributedHelper.unwrap_model(strategy.model)
        was_training = model.training
        model.eval()
        loader = feature_loader(strategy.experience.dataset, strategy.eval_mb_size, num_workers)
        features, labels = collect_features(
            model.forward_features,
            loader,
            strategy.device,
            autocast_dtype(strategy),
            evaluation_inputs(strategy),
        )
        model.train(was_training)
        if self.means is None:
            self.means = ClassMeans(features.shape[1], self.num_classes).to(strategy.device)
        self.means.learn(features, labels)

    def before_eval_exp(self, strategy, **kwargs) -> None:
        self._correct = self._tested = 0

    def after_eval_forward(self, strategy, **kwargs) -> None:
        if self.means is None:
            return
        features = DistributedHelper.unwrap_model(strategy.model).features
        predicted = seen_scores(self.means, features.float()).argmax(dim=1)
        self._correct += int((predicted == strategy.mb_y).sum())
        self._tested += len(strategy.mb_y)

    def after_eval_exp(self, strategy, **kwargs) -> None:
        if self.means is None or not self._tested:
            return
        name = get_metric_name(NME_METRIC, strategy, add_experience=True)
        value = MetricValue(
            self, name, self._correct / self._tested, strategy.clock.train_iterations
        )
        strategy.evaluator.publish_metric_value(value)
