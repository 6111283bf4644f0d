"""Build the two disjoint Tiny-ImageNet splits the study uses, from the official download.

    python benchmarks/prepare_tiny_imagenet.py tiny-imagenet-200.zip data/tiny-imagenet-200

SOURCE is the official ``tiny-imagenet-200.zip`` or its extracted ``tiny-imagenet-200/`` folder. OUT
gets two ImageFolder trees with ``train/<wnid>/`` and ``val/<wnid>/``:

- ``cl/``: the first 100 wnids of the sorted ``wnids.txt`` (the class-incremental benchmark,
  ``exps/tiny_imagenet.json``);
- ``pretrain/``: the other 100 (the backbone's pretraining data, ``benchmarks/pretrain_backbone.py``).

Each class keeps its first 400 training images by file index (``<wnid>_0.JPEG`` ...
``<wnid>_399.JPEG``) and all its official validation images (50), which serve as test images. The
result is checked (class counts, images per class, disjoint splits) before it replaces OUT, so a
failure leaves nothing half-written.
"""

from __future__ import annotations

import argparse
import re
import shutil
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

ROOT = "tiny-imagenet-200"
SPLITS = ("cl", "pretrain")


def open_source(source: Path) -> tuple[list[str], Callable[[str], bytes]]:
    """The file names under the dataset's root (``wnids.txt``, ``train/...``) and a reader."""
    if zipfile.is_zipfile(source):
        archive = zipfile.ZipFile(source)
        prefix = f"{ROOT}/"
        names = [n[len(prefix) :] for n in archive.namelist() if n.startswith(prefix)]
        return names, lambda name: archive.read(prefix + name)
    root = source / ROOT if (source / ROOT / "wnids.txt").exists() else source
    if not (root / "wnids.txt").exists():
        raise ValueError(f"{source} is neither tiny-imagenet-200.zip nor its extracted folder")
    names = [p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()]
    return names, lambda name: (root / name).read_bytes()


def plan(
    names: Sequence[str], read: Callable[[str], bytes], classes: int, train_per_class: int
) -> dict[str, dict[str, list[tuple[str, str]]]]:
    """``plan[split][part]``: (source name, destination name) pairs, destinations relative to OUT."""
    wnids = sorted(read("wnids.txt").decode().split())
    if len(wnids) < 2 * classes:
        raise ValueError(f"wnids.txt lists {len(wnids)} classes; the two splits need {2 * classes}")
    annotations = read("val/val_annotations.txt").decode().splitlines()
    val_wnid = dict(line.split("\t")[:2] for line in annotations if line.strip())
    index = re.compile(r"_(\d+)\.JPEG$")
    result: dict[str, dict[str, list[tuple[str, str]]]] = {}
    for split, chosen in zip(SPLITS, (wnids[:classes], wnids[classes : 2 * classes]), strict=True):
        train, val = [], []
        for wnid in chosen:
            images = [n for n in names if n.startswith(f"train/{wnid}/images/") and index.search(n)]
            images.sort(key=lambda n: int(index.search(n).group(1)))
            train += [(n, f"{split}/train/{wnid}/{Path(n).name}") for n in images[:train_per_class]]
        wanted = set(chosen)
        val += [
            (f"val/images/{file}", f"{split}/val/{wnid}/{file}")
            for file, wnid in sorted(val_wnid.items())
            if wnid in wanted
        ]
        result[split] = {"train": train, "val": val}
    return result


def check(out: Path, classes: int, train_per_class: int, val_per_class: int) -> None:
    """The built tree has the expected classes and images per class, and disjoint splits."""
    seen: dict[str, set[str]] = {}
    for split in SPLITS:
        for part, per_class in (("train", train_per_class), ("val", val_per_class)):
            folders = sorted(p for p in (out / split / part).iterdir() if p.is_dir())
            if len(folders) != classes:
                raise ValueError(f"{split}/{part} has {len(folders)} classes, expected {classes}")
            for folder in folders:
                count = sum(1 for _ in folder.iterdir())
                if count != per_class:
                    raise ValueError(
                        f"{split}/{part}/{folder.name} has {count} images, expected {per_class}"
                    )
            seen.setdefault(split, set()).update(f.name for f in folders)
    if seen["cl"] & seen["pretrain"]:
        raise ValueError(f"the splits share classes: {sorted(seen['cl'] & seen['pretrain'])}")


def prepare(
    source: Path, out: Path, classes: int = 100, train_per_class: int = 400, val_per_class: int = 50
) -> None:
    """Build and check the splits in a temporary folder beside ``out``, then move it into place."""
    if out.exists():
        raise ValueError(f"{out} already exists; remove it or choose another folder")
    names, read = open_source(source)
    staging = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        for parts in plan(names, read, classes, train_per_class).values():
            for pairs in parts.values():
                for name, destination in pairs:
                    target = staging / destination
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(read(name))
        (staging / "wnids.txt").write_bytes(read("wnids.txt"))
        check(staging, classes, train_per_class, val_per_class)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="tiny-imagenet-200.zip or its extracted folder")
    parser.add_argument("out", type=Path, help="output folder (gets cl/ and pretrain/)")
    args = parser.parse_args(argv)
    prepare(args.source, args.out)
    print(f"built {args.out}/cl and {args.out}/pretrain")


if __name__ == "__main__":
    main()
