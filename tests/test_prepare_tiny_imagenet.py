"""The script that builds the study's two Tiny-ImageNet splits from the official download."""

import importlib.util
import shutil
from pathlib import Path

import pytest

_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "prepare_tiny_imagenet.py"
_spec = importlib.util.spec_from_file_location("prepare_tiny_imagenet", _SCRIPT)
prepare_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(prepare_script)

WNIDS = ["n04", "n01", "n03", "n02"]  # wnids.txt order; the splits use the sorted order


def fake_download(folder: Path) -> Path:
    """A tiny-imagenet-200 tree: 4 classes, training images 0, 1, 2 and 10, 2 val images each."""
    root = folder / "tiny-imagenet-200"
    (root / "val" / "images").mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    annotations = []
    for k, wnid in enumerate(sorted(WNIDS)):
        images = root / "train" / wnid / "images"
        images.mkdir(parents=True)
        for i in (0, 1, 2, 10):
            (images / f"{wnid}_{i}.JPEG").write_bytes(f"{wnid}-{i}".encode())
        for j in (2 * k, 2 * k + 1):
            (root / "val" / "images" / f"val_{j}.JPEG").write_bytes(f"val-{j}".encode())
            annotations.append(f"val_{j}.JPEG\t{wnid}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(annotations) + "\n")
    return root


def build(source: Path, out: Path) -> None:
    prepare_script.prepare(source, out, classes=2, train_per_class=3, val_per_class=2)


@pytest.mark.parametrize("packed", [False, True])
def test_the_splits_from_the_folder_or_the_zip(tmp_path, packed):
    root = fake_download(tmp_path / "download")
    source = root.parent
    if packed:
        source = Path(shutil.make_archive(str(tmp_path / "tiny"), "zip", root.parent, root.name))
    out = tmp_path / "data"
    build(source, out)
    train = sorted(p.relative_to(out).as_posix() for p in (out / "cl" / "train").rglob("*.JPEG"))
    assert train == [f"cl/train/{w}/{w}_{i}.JPEG" for w in ("n01", "n02") for i in (0, 1, 2)]
    assert sorted(p.name for p in (out / "pretrain" / "train").iterdir()) == ["n03", "n04"]
    assert (out / "pretrain" / "val" / "n04" / "val_6.JPEG").read_bytes() == b"val-6"
    assert (out / "cl" / "train" / "n02" / "n02_2.JPEG").read_bytes() == b"n02-2"


def test_a_short_class_is_reported_and_nothing_is_left(tmp_path):
    root = fake_download(tmp_path / "download")
    for image in (root / "train" / "n03" / "images").glob("n03_1*.JPEG"):
        image.unlink()  # n03 keeps 2 training images
    out = tmp_path / "data"
    with pytest.raises(ValueError, match="pretrain/train/n03 has 2 images, expected 3"):
        build(root, out)
    assert list(tmp_path.iterdir()) == [tmp_path / "download"]
    build(fake_download(tmp_path / "again"), out)
    with pytest.raises(ValueError, match="already exists"):
        build(root, out)
