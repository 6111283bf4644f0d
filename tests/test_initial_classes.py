"""``benchmark.initial_classes``: a larger first experience (B50 Inc10), for every method, with a
resume that ends as an uninterrupted run; every run folder holds the field's metrics."""

import json

from avalanche.training.templates.base_sgd import BaseSGDTemplate
from conftest import make_small_vit
from test_cli import DEMO

from avalanche_sdlora.runner.cli import main
from avalanche_sdlora.runner.streams import (
    backbone_transforms,
    class_order,
    make_benchmark,
    split_problems,
)

SPLIT = [
    "--set", "training.epochs=1",
    "--set", "benchmark.num_classes=6",
    "--set", "benchmark.n_experiences=3",
    "--set", "benchmark.initial_classes=4",
    "--set", "benchmark.train_per_class=15",
    "--set", "sdlora.eval_nme=true",
    "--set", "baselines.ranpac.projection_dim=256",
    "--set", 'experiment.compare=["ranpac"]',
]  # fmt: skip


def test_the_first_experience_takes_initial_classes_and_the_others_share_the_rest():
    transform, _ = backbone_transforms(make_small_vit(), train_augmentation=False)
    benchmark = make_benchmark(
        "digits",
        root=None,
        n_experiences=4,
        order=class_order(10, seed=1993),
        train_transform=transform,
        eval_transform=transform,
        initial_classes=4,
    )
    classes = [exp.classes_in_this_experience for exp in benchmark.train_stream]
    assert classes == [[0, 1, 2, 3], [4, 5], [6, 7], [8, 9]]
    assert [exp.classes_in_this_experience for exp in benchmark.test_stream] == classes
    assert split_problems(10, 4, None, None, 4) == []
    assert split_problems(10, 4, None, None, 5) == [
        "benchmark.initial_classes: the other 3 experiences must share the rest of the 10 "
        "classes evenly, at least one each (one of [1, 4, 7]), got 5"
    ]
    assert split_problems(10, 1, None, None, 4)[0].endswith("(one of [10]), got 4")


def test_a_resumed_run_with_initial_classes_ends_as_an_uninterrupted_one(tmp_path, monkeypatch):
    whole = tmp_path / "whole"
    assert main(["--config", DEMO, *SPLIT, "--output", str(whole)]) == 0

    train, calls = BaseSGDTemplate.train, []

    def crash_twice(self, *args, **kwargs):  # sdlora's experience 1, then ranpac's experience 1
        calls.append(type(self).__name__)
        if len(calls) in (2, 6):
            raise RuntimeError("simulated crash")
        return train(self, *args, **kwargs)

    monkeypatch.setattr(BaseSGDTemplate, "train", crash_twice)
    broken = tmp_path / "broken"
    assert main(["--config", DEMO, *SPLIT, "--output", str(broken)]) == 1
    assert main(["--resume", str(broken)]) == 1
    assert main(["--resume", str(broken)]) == 0
    assert calls == ["SDLoRA"] * 4 + ["FrozenFeatureStrategy"] * 4

    def runs(folder):
        return json.loads((folder / "metrics.json").read_text())["methods"]

    exact = (
        "accuracy_matrix",
        "top5_accuracy_matrix",
        "old_class_accuracy",
        "new_class_accuracy",
        "last_top5_accuracy",
        "pruning",
    )
    for method in ("sdlora", "ranpac"):
        resumed, uninterrupted = (
            runs(broken)[method]["seeds"]["0"],
            runs(whole)[method]["seeds"]["0"],
        )
        for key in exact:
            assert resumed[key] == uninterrupted[key], (method, key)
        assert len(resumed["accuracy_matrix"]) == 3
        assert resumed["old_class_accuracy"][0] is None and len(resumed["new_class_accuracy"]) == 3
    sdlora, ranpac = runs(broken)["sdlora"]["seeds"]["0"], runs(broken)["ranpac"]["seeds"]["0"]
    assert (
        sdlora["nme_accuracy_matrix"] == runs(whole)["sdlora"]["seeds"]["0"]["nme_accuracy_matrix"]
    )
    assert "nme_accuracy_matrix" not in ranpac
    ridges = [record["ridge"] for record in ranpac["experiences"]]
    assert ridges == [r["ridge"] for r in runs(whole)["ranpac"]["seeds"]["0"]["experiences"]]
    assert [record["projection_dim"] for record in ranpac["experiences"]] == [256] * 3
    assert [record["trainable_parameters"] for record in ranpac["experiences"]] == [
        1024,
        1280,
        1536,
    ]

    header = (broken / "summary.md").read_text().splitlines()[0]
    for column in ("top-5 last acc.", "old classes", "new classes", "NME last acc."):
        assert column in header
    for plot in ("old_new_accuracy.png", "seen_top5_accuracy.png", "seen_accuracy.png"):
        assert (broken / "plots" / plot).read_bytes()[:4] == b"\x89PNG"
