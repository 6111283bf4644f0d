"""The settings behind the study on which adapters must matter: the head-only control, a validation
split carved from the training images, renditions that shift the stream, and the crop's scale."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image
from test_benchmarks import image_tree, pixel_values, small_vit  # noqa: F401 (a fixture)
from test_cli import DEMO, SHRINK
from torchvision import transforms

from avalanche_sdlora.runner.cli import main
from avalanche_sdlora.runner.config import read_config
from avalanche_sdlora.runner.streams import backbone_transforms, class_order, make_benchmark


def grey_levels(stream, transform) -> list[int]:
    """The grey level of every image of a stream (it identifies the image in ``image_tree``)."""
    return [
        round(float(pixel_values(x, transform).mean()) * 255)
        for exp in stream
        for x, _, _ in exp.dataset
    ]


def test_a_validation_split_holds_training_images_out_and_reads_no_test_image(image_tree):  # noqa: F811
    for path in (image_tree / "val").rglob("*.png"):
        Image.new("RGB", (12, 10), (255, 255, 255)).save(path)  # any test image would show as 255
    transform, _ = backbone_transforms(small_vit(16), train_augmentation=False)
    common = {"root": image_tree, "order": class_order(4), "train_transform": transform}
    benchmark = make_benchmark(
        "imagefolder", n_experiences=2, validation_per_class=2, eval_transform=transform, **common
    )
    train = grey_levels(benchmark.train_stream, transform)
    held_out = grey_levels(benchmark.test_stream, transform)
    assert [len(e.dataset) for e in benchmark.train_stream] == [6, 6]
    assert [len(e.dataset) for e in benchmark.test_stream] == [4, 4]
    assert 255 not in held_out
    every_training_image = [50 * k + 20 + 2 * i for k in range(4) for i in range(5)]
    assert sorted(train + held_out) == every_training_image  # each image on exactly one side
    with pytest.raises(ValueError, match="validation_per_class: class 0 has 5 training samples"):
        make_benchmark(
            "imagefolder",
            n_experiences=2,
            validation_per_class=5,
            eval_transform=transform,
            **common,
        )


def test_a_rendition_redraws_training_and_test_images():
    image = Image.new("RGB", (12, 10), (70, 200, 130))
    redrawn = {}
    for rendition in (None, "invert", "grayscale", "solarize"):
        train, test = backbone_transforms(
            small_vit(16), train_augmentation=False, rendition=rendition
        )
        values = [pixel_values(t(image), t).mean(dim=(1, 2)) * 255 for t in (train, test)]
        redrawn[rendition] = [round(v) for v in values[0].tolist()]
        assert values[0].tolist() == values[1].tolist()
    assert redrawn[None] == [70, 200, 130]
    assert redrawn["invert"] == [185, 55, 125]
    assert len(set(redrawn["grayscale"])) == 1
    assert redrawn["solarize"] == [70, 55, 125]


def test_the_crop_scale_reaches_the_training_crop_and_is_checked():
    train, _ = backbone_transforms(small_vit(16), crop_scale=(0.35, 1.0))
    crops = [t for t in train.transforms if isinstance(t, transforms.RandomResizedCrop)]
    assert [c.scale for c in crops] == [(0.35, 1.0)]
    _, problems = read_config(overrides=["benchmark.crop_scale=[0.8,0.5]"])
    assert problems == [
        "benchmark.crop_scale: must be [min, max] with 0 < min <= max <= 1, got [0.8, 0.5]"
    ]
    _, problems = read_config(overrides=["benchmark.rendition=sketchy"])
    assert problems[0].startswith("benchmark.rendition: 'sketchy' is not allowed; choose from")


def test_head_only_trains_the_head_alone_next_to_plain_sdlora(tmp_path: Path):
    out = tmp_path / "run"
    args = ["--config", DEMO, "--output", str(out), *SHRINK]
    args += ["--set", "experiment.strategy=head_only", "--compare", "sdlora_plain"]
    assert main(args) == 0
    methods = json.loads((out / "metrics.json").read_text())["methods"]
    head_only = methods["head_only"]["seeds"]["0"]["experiences"]
    plain = methods["sdlora_plain"]["seeds"]["0"]["experiences"]
    assert [e["active_adapters"] for e in head_only] == [0, 0]
    assert [e["active_adapters"] for e in plain] == [1, 2]
    width = 128  # the demo backbone's embedding width: a head row is width + 1 parameters
    assert [e["trainable_parameters"] for e in head_only] == [2 * (width + 1), 4 * (width + 1)]
    assert plain[-1]["trainable_parameters"] > head_only[-1]["trainable_parameters"]
    assert "head_only" in (out / "summary.md").read_text()
    assert not (out / "plots" / "adapters_head_only.png").exists()  # nothing to draw
    assert (out / "plots" / "adapters_sdlora_plain.png").exists()
