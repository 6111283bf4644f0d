"""The runner's class-incremental benchmarks: Split CIFAR-100, any train/val ImageFolder tree, digits.

Each is an Avalanche ``nc_benchmark`` scenario without task labels whose experiences follow an explicit
class order (``class_order``): experience ``t`` holds the classes ``order[t*k:(t+1)*k]``. Labels are
remapped to positions in that order (``class_ids_from_zero_from_first_exp``), so experience ``t`` carries
labels ``t*k .. (t+1)*k - 1`` and a growing head adds its units in experience order; the original ids are
in ``benchmark.classes_order_original_ids`` (label ``i`` is original class ``order[i]``).

Missing data fails fast: ``check_dataset`` runs before anything is built and never touches the network.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import socket
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from operator import methodcaller
from pathlib import Path
from typing import ClassVar

import numpy as np
import timm.data
import torch
from avalanche.benchmarks import NCScenario, nc_benchmark
from avalanche.benchmarks.datasets import default_dataset_location
from avalanche.benchmarks.utils.utils import as_classification_dataset
from PIL import Image, ImageFilter, ImageOps, UnidentifiedImageError
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from timm.data.transforms import str_to_interp_mode
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.datasets import CIFAR100, ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from avalanche_sdlora.batch_transforms import BatchTransforms
from avalanche_sdlora.runner.checkpoints import checkpoint_by_constructor
from avalanche_sdlora.runner.in_memory import DecodedImages

BENCHMARKS = ("split_cifar100", "imagefolder", "digits")
SHOWN = 5
"""How many bad files a message names (then the count of the others)."""


def _grayscale(image: Image.Image) -> Image.Image:
    return ImageOps.grayscale(image).convert("RGB")


def _contour(image: Image.Image) -> Image.Image:
    return ImageOps.grayscale(image).filter(ImageFilter.CONTOUR).convert("RGB")


def _invert(image: Image.Image) -> Image.Image:
    return ImageOps.invert(image)


def _solarize(image: Image.Image) -> Image.Image:
    return ImageOps.solarize(image, threshold=128)


def _posterize(image: Image.Image) -> Image.Image:
    return ImageOps.posterize(image, bits=2)


def _lowres(image: Image.Image) -> Image.Image:
    small = image.resize((image.width // 4, image.height // 4), Image.Resampling.BOX)
    return small.resize(image.size, Image.Resampling.BICUBIC)


RENDITIONS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "grayscale": _grayscale,
    "contour": _contour,
    "invert": _invert,
    "solarize": _solarize,
    "posterize": _posterize,
    "lowres": _lowres,
}
"""Fixed image renditions that shift a stream away from the pretraining images (train and test
alike, before any augmentation): ``grayscale``; ``contour``, a pencil-sketch line drawing (PIL's
CONTOUR filter on the grayscale image); ``invert``, the photographic negative; ``solarize``, every
channel value of 128 or more inverted; ``posterize``, 4 levels per channel (2 bits); ``lowres``, a
quarter of the resolution upsampled back (bicubic), as the paper's 32 px CIFAR images are upsampled
to ViT-B's 224."""


CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"


class DatasetNotFoundError(FileNotFoundError):
    """Raised before any work when a dataset is missing; message says where to put it."""


class LocalCIFAR100(CIFAR100):
    """torchvision's ``CIFAR100`` read from a local copy only: checks presence, not md5; never downloads.

    Avalanche's ``SplitCIFAR100`` builds ``CIFAR100(root, download=True)``, which downloads (hangs
    offline) whenever a file is missing or its md5 differs, and cannot be handed other datasets. With
    no md5 (``None``) torchvision's integrity check only tests that the file exists, and ``download``
    is always off, so a missing file raises instead of reaching the network. Data, targets and images
    are torchvision's own.
    """

    train_list: ClassVar[list[list[str | None]]] = [["train", None]]
    test_list: ClassVar[list[list[str | None]]] = [["test", None]]
    meta: ClassVar[dict[str, str | None]] = {**CIFAR100.meta, "md5": None}

    def __init__(
        self,
        root: str | Path,
        train: bool = True,
        transform: Callable | None = None,
        target_transform: Callable | None = None,
    ) -> None:
        super().__init__(
            root,
            train=train,
            transform=transform,
            target_transform=target_transform,
            download=False,
        )


checkpoint_by_constructor(  # the path, not the images (as Avalanche's CIFAR100)
    LocalCIFAR100,
    lambda obj: {
        "root": obj.root,
        "train": obj.train,
        "transform": obj.transform,
        "target_transform": obj.target_transform,
    },
)


class GrayImages(Dataset):
    """Grayscale ``uint8`` images (N x H x W) served as PIL images with integer ``targets``."""

    def __init__(self, images: np.ndarray, targets: Sequence[int], classes: list[str]) -> None:
        self.images = images
        self.targets = [int(t) for t in targets]
        self.classes = classes

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        return Image.fromarray(self.images[index]), self.targets[index]


def _cifar_root(root: str | Path | None) -> Path:
    return Path(root) if root is not None else default_dataset_location("cifar100")


def check_dataset(name: str, root: str | Path | None) -> None:
    """Check in milliseconds that the benchmark's data is on disk, before anything is built.

    Raises ``DatasetNotFoundError`` naming the expected path and layout, ``ValueError`` for an unknown
    benchmark. ``digits`` ships with scikit-learn and needs nothing.
    """
    if name not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {name!r}: choose one of {', '.join(BENCHMARKS)}")
    if name == "split_cifar100":
        folder = _cifar_root(root) / LocalCIFAR100.base_folder
        files = [f for f, _ in LocalCIFAR100.train_list + LocalCIFAR100.test_list]
        files.append(LocalCIFAR100.meta["filename"])
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise DatasetNotFoundError(
                f"CIFAR-100 not found: {', '.join(str(folder / f) for f in missing)} missing. "
                f"Expected torchvision's layout {folder}/{{{','.join(files)}}}: extract "
                f"{CIFAR100_URL} into {folder.parent}, or set benchmark.download to true to let "
                "torchvision download it (no download is attempted otherwise)."
            )
    elif name == "imagefolder":
        layout = "<root>/train/<class>/<image> and <root>/val/<class>/<image>"
        if root is None:
            raise DatasetNotFoundError(f"the imagefolder benchmark needs a dataset root: {layout}")
        for split in ("train", "val"):
            folder = Path(root) / split
            if not folder.is_dir() or not any(p.is_dir() for p in folder.iterdir()):
                raise DatasetNotFoundError(
                    f"no class folders in {folder}: the imagefolder benchmark expects {layout} "
                    f"with <root> = {root}"
                )


def cache_dir() -> Path:
    """The runner's cache: ``$XDG_CACHE_HOME/avalanche_sdlora``, by default
    ``~/.cache/avalanche_sdlora``; never a data folder, which may be read-only."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(base) if os.path.isabs(base) else Path.home() / ".cache") / "avalanche_sdlora"


def _class_mismatch(train: Sequence[str], val: Sequence[str]) -> str | None:
    """What is wrong when train/ and val/ hold different class folders (``None`` when they agree)."""
    only = sorted(set(train) ^ set(val))
    if not only:
        return None
    return f"train/ and val/ must hold the same class folders; in only one of them: {only}"


def _named(items: Sequence[str]) -> str:
    """The first :data:`SHOWN` of ``items``, and how many more there are."""
    more = f", and {len(items) - SHOWN} more" if len(items) > SHOWN else ""
    return ", ".join(items[:SHOWN]) + more


def _stamp(path: str) -> list[int] | None:
    """Size and modification time of a file, which tell a changed file (``None``: unreadable)."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return [stat.st_size, stat.st_mtime_ns]


def _decode_problem(path: Path) -> str | None:
    """Why the image at ``path`` cannot be trained on (``None`` when it decodes). It is decoded in
    full, as training does: ``verify()`` alone passes a truncated JPEG."""
    try:
        with Image.open(path) as image:
            image.load()
    except UnidentifiedImageError:
        return f"{path} (not an image)"
    except Exception as error:  # whatever PIL raises here, training would raise too
        return f"{path} ({type(error).__name__}: {error})"
    return None


def _verified(cache: Path, root: Path) -> dict[str, list[int]]:
    """The images of ``root`` that decoded in an earlier run, with their :func:`_stamp`."""
    try:
        record = json.loads(cache.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(record, dict) or record.get("root") != str(root):
        return {}
    return record.get("files", {})


def _undecodable(root: Path, stamps: dict[str, list[int] | None]) -> list[str]:
    """The images that do not decode, each with why, of ``stamps`` (paths relative to ``root``, with
    their stamps). Those that decode are recorded under :func:`cache_dir`, so a later run decodes
    only new or changed files; a cache that cannot be read or written is ignored."""
    key = hashlib.sha256(str(root).encode()).hexdigest()[:16]
    cache = cache_dir() / "verified_images" / f"{key}.json"
    verified = _verified(cache, root)
    unchecked = [name for name, stamp in stamps.items() if not stamp or verified.get(name) != stamp]
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        found = pool.map(_decode_problem, (root / name for name in unchecked))
        problems = dict(zip(unchecked, found, strict=True))
    good = {name: stamp for name, stamp in stamps.items() if stamp and problems.get(name) is None}
    if good != verified:
        with contextlib.suppress(OSError):  # no cache: the next run decodes every image again
            cache.parent.mkdir(parents=True, exist_ok=True)
            partial = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
            partial.write_text(json.dumps({"root": str(root), "files": good}))
            os.replace(partial, cache)
    return [problem for problem in problems.values() if problem is not None]


def image_tree_problems(root: str | Path) -> list[str]:
    """What would stop an ImageFolder benchmark mid-run, each named under ``benchmark.root``: train/
    and val/ class folders that differ, class folders without an image, and images that do not
    decode (a non-image, a truncated file), the first few of each by path.

    Every image ImageFolder would read is decoded once, on all cores, and remembered while it stays
    unchanged (:func:`_undecodable`).
    """
    root = Path(root).resolve()
    classes = {split: find_classes(root / split)[0] for split in ("train", "val")}
    mismatch = _class_mismatch(classes["train"], classes["val"])
    problems = [] if mismatch is None else [f"benchmark.root: {root}: {mismatch}"]
    empty, stamps = [], {}
    for split, names in classes.items():
        index = {name: i for i, name in enumerate(names)}
        samples = make_dataset(root / split, index, IMG_EXTENSIONS, allow_empty=True)
        filled = {i for _, i in samples}
        empty += [str(root / split / name) for name, i in index.items() if i not in filled]
        stamps.update((path[len(str(root)) + 1 :], _stamp(path)) for path, _ in samples)
    if empty:
        problems.append(
            f"benchmark.root: {len(empty)} class folder(s) hold no image "
            f"({', '.join(IMG_EXTENSIONS)}): {_named(empty)}; ImageFolder needs at least one in "
            "each: add images, or remove the class from both train/ and val/"
        )
    if bad := _undecodable(root, stamps):
        problems.append(
            f"benchmark.root: {len(bad)} image(s) cannot be read: {_named(bad)}; repair or "
            "delete them"
        )
    return problems


def download_cifar100(root: str | Path | None, timeout: float = 60.0) -> None:
    """Download and extract CIFAR-100 with torchvision (which checks the archive's md5) into
    ``root``. Every network read times out after ``timeout`` seconds, so an offline machine gets a
    ``DatasetNotFoundError`` instead of a hang."""
    folder = _cifar_root(root)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)
    try:
        CIFAR100(str(folder), train=True, download=True)
    except (OSError, RuntimeError) as error:  # URLError and timeouts are OSErrors
        raise DatasetNotFoundError(
            f"benchmark.download: could not download CIFAR-100 from {CIFAR100_URL} into {folder} "
            f"({type(error).__name__}: {error}); offline, extract the archive there yourself and "
            "set benchmark.download to false"
        ) from error
    finally:
        socket.setdefaulttimeout(previous)


def dataset_classes(name: str, root: str | Path | None) -> int:
    """How many classes the benchmark's dataset has (an ImageFolder tree: its class folders)."""
    if name == "split_cifar100":
        return 100
    if name == "digits":
        return 10
    return sum(1 for folder in (Path(root) / "train").iterdir() if folder.is_dir())


def class_order(
    num_classes: int, seed: int | None = None, order: Sequence[int] | None = None
) -> list[int]:
    """The class order of a run: ``order`` if given (validated), else the SD-LoRA authors' toolbox order.

    The toolbox order is ``numpy.random.RandomState(seed).permutation(num_classes)`` (seed 1993 is the
    paper's); with neither ``order`` nor ``seed`` the classes keep their dataset order.
    """
    if order is None:
        if seed is None:
            return list(range(num_classes))
        return np.random.RandomState(seed).permutation(num_classes).tolist()
    if not all(isinstance(c, (int, np.integer)) and not isinstance(c, bool) for c in order):
        raise ValueError(f"class order must hold integer class ids, got {list(order)}")
    order = [int(c) for c in order]
    counts = Counter(order)
    problems = {
        "out of range": sorted(c for c in counts if not 0 <= c < num_classes),
        "repeated": sorted(c for c, n in counts.items() if n > 1),
        "missing": sorted(set(range(num_classes)) - counts.keys()),
    }
    if any(problems.values()):
        found = "; ".join(f"{what}: {ids}" for what, ids in problems.items() if ids)
        raise ValueError(
            f"class order must be a permutation of 0..{num_classes - 1} (each class once): {found}"
        )
    return order


def initial_classes_problem(used: int, n_experiences: int, initial_classes: int) -> str | None:
    """What is wrong with a first experience of ``initial_classes`` of the ``used`` classes when the
    others are split evenly, at least one each, over the other ``n_experiences - 1`` experiences
    (``None`` when they divide)."""
    rest = n_experiences - 1
    fits = (
        [i for i in range(1, used + 1) if (used - i) % rest == 0 and used - i >= rest]
        if rest
        else [used]
    )
    if initial_classes in fits:
        return None
    return (
        f"benchmark.initial_classes: the other {rest} experiences must share the rest of the "
        f"{used} classes evenly, at least one each (one of {fits}), got {initial_classes}"
    )


def split_problems(
    total: int,
    n_experiences: int,
    order: Sequence[int] | None,
    num_classes: int | None,
    initial_classes: int | None = None,
) -> list[str]:
    """What is wrong with splitting a dataset of ``total`` classes as configured, each problem named
    by its ``benchmark.*`` setting (empty when the split works)."""
    problems = []
    if order is not None:
        try:
            class_order(total, order=order)
        except ValueError as error:
            problems.append(f"benchmark.class_order: {error}")
    if num_classes is not None and not 1 <= num_classes <= total:
        problems.append(
            f"benchmark.num_classes: must be in 1..{total} for this dataset, got {num_classes}"
        )
        return problems
    used = total if num_classes is None else num_classes
    if initial_classes is not None:
        if (problem := initial_classes_problem(used, n_experiences, initial_classes)) is not None:
            problems.append(problem)
    elif used % n_experiences:
        divisors = [k for k in range(1, used + 1) if used % k == 0]
        problems.append(
            f"benchmark.n_experiences: must split the {used} classes into equal experiences "
            f"(one of {divisors}), got {n_experiences}"
        )
    return problems


@dataclass(frozen=True)
class InputConfig:
    """What a backbone's timm data config says about its input (see :func:`input_config`)."""

    size: tuple[int, int]
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pct: float


def input_config(backbone: torch.nn.Module) -> InputConfig:
    """The input size (the backbone's own ``patch_embed.img_size`` when it has one, as a bare
    ``VisionTransformer``'s config reports the 224 px default), interpolation, mean/std and the
    eval crop ratio ``crop_pct``, from the backbone's timm data config (the paper's Resize(256) +
    CenterCrop(224) is ``crop_pct`` 0.875: ``exps/c100.json`` sets it through
    ``backbone.pretrained_cfg``, as timm's own default for that backbone is 0.9)."""
    config = timm.data.resolve_model_data_config(backbone)
    patch_embed = getattr(backbone, "patch_embed", None)
    size = tuple(getattr(patch_embed, "img_size", None) or config["input_size"][-2:])
    return InputConfig(
        size=size,
        interpolation=config["interpolation"],
        mean=tuple(config["mean"]),
        std=tuple(config["std"]),
        crop_pct=config["crop_pct"],
    )


def rgb_rendition(rendition: str | None = None) -> Callable[[Image.Image], Image.Image]:
    """The per-image steps before any augmentation: RGB (so grayscale data, digits, works with
    any backbone), then ``rendition`` (one of :data:`RENDITIONS`) when one is given."""
    return transforms.Compose(
        [
            transforms.Lambda(methodcaller("convert", "RGB")),
            *([transforms.Lambda(RENDITIONS[rendition])] if rendition else []),
        ]
    )


def backbone_transforms(
    backbone: torch.nn.Module,
    train_augmentation: bool = True,
    rendition: str | None = None,
    crop_scale: tuple[float, float] = (0.05, 1.0),
) -> tuple[Callable, Callable]:
    """``(train_transform, eval_transform)`` on PIL images (the PIL path), from the backbone's
    :func:`input_config`. Eval: Resize(``floor(size / crop_pct)``) + CenterCrop. Train:
    RandomResizedCrop(scale=``crop_scale``) + horizontal flip, the paper's augmentation; without
    ``train_augmentation`` it is the eval transform. Both start with :func:`rgb_rendition`.
    """
    config = input_config(backbone)
    interpolation = str_to_interp_mode(config.interpolation)
    to_tensor = [transforms.ToTensor(), transforms.Normalize(config.mean, config.std)]
    eval_transform = transforms.Compose(
        [
            rgb_rendition(rendition),
            transforms.Resize(
                math.floor(config.size[0] / config.crop_pct), interpolation=interpolation
            ),
            transforms.CenterCrop(config.size),
            *to_tensor,
        ]
    )
    if not train_augmentation:
        return eval_transform, eval_transform
    train_transform = transforms.Compose(
        [
            rgb_rendition(rendition),
            transforms.RandomResizedCrop(
                config.size, scale=crop_scale, interpolation=interpolation
            ),
            transforms.RandomHorizontalFlip(),
            *to_tensor,
        ]
    )
    return train_transform, eval_transform


def batch_transforms(
    backbone: torch.nn.Module,
    train_augmentation: bool = True,
    crop_scale: tuple[float, float] = (0.05, 1.0),
) -> BatchTransforms:
    """The batched path's counterpart of :func:`backbone_transforms`, on uint8 batches that
    :func:`rgb_rendition` made (:class:`~avalanche_sdlora.runner.in_memory.DecodedImages`)."""
    config = input_config(backbone)
    return BatchTransforms(
        size=config.size,
        mean=config.mean,
        std=config.std,
        interpolation=config.interpolation,
        crop_pct=config.crop_pct,
        scale=tuple(crop_scale),
        augment=train_augmentation,
    )


def _load(name: str, root: str | Path | None, seed: int) -> tuple[Dataset, Dataset]:
    """Raw (train, test) datasets of PIL images with ``targets`` and ``classes``."""
    if name == "split_cifar100":
        folder = _cifar_root(root)
        return LocalCIFAR100(folder, train=True), LocalCIFAR100(folder, train=False)
    if name == "imagefolder":
        train, val = ImageFolder(Path(root) / "train"), ImageFolder(Path(root) / "val")
        if (mismatch := _class_mismatch(train.classes, val.classes)) is not None:
            raise ValueError(f"{root}: {mismatch}")
        return train, val
    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)
    train_idx, test_idx = train_test_split(
        np.arange(len(images)), test_size=0.2, stratify=digits.target, random_state=seed
    )
    classes = [str(c) for c in digits.target_names]
    return (
        GrayImages(images[train_idx], digits.target[train_idx], classes),
        GrayImages(images[test_idx], digits.target[test_idx], classes),
    )


def _select(
    targets: Sequence[int], classes: Sequence[int], per_class: int | None, seed: int
) -> list[int]:
    """Indices of the samples of ``classes``, at most ``per_class`` each (seeded draw), in dataset order."""
    targets = np.asarray(targets)
    rng = np.random.RandomState(seed)
    chosen = []
    for c in classes:
        indices = np.flatnonzero(targets == c)
        if per_class is not None and len(indices) > per_class:
            indices = rng.choice(indices, per_class, replace=False)
        chosen.append(indices)
    return np.sort(np.concatenate(chosen)).tolist()


def _validation_split(
    targets: Sequence[int], classes: Sequence[int], per_class: int, seed: int
) -> tuple[list[int], list[int]]:
    """``(train, validation)`` indices of ``classes``: ``per_class`` samples of each class (the
    seeded draw of :func:`_select`) are held out; the rest train. Raises when a class would have no
    training sample left."""
    counts = Counter(np.asarray(targets).tolist())
    for c in classes:
        if counts[c] <= per_class:
            raise ValueError(
                f"benchmark.validation_per_class: class {c} has {counts[c]} training samples, "
                f"so holding out {per_class} leaves none to train on"
            )
    held_out = _select(targets, classes, per_class, seed)
    return np.setdiff1d(_select(targets, classes, None, seed), held_out).tolist(), held_out


def make_benchmark(
    name: str,
    *,
    root: str | Path | None,
    n_experiences: int,
    order: list[int],
    train_transform: Callable | None,
    eval_transform: Callable | None,
    num_classes: int | None = None,
    train_per_class: int | None = None,
    validation_per_class: int | None = None,
    initial_classes: int | None = None,
    seed: int = 0,
    decode: Callable[[Image.Image], Image.Image] | None = None,
) -> NCScenario:
    """A class-incremental Avalanche benchmark (no task labels) over ``order[:num_classes]``.

    ``order`` is the full class order (a permutation of the dataset's classes, see ``class_order``);
    the first ``num_classes`` of them (default: all) are split into ``n_experiences`` equal experiences,
    or, with ``initial_classes``, a first experience of that many classes and the rest split evenly
    over the other experiences (B50 Inc10: 50 classes, then 5 experiences of 10).
    ``train_per_class`` keeps at most that many training samples per class (seeded draw); the test sets
    are kept whole. ``validation_per_class`` holds that many training samples of each class out
    (seeded draw, before ``train_per_class``) and makes them the test stream in place of the test
    set: settings are chosen on it, never on test images. Labels are positions in ``order`` (see the module docstring). ``train_transform``
    and ``eval_transform`` are Avalanche's ``train``/``eval`` transform groups (``dataset.train()`` /
    ``.eval()``), applied to PIL images; with ``decode`` (e.g. :func:`rgb_rendition`), every image
    used is decoded once through it into one uint8 tensor (:class:`DecodedImages`) and the
    transforms, if any, apply to uint8 image tensors.

    - ``split_cifar100``: CIFAR-100 from ``root`` (default: Avalanche's ``cifar100`` location) in
      torchvision's layout, via ``LocalCIFAR100``, never downloaded. ``nc_benchmark`` is called with
      ``SplitCIFAR100``'s own settings, since ``SplitCIFAR100`` only reads through ``CIFAR100(download=True)``.
    - ``imagefolder``: ``root/train`` and ``root/val`` ImageFolder trees with the same class folders
      (class ids: the sorted folder names' positions).
    - ``digits``: scikit-learn's 8x8 digits (1797 images, 10 classes) as 0..255 grayscale PIL images,
      a stratified 80/20 train/test split drawn with ``seed``.
    """
    check_dataset(name, root)
    if n_experiences < 1:
        raise ValueError(f"n_experiences must be at least 1, got {n_experiences}")
    if train_per_class is not None and train_per_class < 1:
        raise ValueError(
            f"train_per_class must be at least 1 (or None for all), got {train_per_class}"
        )
    train, test = _load(name, root, seed)
    problems = split_problems(
        len(train.classes), n_experiences, order, num_classes, initial_classes
    )
    if problems:
        raise ValueError("; ".join(problems))
    classes = order[:num_classes]  # None: all
    if validation_per_class is None:
        train_indices = _select(train.targets, classes, None, seed)
        test_indices = _select(test.targets, classes, None, seed)
    else:
        train_indices, test_indices = _validation_split(
            train.targets, classes, validation_per_class, seed
        )
        test = train
    if train_per_class is not None:
        kept = _select(np.asarray(train.targets)[train_indices], classes, train_per_class, seed)
        train_indices = np.asarray(train_indices)[kept].tolist()
    if decode is None:
        train_set = as_classification_dataset(train).subset(train_indices)
        test_set = as_classification_dataset(test).subset(test_indices)
    else:
        train_set = as_classification_dataset(DecodedImages(train, train_indices, decode))
        test_set = as_classification_dataset(DecodedImages(test, test_indices, decode))
    return nc_benchmark(
        train_set,
        test_set,
        n_experiences=n_experiences,
        task_labels=False,
        shuffle=False,
        fixed_class_order=classes,
        per_exp_classes=None if initial_classes is None else {0: initial_classes},
        class_ids_from_zero_from_first_exp=True,
        train_transform=train_transform,
        eval_transform=eval_transform,
    )
