"""The metrics the field reports: top-5 accuracy (also while a head has fewer than 5 units),
accuracy on old and new classes weighted by test-set size, and SD-LoRA's nearest-class-mean
evaluation beside its linear head."""

import pytest
import torch
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.training.plugins import EvaluationPlugin
from conftest import make_small_vit
from streams import separable_benchmark
from torch.nn import functional as F
from torch.utils.data import DataLoader

from avalanche_sdlora import SDLoRA, SDLoRAViT
from avalanche_sdlora.runner.metrics import NME_METRIC, NearestMeanPlugin, top5_accuracy
from avalanche_sdlora.runner.report import summarize_run


def test_top5_counts_a_hit_among_the_five_best_scores_and_every_class_of_a_smaller_head():
    metric = top5_accuracy()._metric
    scores = torch.tensor([[0.0, 1, 2, 3, 4, 5, 6], [6.0, 5, 4, 3, 2, 1, 0]])
    metric.update(
        scores, torch.tensor([2, 2]), 0
    )  # 2 is 5th best in the first row, 3rd in the other
    metric.update(scores, torch.tensor([1, 6]), 0)  # 6th best and last: misses
    assert metric.result() == {0: 0.5}
    small = top5_accuracy()._metric
    small.update(torch.tensor([[0.3, 0.1], [0.2, 0.9]]), torch.tensor([1, 0]), 0)
    assert small.result() == {0: 1.0}  # two units: both are among the best five


def _results(rows: dict[str, list[list[float]]]) -> list[dict[str, float]]:
    return [
        {
            f"{metric}/eval_phase/test_stream/Task000/Exp{j:03d}": value
            for metric, matrix in rows.items()
            for j, value in enumerate(matrix[t])
        }
        for t in range(len(next(iter(rows.values()))))
    ]


def test_old_and_new_class_accuracy_and_the_last_accuracies_weigh_experiences_by_test_size():
    top1 = [[0.9, 0.0, 0.0], [0.6, 0.8, 0.0], [0.5, 0.4, 0.7]]
    top5 = [[1.0, 0.2, 0.1], [0.9, 1.0, 0.3], [0.8, 0.9, 1.0]]
    nme = [[0.8, 0.0, 0.0], [0.7, 0.6, 0.0], [0.6, 0.5, 0.5]]
    results = _results({"Top1_Acc_Exp": top1, "Topk_5_Acc_Exp": top5, NME_METRIC: nme})
    report = summarize_run(results, test_sizes=[50, 10, 10])  # B50 Inc10 with 3 experiences
    assert report.old_class_accuracy[0] is None
    assert report.old_class_accuracy[1:] == pytest.approx([60.0, (50 * 50 + 40 * 10) / 60])
    assert report.new_class_accuracy == pytest.approx([90.0, 80.0, 70.0])
    assert report.last_accuracy == pytest.approx((50 * 50 + 40 * 10 + 70 * 10) / 70)
    assert report.seen_class_accuracy[1] == pytest.approx((60 * 50 + 80 * 10) / 60)
    assert report.last_top5_accuracy == pytest.approx((80 * 50 + 90 * 10 + 100 * 10) / 70)
    assert report.top5_accuracy_matrix[2] == pytest.approx([80.0, 90.0, 100.0])
    assert report.nme_last_accuracy == pytest.approx((60 * 50 + 50 * 10 + 50 * 10) / 70)
    assert report.nme_seen_class_accuracy[0] == pytest.approx(80.0)
    plain = summarize_run(_results({"Top1_Acc_Exp": top1}))
    assert (plain.last_top5_accuracy, plain.nme_accuracy_matrix) == (None, None)
    assert plain.last_accuracy == pytest.approx((50 + 40 + 70) / 3)


def _features(model: SDLoRAViT, dataset) -> tuple[torch.Tensor, torch.Tensor]:
    x, y, *_ = next(iter(DataLoader(dataset, batch_size=len(dataset))))
    model.eval()
    with torch.no_grad():
        return model.forward_features(x), y


def test_nearest_class_mean_evaluation_uses_each_class_mean_taken_once_its_experience_trained():
    benchmark = separable_benchmark(experiences=2, classes_per_experience=2, per_class=16)
    plugin = NearestMeanPlugin(num_classes=4)
    evaluator = EvaluationPlugin(accuracy_metrics(experience=True), loggers=[])
    model = SDLoRAViT(make_small_vit(), rank=2)
    strategy = SDLoRA(
        model=model, plugins=[plugin], train_mb_size=16, train_epochs=1, evaluator=evaluator
    )
    means = {}
    for experience in benchmark.train_stream:
        strategy.train(experience)
        features, labels = _features(model, experience.dataset)
        for c in experience.classes_in_this_experience:
            means[c] = features[labels == c].double().mean(0)
        learned = plugin.means.sums / plugin.means.counts.clamp(min=1)[:, None]
        for c, mean in means.items():  # old means are kept as they were taken
            torch.testing.assert_close(learned[c], mean, rtol=1e-6, atol=1e-9)
    assert plugin.means.counts.tolist() == [16, 16, 16, 16]
    metrics = strategy.eval(benchmark.test_stream)
    prototypes = F.normalize(torch.stack([means[c] for c in range(4)]), dim=1)
    for j, experience in enumerate(benchmark.test_stream):
        features, labels = _features(model, experience.dataset)
        predicted = (F.normalize(features.double(), dim=1) @ prototypes.T).argmax(1)
        expected = (predicted == labels).float().mean().item()
        key = f"{NME_METRIC}/eval_phase/test_stream/Task000/Exp{j:03d}"
        assert metrics[key] == pytest.approx(expected, abs=1e-9)
