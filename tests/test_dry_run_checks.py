"""What ``--dry-run`` checks before any work: the backbone built and probed on one image, every
image of an ImageFolder tree, the output folder, and settings that were once accepted silently. Each
bad input exits 2 with a message naming the setting or file, and leaves nothing written."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from PIL import Image
from streams import write_image_tree
from test_bad_input import DEMO_KWARGS
from test_cli import DEMO

from avalanche_sdlora.runner.cli import main
from avalanche_sdlora.runner.streams import image_tree_problems

DIGITS = json.loads(Path(DEMO).read_text())


def kwargs(**changes: object) -> list[str]:
    return ["--set", f"backbone.kwargs={json.dumps({**DEMO_KWARGS, **changes})}"]


def imagefolder(tree: str) -> list[str]:
    root = f"benchmark.root={{trees}}/{tree}"
    return [
        "--set",
        "benchmark.name=imagefolder",
        "--set",
        root,
        "--set",
        "benchmark.n_experiences=2",
    ]


def write_tree(root: Path) -> Path:
    """train/ and val/ with 4 class folders of 3 small JPEGs each."""
    return write_image_tree(root, per_class=3, suffix=".jpg")


@pytest.fixture(scope="module")
def trees(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ImageFolder trees, each with one fault, under one folder."""
    base = tmp_path_factory.mktemp("trees")
    for name in ("empty_class", "not_an_image", "truncated", "other_classes"):
        write_tree(base / name)
    for image in (base / "empty_class" / "val" / "class_3").iterdir():
        image.unlink()
    (base / "not_an_image" / "train" / "class_1" / "3.jpg").write_text("<html>not found</html>")
    truncated = base / "truncated" / "train" / "class_2" / "0.jpg"
    truncated.write_bytes(truncated.read_bytes()[:-40])
    (base / "other_classes" / "val" / "class_3").rename(base / "other_classes" / "val" / "class_9")
    return base


@pytest.fixture(autouse=True)
def cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The verified-image cache of each test in a folder of its own, never the user's."""
    folder = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("XDG_CACHE_HOME", str(folder))
    return folder


@pytest.fixture
def opened(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths ``Image.open`` is called with."""
    paths = []
    open_image = Image.open

    def counted(path: str) -> Image.Image:
        paths.append(path)
        return open_image(path)

    monkeypatch.setattr(Image, "open", counted)
    return paths


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    """Config files and folders the cases name: ``{duplicates}``, ``{latin1}``, ``{file}``,
    ``{readonly}`` (a folder no one may write in: chmod 555, or /proc/sys, since root ignores
    permissions)."""
    duplicates = tmp_path / "duplicates.json"
    text = json.dumps(DIGITS, indent=2)
    text = text.replace('"name": "demo",', '"name": "demo",\n    "name": "other",')
    duplicates.write_text(text.replace('"depth": 4,', '"depth": 4,\n      "depth": 6,'))
    latin1 = tmp_path / "latin1.json"
    latin1.write_bytes(json.dumps(DIGITS).replace("demo", "d\xe9mo").encode("latin-1"))
    (tmp_path / "file").write_text("a file, not a folder")
    readonly = tmp_path / "readonly"
    readonly.mkdir(mode=0o555)
    if os.access(readonly, os.W_OK):  # root ignores permissions
        readonly = Path("/proc/sys")
        if os.access(readonly, os.W_OK):
            pytest.skip("no folder here refuses writes")
    return {
        "duplicates": duplicates,
        "latin1": latin1,
        "file": tmp_path / "file",
        "readonly": readonly,
    }


CASES = {  # name: (arguments, words the message must hold); {out} is the default --output
    "num_heads that do not divide embed_dim": (
        kwargs(num_heads=3),
        ["backbone.kwargs: timm cannot build", "dim should be divisible by num_heads"],
    ),
    "input_size of two numbers": (
        ["--set", 'backbone.pretrained_cfg={"input_size": [64, 64]}'],
        ["backbone.pretrained_cfg.input_size: must be [channels, height, width]", "[64, 64]"],
    ),
    "an unknown interpolation": (
        ["--set", 'backbone.pretrained_cfg={"interpolation": "bogus"}'],
        ["backbone.pretrained_cfg.interpolation: 'bogus' is not allowed", "'bicubic'"],
    ),
    "a misspelled pretrained_cfg key": (
        ["--set", 'backbone.pretrained_cfg={"crop_pctt": 1.0}'],
        ["backbone.pretrained_cfg.crop_pctt: not a key", "did you mean 'crop_pct'?", "valid keys"],
    ),
    "a model of one input channel (the transforms make three)": (
        [*kwargs(in_chans=1), "--set", "backbone.pretrained_cfg={}"],
        ["backbone: one image of the data transforms fails", "to have 1 channels"],
    ),
    "a rank above the backbone's width": (
        ["--set", "sdlora.rank=500"],
        ["sdlora.rank: must be at most the backbone's width, 128", "got 500"],
    ),
    "a rank schedule above the rank": (
        ["--compare", "sdlora_rr"],
        ["sdlora.rank_schedule: rank reduction (sdlora_rr)", "<= sdlora.rank (4)"],
    ),
    "pretrained false with a weights file": (
        ["--set", "backbone.pretrained=false"],
        ["backbone.pretrained: false means random", "backbone.pretrained_file to null"],
    ),
    "a model deeper than its weights": (
        kwargs(depth=6),
        ["backbone.kwargs: the weights in", "hold 4 blocks", "has 6", "blocks [4, 5] would keep"],
    ),
    "a model shallower than its weights": (
        kwargs(depth=2),
        ["hold 4 blocks", "has 2", "the weights' blocks [2, 3] would be dropped"],
    ),
    "a model wider than its weights": (
        kwargs(embed_dim=192),
        ["backbone.kwargs: the weights in", "pos_embed: weights [1, 64, 128], model [1, 64, 192]"],
    ),
    "a run name too long for a folder": (
        ["--set", f"experiment.name={'a' * 300}"],
        ["experiment.name: must be at most 239 characters, not 300"],
    ),
    "keys given twice in the config file": (
        ["--config", "{duplicates}"],
        ["experiment.name: given more than once in", "backbone.kwargs.depth: given more than once"],
    ),
    "a config file that is not UTF-8": (
        ["--config", "{latin1}"],
        ["config file {latin1} is not UTF-8 text"],
    ),
    "--output a file": (["--output", "{file}"], ["--output {file}", "not a folder"]),
    "--output /dev/null": (["--output", "/dev/null"], ["--output /dev/null", "not a folder"]),
    "--output with a name too long": (
        ["--output", "{file}-" + "x" * 300],
        ["cannot be a folder here: File name too long"],
    ),
    "--output below a file": (
        ["--output", "{file}/run"],
        ["--output {file}/run: {file} is a file, not a folder"],
    ),
    "--output in a read-only folder": (
        ["--output", "{readonly}/run"],
        ["--output {readonly}/run: {readonly} is not writable"],
    ),
    "an empty class folder": (
        imagefolder("empty_class"),
        ["benchmark.root: 1 class folder(s) hold no image", "empty_class/val/class_3"],
    ),
    "a .jpg that is no image": (
        imagefolder("not_an_image"),
        ["benchmark.root: 1 image(s) cannot be read", "class_1/3.jpg (not an image)"],
    ),
    "a truncated JPEG": (
        imagefolder("truncated"),
        ["benchmark.root: 1 image(s) cannot be read", "truncated/train/class_2/0.jpg (OSError"],
    ),
    "train/ and val/ with other classes": (
        imagefolder("other_classes"),
        ["train/ and val/ must hold the same class folders", "['class_3', 'class_9']"],
    ),
    "data, config and output problems together": (
        [*imagefolder("truncated"), "--set", "sdlora.rank=500", "--output", "{file}/run"],
        ["class_2/0.jpg (OSError", "sdlora.rank: must be at most", "{file} is a file"],
    ),
}


@pytest.mark.parametrize("args, words", CASES.values(), ids=CASES.keys())
def test_each_bad_input_exits_2_naming_it_and_writes_nothing(
    tmp_path, trees, files, capsys, args, words
):
    def fill(text: str) -> str:
        for name, path in {**files, "trees": trees}.items():
            text = text.replace(f"{{{name}}}", str(path))
        return text

    before = sorted(tmp_path.rglob("*"))
    args = ["--config", DEMO, "--output", str(tmp_path / "run"), *args, "--dry-run"]
    assert main([fill(arg) for arg in args]) == 2
    err = capsys.readouterr().err
    assert all(fill(word) in err for word in words), err
    assert sorted(tmp_path.rglob("*")) == before


def test_decoded_images_are_remembered_until_they_change(tmp_path, opened, cache):
    root = write_tree(tmp_path / "tree")

    def problems_and_opened() -> tuple[list[str], int]:
        opened.clear()
        return image_tree_problems(root), len(opened)

    assert problems_and_opened() == ([], 24)
    assert problems_and_opened() == ([], 0)  # the cache
    Image.new("RGB", (16, 16)).save(root / "train" / "class_0" / "1.jpg")
    (root / "val" / "class_2" / "2.jpg").write_text("no image")
    problems, count = problems_and_opened()
    assert count == 2 and "val/class_2/2.jpg (not an image)" in problems[0]
    assert problems_and_opened()[1] == 1  # a bad image is decoded again, until it is repaired
    assert not any(path.suffix == ".json" for path in root.rglob("*"))  # nothing in the data
    assert list((cache / "avalanche_sdlora" / "verified_images").glob("*.json"))


def test_a_cache_that_cannot_be_written_is_skipped(tmp_path, monkeypatch, opened):
    (tmp_path / "file").write_text("in place of the cache folder")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))
    root = write_tree(tmp_path / "tree")
    assert image_tree_problems(root) == image_tree_problems(root) == []
    assert len(opened) == 48
