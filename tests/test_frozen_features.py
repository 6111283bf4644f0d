"""SimpleCIL and RanPAC: a frozen backbone and classifiers fitted in closed form, checked against
the formulas on a tiny stream; RanPAC's memory check and the first-session adaptation."""

import numpy as np
import torch
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.training.plugins import EvaluationPlugin
from conftest import make_small_vit
from streams import separable_benchmark
from test_cli import DEMO
from torch.utils.data import DataLoader

from avalanche_sdlora.adapters import LoRAQKV
from avalanche_sdlora.runner.cli import main
from avalanche_sdlora.runner.config import defaults
from avalanche_sdlora.runner.frozen import make_frozen_feature_method
from avalanche_sdlora.runner.prototypes import UNSEEN_SCORE
from avalanche_sdlora.runner.ranpac import (
    PAPER_RIDGES,
    default_projection_dim,
    largest_projection_dim,
    memory_bytes,
)


def build(method: str, **settings):
    return make_frozen_feature_method(
        method,
        make_small_vit(),
        {**defaults()["baselines"][method], **settings},
        num_classes=6,
        seed=1,
        train_mb_size=8,
        train_epochs=2,
        eval_mb_size=16,
        device="cpu",
        evaluator=EvaluationPlugin(accuracy_metrics(experience=True, stream=True), loggers=[]),
    )


def everything(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    x, y, *_ = next(iter(DataLoader(dataset, batch_size=len(dataset))))
    return x, y


def test_ranpac_ridge_equals_the_closed_form_fit_on_a_tiny_stream():
    benchmark = separable_benchmark(experiences=3, classes_per_experience=2, per_class=20)
    strategy = build("ranpac", projection_dim=48)
    model, head = strategy.model, strategy.model.head
    features, labels = [], []
    for experience in benchmark.train_stream:
        strategy.train(experience)
        x, y = everything(experience.dataset)
        with torch.no_grad():
            features.append(model.features(x).double().numpy())
        labels.append(y.numpy())
        ridge = strategy.experience_log[-1]["ridge"]
        assert ridge in PAPER_RIDGES
        # the closed form over every experience so far: W_out = (H^T H + lambda I)^-1 H^T Y
        h = np.maximum(np.concatenate(features) @ head.projection.double().numpy(), 0)
        y_onehot = np.eye(6)[np.concatenate(labels)]
        expected = np.linalg.solve(h.T @ h + ridge * np.eye(48), h.T @ y_onehot)
        np.testing.assert_allclose(head.weights.numpy(), expected, rtol=0, atol=1e-5)
        gram = h.T @ h  # G accumulates over experiences (h is float32 in the model)
        np.testing.assert_allclose(head.gram.numpy(), gram, rtol=1e-5, atol=1e-6 * gram.max())

    # the ridge of the last experience is the grid's best on its held-out share, fitted on the rest
    x, y = everything(benchmark.train_stream[2].dataset)
    count = len(y)
    held = round(0.2 * count)
    order = torch.randperm(count, generator=torch.Generator().manual_seed(1 * 1_000_003 + 2))
    with torch.no_grad():
        h = np.maximum(model.features(x).double().numpy() @ head.projection.double().numpy(), 0)
    y_onehot = np.eye(6)[y.numpy()]
    fit, check = order[held:].numpy(), order[:held].numpy()
    errors = [
        np.square(
            h[check] @ np.linalg.solve(h[fit].T @ h[fit] + r * np.eye(48), h[fit].T @ y_onehot[fit])
            - y_onehot[check]
        ).sum()
        for r in PAPER_RIDGES
    ]
    assert strategy.experience_log[2]["ridge"] == PAPER_RIDGES[int(np.argmin(errors))]

    # predictions are h W_out; the stream is separable, so RanPAC learns it
    x, y = everything(benchmark.test_stream[0].dataset)
    with torch.no_grad():
        logits = model(x)
        h = np.maximum(model.features(x).double().numpy() @ head.projection.double().numpy(), 0)
    np.testing.assert_allclose(logits.numpy(), h @ head.weights.numpy(), rtol=0, atol=1e-5)
    accuracy = strategy.eval(benchmark.test_stream)[
        "Top1_Acc_Stream/eval_phase/test_stream/Task000"
    ]
    assert accuracy > 0.9, accuracy
    assert [r["trainable_parameters"] for r in strategy.experience_log] == [96, 192, 288]


def test_simplecil_scores_by_cosine_to_class_means_and_never_predicts_unseen_classes():
    benchmark = separable_benchmark(experiences=3, classes_per_experience=2, per_class=20)
    strategy = build("simplecil")
    model = strategy.model
    backbone = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    strategy.train(benchmark.train_stream[0])
    x, y = everything(benchmark.train_stream[0].dataset)
    with torch.no_grad():
        features = model.features(x)
    means = torch.stack([features[y == c].mean(0) for c in (0, 1)])
    test_x, test_y = everything(benchmark.test_stream[1].dataset)  # classes not learned yet
    with torch.no_grad():
        test_features, logits = model.features(test_x), model(test_x)
    cosine = torch.nn.functional.cosine_similarity(test_features[:, None], means[None], dim=2)
    torch.testing.assert_close(logits[:, :2], cosine, rtol=0, atol=1e-5)
    assert (logits[:, 2:] == UNSEEN_SCORE).all()
    assert set(test_y.tolist()) == {2, 3}
    for experience in benchmark.train_stream[1:]:
        strategy.train(experience)
    metrics = strategy.eval(benchmark.test_stream)
    assert metrics["Top1_Acc_Stream/eval_phase/test_stream/Task000"] > 0.9
    assert all(torch.equal(model.backbone.state_dict()[k], v) for k, v in backbone.items())
    assert not any(p.requires_grad for p in model.parameters())


def test_first_session_adaptation_trains_once_then_the_merged_backbone_stays_frozen():
    benchmark = separable_benchmark(experiences=2, classes_per_experience=2, per_class=16)
    strategy = build("ranpac", projection_dim=32, first_session_adaptation=True, adaptation_rank=2)
    original = strategy.model.backbone.blocks[0].attn.qkv.weight.clone()
    strategy.train(benchmark.train_stream[0])
    adapted = strategy.model.backbone
    qkv = adapted.blocks[0].attn.qkv
    assert type(qkv) is torch.nn.Linear and not any(
        isinstance(m, LoRAQKV) for m in adapted.modules()
    )
    assert not torch.equal(qkv.weight, original)  # the merged adapter changed q and v
    k_rows = slice(qkv.weight.shape[1], 2 * qkv.weight.shape[1])
    torch.testing.assert_close(qkv.weight[k_rows], original[k_rows], rtol=0, atol=0)
    after_first = {k: v.clone() for k, v in adapted.state_dict().items()}
    strategy.train(benchmark.train_stream[1])
    assert strategy.model.backbone is adapted
    assert all(torch.equal(adapted.state_dict()[k], v) for k, v in after_first.items())


def test_the_projection_scales_with_the_width_from_the_papers_10000_for_vit_b():
    assert default_projection_dim(768) == 10000
    assert default_projection_dim(128) == 1667
    assert default_projection_dim(1024) == 13334
    assert memory_bytes(10000) == 5 * 8 * 10000**2 + 4096 * 12 * 10000  # 4.2 GiB
    for free in (10**6, 4 * 2**30, 123456789012):
        largest = largest_projection_dim(free)
        assert memory_bytes(largest) <= free < memory_bytes(largest + 1)


def test_ranpac_that_cannot_fit_in_memory_exits_2_before_any_work(tmp_path, capsys):
    out = tmp_path / "run"
    args = [
        "--set",
        'experiment.compare=["ranpac"]',
        "--set",
        "baselines.ranpac.projection_dim=2000000",
    ]
    assert main(["--config", DEMO, "--output", str(out), "--dry-run", *args]) == 2
    error = capsys.readouterr().err
    assert "baselines.ranpac.projection_dim: RanPAC holds 5 M x M float64 matrices" in error
    assert "149103.2 GiB for M = 2000000" in error
    assert "set baselines.ranpac.projection_dim to at most" in error
    assert not out.exists()
