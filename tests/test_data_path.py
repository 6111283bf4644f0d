"""The data path: which one a run takes and its loader settings, the batched inputs every strategy
trains on, a resume that stays exact on the batched path, and the time split in metrics.json."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from avalanche.benchmarks import nc_benchmark
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.training import EWC, LwF, Naive, Replay
from avalanche.training.plugins import EvaluationPlugin
from conftest import make_small_vit
from PIL import Image
from streams import write_image_tree
from test_cli import DEMO, SHRINK, crash_and_resume
from torch.utils.data import TensorDataset

from avalanche_sdlora import SDLoRA, SDLoRAViT
from avalanche_sdlora.batch_transforms import BatchTransforms
from avalanche_sdlora.plugins import BatchTransformPlugin, TimeSplitPlugin
from avalanche_sdlora.runner import data_path as data_path_module
from avalanche_sdlora.runner.baselines import FineTunedViT
from avalanche_sdlora.runner.cli import main
from avalanche_sdlora.runner.config import load_config, read_config
from avalanche_sdlora.runner.data_path import auto_workers, data_path
from avalanche_sdlora.runner.in_memory import DecodedImages, in_memory_problem
from avalanche_sdlora.runner.streams import rgb_rendition

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def config_with(**benchmark) -> dict:
    return load_config(DEMO, [f"benchmark.{key}={value}" for key, value in benchmark.items()])


@pytest.fixture
def trees(tmp_path):
    """An ImageFolder tree whose images have one size, and one with two sizes."""
    same = write_image_tree(tmp_path / "same", per_class=2)
    mixed = write_image_tree(tmp_path / "mixed", per_class=2)
    Image.new("RGB", (20, 16), (9, 9, 9)).save(mixed / "train" / "class_1" / "0.png")
    return same, mixed


def test_auto_takes_the_batched_path_for_in_memory_data_and_pil_otherwise(trees):
    same, mixed = trees
    digits = data_path(config_with())
    assert (digits.transform_device, digits.num_workers, digits.pin_memory) == ("cpu", 0, False)
    assert data_path(config_with(name="imagefolder", root=same)).batched
    fallback = data_path(config_with(name="imagefolder", root=mixed))
    assert not fallback.batched
    assert "2 sizes (12x10, 20x16, ...), not one" in fallback.reason
    assert not data_path(config_with(augmentation_device="pil")).batched
    with pytest.raises(ValueError, match=r"benchmark.augmentation_device: cpu needs data that"):
        data_path(config_with(name="imagefolder", root=mixed, augmentation_device="cpu"))


def test_too_large_a_tree_stays_on_disk(trees, monkeypatch):
    monkeypatch.setattr("avalanche_sdlora.runner.in_memory.MAX_DECODED_BYTES", 1000)
    problem = in_memory_problem("imagefolder", trees[0])
    assert problem is not None and "take 0.0 GiB decoded, more than" in problem
    assert in_memory_problem("split_cifar100", None) is None


def test_loader_workers_and_pinned_memory_on_cuda(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda _: set(range(32)), raising=False)
    assert auto_workers(batched=False, device="cpu") == 0
    assert auto_workers(batched=False, device="cuda:0") == data_path_module.MAX_AUTO_WORKERS == 8
    assert auto_workers(batched=True, device="cuda") == 2
    monkeypatch.setenv("WORLD_SIZE", "8")  # torchrun: the CPUs are shared by 8 processes
    assert auto_workers(batched=False, device="cuda") == 4
    monkeypatch.setenv("WORLD_SIZE", "1")
    cuda = load_config(DEMO, ["experiment.device=cuda", "benchmark.augmentation_device=pil"])
    path = data_path(cuda)
    assert (path.batched, path.num_workers, path.pin_memory) == (False, 8, True)
    assert path.loader_arguments() == {
        "num_workers": 8,
        "pin_memory": True,
        "persistent_workers": True,
    }
    fixed = load_config(DEMO, ["experiment.device=cuda", "benchmark.num_workers=3"])
    assert data_path(fixed).transform_device == "cuda" and data_path(fixed).num_workers == 3


def test_bad_data_settings_exit_2_naming_them(tmp_path, capsys, trees):
    for overrides, message in [
        (["benchmark.augmentation_device=gpu"], "'gpu' is not allowed; choose from"),
        (["benchmark.num_workers=many"], 'benchmark.num_workers: must be an int >= 0 or "auto"'),
        (["benchmark.num_workers=-1"], 'benchmark.num_workers: must be an int >= 0 or "auto"'),
        (
            [
                "benchmark.name=imagefolder",
                f"benchmark.root={trees[1]}",
                "benchmark.n_experiences=2",
                "benchmark.augmentation_device=cpu",
                "benchmark.class_order_seed=null",
            ],
            "benchmark.augmentation_device: cpu needs data that can be decoded into memory",
        ),
    ]:
        settings = [arg for override in overrides for arg in ("--set", override)]
        out = tmp_path / "run"
        assert main(["--config", DEMO, "--output", str(out), "--dry-run", *settings]) == 2
        assert message in capsys.readouterr().err
        assert not out.exists()


def test_decoded_images_hold_the_pil_paths_pixels(trees):
    from torchvision.datasets import ImageFolder

    source = ImageFolder(trees[0] / "train")
    decoded = DecodedImages(source, [0, 3, 7], rgb_rendition("invert"))
    assert decoded.images.shape == (3, 3, 10, 12) and decoded.images.dtype == torch.uint8
    for position, index in enumerate([0, 3, 7]):
        image, target = source[index]
        expected = np.asarray(rgb_rendition("invert")(image))
        assert np.array_equal(decoded[position][0].permute(1, 2, 0).numpy(), expected)
        assert decoded[position][1] == target
    with pytest.raises(ValueError, match=r"benchmark\.augmentation_device: the images differ"):
        DecodedImages(ImageFolder(trees[1] / "train"), range(8), rgb_rendition())


def uint8_stream(experiences: int = 2, per_class: int = 12):
    """Classes of flat colours with noise, as uint8 images 3 x 20 x 20."""
    generator = torch.Generator().manual_seed(0)
    classes = 2 * experiences

    def split(count: int) -> TensorDataset:
        targets = torch.arange(classes).repeat_interleave(count)
        colours = torch.linspace(30, 220, classes)[targets].view(-1, 1, 1, 1)
        noise = torch.randint(-20, 21, (len(targets), 3, 20, 20), generator=generator)
        dataset = TensorDataset((colours + noise).clamp(0, 255).to(torch.uint8), targets)
        dataset.targets = targets.tolist()
        return dataset

    return nc_benchmark(
        split(per_class),
        split(4),
        n_experiences=experiences,
        task_labels=False,
        fixed_class_order=list(range(classes)),
    )


def make(method: str, plugins: list):
    evaluator = EvaluationPlugin(accuracy_metrics(stream=True), loggers=[])
    common = {"train_mb_size": 8, "train_epochs": 1, "evaluator": evaluator, "plugins": plugins}
    if method == "sdlora":
        return SDLoRA(model=SDLoRAViT(make_small_vit(), rank=2), lr=0.01, **common)
    model = FineTunedViT(make_small_vit())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    criterion = torch.nn.CrossEntropyLoss()
    strategies = {
        "naive": lambda: Naive(model=model, optimizer=optimizer, criterion=criterion, **common),
        "ewc": lambda: EWC(
            model=model, optimizer=optimizer, criterion=criterion, ewc_lambda=1.0, **common
        ),
        "lwf": lambda: LwF(
            model=model,
            optimizer=optimizer,
            criterion=criterion,
            alpha=1.0,
            temperature=2.0,
            **common,
        ),
        "replay": lambda: Replay(
            model=model, optimizer=optimizer, criterion=criterion, mem_size=16, **common
        ),
    }
    return strategies[method]()


@pytest.mark.parametrize("method", ["sdlora", "naive", "ewc", "lwf", "replay"])
def test_every_strategy_trains_and_evaluates_on_the_batched_inputs(method):
    transforms = BatchTransforms((16, 16), MEAN, STD)
    plugin = BatchTransformPlugin(transforms, seed=3)
    strategy = make(method, [plugin, TimeSplitPlugin()])
    seen = []
    model = strategy.model
    model.register_forward_pre_hook(lambda _, args: seen.append((args[0].dtype, args[0].shape)))
    benchmark = uint8_stream()
    for experience in benchmark.train_stream:
        strategy.train(experience)
        strategy.eval(benchmark.test_stream)
    assert seen and {dtype for dtype, _ in seen} == {torch.float32}
    assert {tuple(shape[1:]) for _, shape in seen} == {(3, 16, 16)}
    # 3 batches of 8 per experience; EWC's importances ran the model on the experience's raw
    # images, 3 more batches each, through the same transforms
    assert plugin.batches == (12 if method == "ewc" else 6)
    assert len(model._forward_pre_hooks) == 1  # the plugin's hook is gone, the test's is left
    timer = next(p for p in strategy.plugins if isinstance(p, TimeSplitPlugin))
    assert timer.seconds["data"] > 0 and timer.seconds["forward_backward"] > 0


def test_a_float_batch_is_refused_with_the_reason():
    strategy = make("naive", [BatchTransformPlugin(BatchTransforms((16, 16), MEAN, STD))])
    datasets = []
    for count in (8, 4):
        dataset = TensorDataset(torch.rand(count, 3, 16, 16), torch.tensor([0, 1] * (count // 2)))
        dataset.targets = [0, 1] * (count // 2)
        datasets.append(dataset)
    benchmark = nc_benchmark(*datasets, n_experiences=1, task_labels=False)
    with pytest.raises(TypeError, match=r"transforms batches of uint8 images, got torch\.float32"):
        strategy.train(benchmark.train_stream[0])


def test_a_resume_on_the_batched_path_is_exact_and_the_time_is_split(tmp_path, monkeypatch, capsys):
    args = ["--config", DEMO, *SHRINK, "--set", "experiment.compare=[]"]
    assert main([*args, "--output", str(tmp_path / "plan"), "--dry-run"]) == 0
    assert "data: batched on cpu (auto: the images are decoded once" in capsys.readouterr().out
    assert main([*args, "--output", str(tmp_path / "whole")]) == 0
    crash_and_resume(args, tmp_path / "broken", monkeypatch)

    def run(folder):
        return json.loads((folder / "metrics.json").read_text())["methods"]["sdlora"]["seeds"]["0"]

    whole, resumed = run(tmp_path / "whole"), run(tmp_path / "broken")
    assert resumed["accuracy_matrix"] == whole["accuracy_matrix"]
    assert resumed["gate_trace"] == whole["gate_trace"]
    for record in whole["experiences"]:
        parts = record["data_seconds"] + record["forward_backward_seconds"]
        assert 0 < record["data_seconds"] < parts <= record["train_seconds"] * 1.001
        assert 0 < record["eval_seconds"] < record["wall_seconds"]


def test_a_run_recorded_before_the_setting_keeps_the_pil_path(tmp_path, capsys):
    recorded = load_config(DEMO)
    del recorded["benchmark"]["augmentation_device"]
    saved = tmp_path / "config.json"
    saved.write_text(json.dumps(recorded))
    assert read_config(saved)[0]["benchmark"]["augmentation_device"] == "auto"
    assert read_config(saved, recorded=True)[0]["benchmark"]["augmentation_device"] == "pil"
    assert main(["--resume", str(tmp_path), "--dry-run"]) == 0
    printed = capsys.readouterr().out
    assert '"augmentation_device": "pil"' in printed
    assert "data: PIL per image (benchmark.augmentation_device: pil)" in printed


def test_the_study_config_keeps_the_pil_path_its_results_were_made_with():
    study = load_config(str(Path(DEMO).parent / "tiny_imagenet.json"))
    assert study["benchmark"]["augmentation_device"] == "pil"
    assert study["benchmark"]["num_workers"] == "auto"  # 0 on the CPU, as before


def test_frozen_feature_methods_see_the_same_images_on_both_paths(tmp_path):
    """SimpleCIL draws nothing at random: its feature pass and evaluation on the batched path see
    the PIL path's evaluation images up to PIL's rounding, so its accuracies agree; RanPAC's
    first-session adaptation trains on the batched path's crops."""
    args = ["--config", DEMO, *SHRINK, "--set", "experiment.compare=[]", "--seed", "0"]

    def accuracies(method: str, device: str, *extra: str) -> list[list[float]]:
        out = tmp_path / f"{method}-{device}"
        settings = ["--set", f"experiment.strategy={method}"]
        settings += ["--set", f"benchmark.augmentation_device={device}", *extra]
        assert main([*args, "--output", str(out), *settings]) == 0
        metrics = json.loads((out / "metrics.json").read_text())["methods"][method]
        return metrics["seeds"]["0"]["accuracy_matrix"]

    pil, batched = accuracies("simplecil", "pil"), accuracies("simplecil", "auto")
    assert np.abs(np.asarray(pil) - np.asarray(batched)).max() <= 1.5
    adapted = accuracies(
        "ranpac", "auto", "--set", "baselines.ranpac.first_session_adaptation=true"
    )
    assert np.isfinite(adapted).all() and adapted[-1][-1] > 0
