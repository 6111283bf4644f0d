"""Benchmarks: offline Split CIFAR-100 from torchvision's layout, ImageFolder trees, digits, class order,
backbone transforms and the fast missing-dataset check."""

from __future__ import annotations

import pickle
import shutil
import socket
import struct
import time
from pathlib import Path

import dill
import numpy as np
import pytest
import timm
import torch
import torchvision.datasets.cifar
from PIL import Image
from streams import write_image_tree
from timm.models.vision_transformer import VisionTransformer
from torchvision import transforms
from torchvision.datasets import CIFAR100

from avalanche_sdlora.runner.streams import (
    BENCHMARKS,
    DatasetNotFoundError,
    backbone_transforms,
    check_dataset,
    class_order,
    make_benchmark,
    rgb_rendition,
)

CIFAR_TRAIN_PER_CLASS, CIFAR_TEST_PER_CLASS = 3, 2


class Py2Pickler(pickle._Pickler):
    """Writes ``str``/``bytes`` as Python 2 strings, as in the real CIFAR files (b'data' keys when loaded
    with ``encoding="bytes"``, 'data' with torchvision's ``encoding="latin1"``)."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_string(self, obj: str | bytes) -> None:
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = save_py2_string
    dispatch[bytes] = save_py2_string


def write_py2_pickle(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        Py2Pickler(f, protocol=2).dump(obj)


def cifar_split(per_class: int, batch_label: str) -> dict:
    """Every image is one flat grey level, ``2 * fine_label``, so a transformed image tells its class."""
    labels = [c for c in range(100) for _ in range(per_class)]
    data = np.repeat(np.array(labels, dtype=np.uint8)[:, None] * 2, 3072, axis=1)
    return {
        "batch_label": batch_label,
        "fine_labels": labels,
        "coarse_labels": [c // 5 for c in labels],
        "data": data,
        "filenames": [f"image_{i}.png" for i in range(len(labels))],
    }


@pytest.fixture(scope="module")
def fake_cifar100(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny CIFAR-100 in torchvision's on-disk format: <root>/cifar-100-python/{train,test,meta}."""
    root = tmp_path_factory.mktemp("cifar")
    folder = root / "cifar-100-python"
    folder.mkdir()
    write_py2_pickle(folder / "train", cifar_split(CIFAR_TRAIN_PER_CLASS, "training batch 1 of 1"))
    write_py2_pickle(folder / "test", cifar_split(CIFAR_TEST_PER_CLASS, "testing batch 1 of 1"))
    write_py2_pickle(
        folder / "meta",
        {
            "fine_label_names": [f"fine_{c}" for c in range(100)],
            "coarse_label_names": [f"coarse_{c}" for c in range(20)],
        },
    )
    return root


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the network was touched")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", refuse)


def small_vit(img_size: int = 32) -> VisionTransformer:
    return VisionTransformer(img_size=img_size, patch_size=4, embed_dim=32, depth=1, num_heads=2)


def pixel_values(x: torch.Tensor, transform: transforms.Compose) -> torch.Tensor:
    """Undo the final Normalize: the per-channel pixel values in 0..1."""
    normalize = transform.transforms[-1]
    mean, std = torch.tensor(normalize.mean), torch.tensor(normalize.std)
    return x * std[:, None, None] + mean[:, None, None]


def test_fake_cifar_is_in_torchvision_format_but_fails_its_md5(fake_cifar100, no_network):
    with open(fake_cifar100 / "cifar-100-python" / "train", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    assert sorted(raw) == [b"batch_label", b"coarse_labels", b"data", b"filenames", b"fine_labels"]
    assert raw[b"data"].shape == (300, 3072) and raw[b"data"].dtype == np.uint8
    with pytest.raises(RuntimeError, match="not found or corrupted"):
        CIFAR100(str(fake_cifar100), train=True, download=False)
    with pytest.raises(AssertionError, match="network"):  # what Avalanche's SplitCIFAR100 would do
        CIFAR100(str(fake_cifar100), train=True, download=True)


def test_split_cifar100_runs_offline_from_a_local_copy(fake_cifar100, no_network):
    train_transform, eval_transform = backbone_transforms(small_vit())
    order = class_order(100, seed=1993)
    started = time.perf_counter()
    benchmark = make_benchmark(
        "split_cifar100",
        root=fake_cifar100,
        n_experiences=10,
        order=order,
        train_transform=train_transform,
        eval_transform=eval_transform,
    )
    assert time.perf_counter() - started < 10
    assert len(benchmark.train_stream) == len(benchmark.test_stream) == 10
    assert benchmark.classes_order_original_ids == order
    for t, (train_exp, test_exp) in enumerate(
        zip(benchmark.train_stream, benchmark.test_stream, strict=True)
    ):
        assert sorted(train_exp.classes_in_this_experience) == list(range(10 * t, 10 * t + 10))
        assert sorted(test_exp.classes_in_this_experience) == list(range(10 * t, 10 * t + 10))
        assert benchmark.original_classes_in_exp[t] == set(order[10 * t : 10 * t + 10])
        assert len(train_exp.dataset) == 10 * CIFAR_TRAIN_PER_CLASS
        assert len(test_exp.dataset) == 10 * CIFAR_TEST_PER_CLASS
        assert set(train_exp.task_labels) == {0}

    dataset = benchmark.train_stream[0].dataset
    for x, y, _ in (dataset.eval()[i] for i in range(len(dataset))):
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        # label y is original class order[y], whose images are grey level 2 * order[y]
        torch.testing.assert_close(
            pixel_values(x, eval_transform),
            torch.full_like(x, 2 * order[y] / 255),
            atol=2e-3,
            rtol=0,
        )
    x, y, _ = dataset.train()[0]  # flat images stay flat under crop and flip
    assert x.shape == (3, 32, 32)
    torch.testing.assert_close(
        pixel_values(x, train_transform), torch.full_like(x, 2 * order[y] / 255), atol=2e-3, rtol=0
    )


def test_cifar_checkpoints_store_the_path_not_the_images(fake_cifar100, no_network):
    transform, _ = backbone_transforms(small_vit(), train_augmentation=False)
    benchmark = make_benchmark(
        "split_cifar100",
        root=fake_cifar100,
        n_experiences=2,
        order=class_order(100),
        num_classes=4,
        train_transform=transform,
        eval_transform=transform,
    )
    dataset = benchmark.train_stream[1].dataset.eval()
    pickled = dill.dumps(dataset)
    images_bytes = 300 * 3072
    assert len(pickled) < images_bytes / 10
    restored = dill.loads(pickled)
    assert list(restored.targets) == list(dataset.targets) == [2] * 3 + [3] * 3
    torch.testing.assert_close(restored[4][0], dataset[4][0])


def test_decoded_cifar_holds_the_pil_paths_pixels_and_checkpoints_only_the_path(
    fake_cifar100, no_network
):
    order = class_order(100, seed=1993)
    benchmark = make_benchmark(
        "split_cifar100",
        root=fake_cifar100,
        n_experiences=10,
        order=order,
        train_transform=None,
        eval_transform=None,
        decode=rgb_rendition("invert"),
    )
    dataset = benchmark.train_stream[1].dataset.eval()
    for x, y, _ in (dataset[i] for i in range(len(dataset))):
        assert x.dtype == torch.uint8 and x.shape == (3, 32, 32)
        assert torch.equal(x, torch.full_like(x, 255 - 2 * order[y]))  # grey 2 * class, inverted
    pickled = dill.dumps(dataset)
    assert len(pickled) < 300 * 3072 / 10  # the 300 decoded images would take 921,600 bytes
    restored = dill.loads(pickled)
    assert list(restored.targets) == list(dataset.targets)
    torch.testing.assert_close(restored[4][0], dataset[4][0])


@pytest.fixture
def image_tree(tmp_path: Path) -> Path:
    """train/ and val/ with 4 class folders of 5 flat grey PNGs each (class k, image i: 50 * k + 20 + 2 * i)."""
    return write_image_tree(tmp_path, per_class=5)


def test_imagefolder_follows_the_class_order_with_class_and_sample_limits(image_tree):
    train_transform, eval_transform = backbone_transforms(small_vit(16))
    order = class_order(4, order=[2, 0, 3, 1])
    benchmark = make_benchmark(
        "imagefolder",
        root=image_tree,
        n_experiences=3,
        order=order,
        num_classes=3,
        train_per_class=2,
        train_transform=train_transform,
        eval_transform=eval_transform,
    )
    assert benchmark.classes_order_original_ids == [2, 0, 3]
    assert [exp.classes_in_this_experience for exp in benchmark.train_stream] == [[0], [1], [2]]
    assert [len(exp.dataset) for exp in benchmark.train_stream] == [2, 2, 2]
    assert [len(exp.dataset) for exp in benchmark.test_stream] == [5, 5, 5]
    for stream in (benchmark.train_stream, benchmark.test_stream):
        for exp in stream:
            dataset = exp.dataset.eval()
            for x, y, _ in (dataset[i] for i in range(len(dataset))):
                assert x.shape == (3, 16, 16)
                grey = pixel_values(x, eval_transform) * 255
                assert grey.max() - grey.min() < 0.5
                assert 50 * order[y] + 19.5 < grey.mean() < 50 * order[y] + 28.5


def test_imagefolder_train_subsample_is_seeded(image_tree):
    transform, _ = backbone_transforms(small_vit(16), train_augmentation=False)

    def kept_images(seed: int) -> list[int]:
        """The grey levels of the kept training images, which identify them."""
        benchmark = make_benchmark(
            "imagefolder",
            root=image_tree,
            n_experiences=4,
            order=class_order(4),
            train_per_class=2,
            seed=seed,
            train_transform=transform,
            eval_transform=transform,
        )
        levels = []
        for exp in benchmark.train_stream:
            assert len(exp.dataset) == 2
            levels += [
                round(float(pixel_values(x, transform).mean()) * 255) for x, _, _ in exp.dataset
            ]
        return levels

    assert kept_images(0) == kept_images(0)
    assert kept_images(0) != kept_images(1)


def test_imagefolder_rejects_mismatched_splits_and_indivisible_class_counts(image_tree):
    transform, _ = backbone_transforms(small_vit(16), train_augmentation=False)
    kwargs = {"train_transform": transform, "eval_transform": transform, "order": [0, 1, 2, 3]}
    with pytest.raises(
        ValueError,
        match=r"must split the 3 classes into equal experiences \(one of \[1, 3\]\), got 2",
    ):
        make_benchmark("imagefolder", root=image_tree, n_experiences=2, num_classes=3, **kwargs)
    (image_tree / "val" / "class_3").rename(image_tree / "val" / "class_9")
    with pytest.raises(ValueError, match=r"same class folders.*\['class_3', 'class_9'\]"):
        make_benchmark("imagefolder", root=image_tree, n_experiences=2, **kwargs)


def test_digits_ten_classes_in_five_experiences():
    train_transform, eval_transform = backbone_transforms(small_vit())
    benchmark = make_benchmark(
        "digits",
        root=None,
        n_experiences=5,
        order=class_order(10, seed=1993),
        train_transform=train_transform,
        eval_transform=eval_transform,
    )
    train_sizes = [len(exp.dataset) for exp in benchmark.train_stream]
    test_sizes = [len(exp.dataset) for exp in benchmark.test_stream]
    assert sum(train_sizes) + sum(test_sizes) == 1797
    assert sum(test_sizes) == 360  # stratified 20 %
    assert [exp.classes_in_this_experience for exp in benchmark.train_stream] == [
        [0, 1],
        [2, 3],
        [4, 5],
        [6, 7],
        [8, 9],
    ]
    dataset = benchmark.train_stream[0].dataset
    x, _, _ = dataset.eval()[0]
    assert x.shape == (3, 32, 32)
    torch.testing.assert_close(dataset.eval()[0][0], x)  # eval: deterministic
    augmented = [dataset.train()[0][0] for _ in range(4)]  # train: random crops and flips
    assert all(a.shape == (3, 32, 32) for a in augmented)
    assert not all(torch.equal(augmented[0], a) for a in augmented[1:])
    rgb = pixel_values(x, eval_transform)
    torch.testing.assert_close(rgb[0], rgb[1], atol=1e-5, rtol=0)  # grayscale copied to R, G, B
    assert rgb.max() - rgb.min() > 0.5  # a real digit, not a flat image


def test_class_order_seed_explicit_and_invalid():
    assert class_order(100, seed=1993) == np.random.RandomState(1993).permutation(100).tolist()
    assert class_order(100, seed=1993)[:5] == [68, 56, 78, 8, 23]
    assert class_order(5) == [0, 1, 2, 3, 4]
    assert class_order(4, seed=7, order=[3, 1, 0, 2]) == [3, 1, 0, 2]
    assert class_order(3, order=np.array([2, 0, 1])) == [2, 0, 1]
    with pytest.raises(ValueError, match=r"repeated: \[1\]; missing: \[3\]"):
        class_order(4, order=[0, 1, 1, 2])
    with pytest.raises(ValueError, match=r"out of range: \[4\]"):
        class_order(4, order=[0, 1, 2, 4])
    with pytest.raises(ValueError, match="integer class ids"):
        class_order(2, order=[0, 1.0])


def test_transforms_of_the_paper_backbone():
    with torch.device("meta"):  # the full ViT-B/16 and its timm config, without allocating weights
        timm_default = timm.create_model("vit_base_patch16_224.augreg2_in21k_ft_in1k")
        backbone = timm.create_model(  # as exps/c100.json configures it
            "vit_base_patch16_224.augreg2_in21k_ft_in1k", pretrained_cfg_overlay={"crop_pct": 0.875}
        )
    assert backbone_transforms(timm_default)[1].transforms[1].size == 248  # timm's crop_pct 0.9
    train_transform, eval_transform = backbone_transforms(backbone)
    _, resize, crop, _, normalize = eval_transform.transforms
    assert resize.size == 256 and resize.interpolation == transforms.InterpolationMode.BICUBIC
    assert crop.size == (224, 224)
    assert normalize.mean == normalize.std == (0.5, 0.5, 0.5)
    _, random_crop, flip, _, train_normalize = train_transform.transforms
    assert random_crop.size == (224, 224) and random_crop.scale == (0.05, 1.0)
    assert random_crop.interpolation == transforms.InterpolationMode.BICUBIC
    assert isinstance(flip, transforms.RandomHorizontalFlip)
    assert train_normalize.mean == (0.5, 0.5, 0.5)
    plain_train, _ = backbone_transforms(backbone, train_augmentation=False)
    assert plain_train is not train_transform and str(plain_train) == str(eval_transform)


def test_transforms_of_a_small_vit_use_its_input_size():
    train_transform, eval_transform = backbone_transforms(small_vit())
    image = Image.new("L", (50, 40), 128)
    assert eval_transform(image).shape == (3, 32, 32)
    assert train_transform(image).shape == (3, 32, 32)


def test_missing_cifar_fails_fast_naming_the_path(tmp_path, no_network):
    started = time.perf_counter()
    with pytest.raises(DatasetNotFoundError) as error:
        check_dataset("split_cifar100", tmp_path)
    assert time.perf_counter() - started < 0.5
    assert str(tmp_path / "cifar-100-python" / "train") in str(error.value)
    assert "{train,test,meta}" in str(error.value)
    with pytest.raises(DatasetNotFoundError):
        make_benchmark(
            "split_cifar100",
            root=tmp_path,
            n_experiences=10,
            order=class_order(100),
            train_transform=None,
            eval_transform=None,
        )


def test_missing_imagefolder_split_fails_fast_naming_the_path(image_tree):
    check_dataset("imagefolder", image_tree)
    shutil.rmtree(image_tree / "val")
    for _ in range(2):  # no val/ at all, then an empty val/
        started = time.perf_counter()
        with pytest.raises(DatasetNotFoundError, match="train/<class>/<image>") as error:
            check_dataset("imagefolder", image_tree)
        assert time.perf_counter() - started < 0.5
        assert str(image_tree / "val") in str(error.value)
        (image_tree / "val").mkdir(exist_ok=True)
    with pytest.raises(DatasetNotFoundError, match="needs a dataset root"):
        check_dataset("imagefolder", None)


def test_digits_needs_no_data_and_unknown_names_are_refused():
    check_dataset("digits", None)
    with pytest.raises(ValueError, match=", ".join(BENCHMARKS)):
        check_dataset("cifar10", None)


def test_dataset_classes(tmp_path):
    from avalanche_sdlora.runner.streams import dataset_classes

    for name in ("a", "b", "c"):
        (tmp_path / "train" / name).mkdir(parents=True)
    (tmp_path / "train" / "notes.txt").write_text("not a class")
    assert dataset_classes("imagefolder", tmp_path) == 3
    assert dataset_classes("split_cifar100", None) == 100
    assert dataset_classes("digits", None) == 10
