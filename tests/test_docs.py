"""The documentation: a short README, links that resolve, and a quickstart that runs."""

from __future__ import annotations

import re
from pathlib import Path

import avalanche.benchmarks.classic
import pytest
import timm
from conftest import make_small_vit
from streams import separable_benchmark

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 200

FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*$", re.MULTILINE)


def prose(text: str) -> str:
    """``text`` without its fenced code blocks."""
    return FENCE.sub("", text)


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def relative_links(page: Path) -> list[str]:
    return [
        target
        for target in LINK.findall(prose(page.read_text()))
        if not re.match(r"^[a-z][a-z0-9+.-]*:", target)  # http:, https:, mailto: ...
    ]


def test_readme_is_short():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_relative_links_resolve(page: Path):
    broken = []
    for target in relative_links(page):
        path, _, fragment = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(
                f"{target}: no {file.relative_to(ROOT) if file.is_relative_to(ROOT) else file}"
            )
        elif fragment and file.suffix == ".md":
            anchors = {anchor(h) for h in HEADING.findall(prose(file.read_text()))}
            if fragment not in anchors:
                broken.append(f"{target}: no heading #{fragment} in {file.relative_to(ROOT)}")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


def quickstart() -> str:
    blocks = re.findall(r"^```python\n(.*?)^```", README.read_text(), re.MULTILINE | re.DOTALL)
    assert len(blocks) == 1, "README.md should have exactly one ```python block, the quickstart"
    return blocks[0]


def test_readme_quickstart_runs(monkeypatch, capsys):
    """Runs the README's quickstart as written, offline and in seconds: the two calls that would
    download are replaced, and only those."""
    backbone_names, benchmark_arguments = [], []

    def tiny_vit(name, *args, **kwargs):  # SUBSTITUTE for ViT-B/16: a 2-block ViT on 16 px images
        backbone_names.append(name)
        return make_small_vit()

    def tiny_stream(**kwargs):  # SUBSTITUTE for Split CIFAR-100: 3 experiences of 2 classes
        benchmark_arguments.append(kwargs)
        return separable_benchmark()

    monkeypatch.setattr(timm, "create_model", tiny_vit)
    monkeypatch.setattr(avalanche.benchmarks.classic, "SplitCIFAR100", tiny_stream)

    namespace: dict = {"__name__": "__quickstart__"}
    exec(compile(quickstart(), "README.md quickstart", "exec"), namespace)

    assert backbone_names == ["vit_base_patch16_224.augreg2_in21k_ft_in1k"]
    (arguments,) = benchmark_arguments
    assert callable(arguments["train_transform"]) and callable(arguments["eval_transform"])
    strategy, model = namespace["strategy"], namespace["model"]
    assert strategy.clock.train_exp_counter == 3
    assert model.num_adapters == 3 and model.num_active_adapters >= 1
    accuracy = namespace["metrics"]["Top1_Acc_Stream/eval_phase/test_stream/Task000"]
    assert 0 <= accuracy <= 1
    printed = capsys.readouterr().out.strip().splitlines()[-1]
    assert printed == f"{model.num_active_adapters} {accuracy}"
