"""Everything that can fail before work starts, checked together: the data and its split, the
device, the backbone and its weights, a resumed run's files."""

from __future__ import annotations

import json
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from avalanche_sdlora.distributed import launched_processes, process_device
from avalanche_sdlora.runner.backbones import BackboneError, build_backbone
from avalanche_sdlora.runner.config import SDLORA_VARIANTS, ConfigError, concerns, methods_of
from avalanche_sdlora.runner.streams import (
    check_dataset,
    dataset_classes,
    download_cifar100,
    split_problems,
)

__all__ = ["check_run_files", "preflight"]


def _ensure_dataset(benchmark: Mapping[str, Any]) -> None:
    """The benchmark's data is on disk, downloaded first where ``benchmark.download`` allows it."""
    try:
        check_dataset(benchmark["name"], benchmark["root"])
    except FileNotFoundError:
        if not (benchmark["download"] and benchmark["name"] == "split_cifar100"):
            raise
        download_cifar100(benchmark["root"])


def check_run_files(run_dir: Path) -> list[str]:
    """The unreadable ``progress.json`` and ``checkpoint.pkl`` files of a run folder, and the runs
    trained on another number of processes, each with the way out. A checkpoint is a zip archive
    (``torch.save``); a truncated one has lost its directory."""
    problems = []
    for folder in sorted(run_dir.glob("*/seed*")):
        way_out = f"delete {folder} to train that run again from its start"
        progress, checkpoint = folder / "progress.json", folder / "checkpoint.pkl"
        if progress.exists():
            try:
                recorded = json.loads(progress.read_text()).get("world_size", 1)
            except ValueError as error:
                problems.append(f"{progress} is unreadable ({error}); {way_out}")
            else:
                if recorded != launched_processes():
                    problems.append(
                        f"{progress}: trained on {recorded} processes (its batches are split "
                        f"that way); resume it with torchrun --nproc_per_node={recorded}, or "
                        f"{way_out}"
                    )
        if checkpoint.exists():
            try:
                zipfile.ZipFile(checkpoint).close()
            except (zipfile.BadZipFile, OSError) as error:
                problems.append(f"{checkpoint} is unreadable ({error}); {way_out}")
    return problems


def preflight(
    config: Mapping[str, Any], run_dir: Path | None = None, problems: Sequence[str] = ()
) -> torch.nn.Module:
    """Everything that can fail before work starts: the data and its split, the device, the
    backbone with its weights (returned, for the data transforms), and, for a resumed ``run_dir``,
    its progress and checkpoint files. ``problems`` are those already found in the configuration: a
    check that reads a setting they name is skipped, the others run. Every problem is reported
    together in one ``ConfigError``."""
    found = [*problems, *([] if run_dir is None else check_run_files(run_dir))]
    benchmark = config["benchmark"]
    if not concerns(problems, "benchmark.name", "benchmark.root", "benchmark.download"):
        try:
            _ensure_dataset(benchmark)
        except FileNotFoundError as error:
            found.append(str(error))
        else:
            if not concerns(
                problems,
                "benchmark.n_experiences",
                "benchmark.class_order",
                "benchmark.num_classes",
            ):
                total = dataset_classes(benchmark["name"], benchmark["root"])
                found += split_problems(
                    total,
                    benchmark["n_experiences"],
                    benchmark["class_order"],
                    benchmark["num_classes"],
                )
    device = (
        None
        if concerns(problems, "experiment.device")
        else process_device(config["experiment"]["device"])
    )
    if device is not None and device.startswith("cuda"):
        index = int(device.partition(":")[2] or 0)
        if not torch.cuda.is_available() or index >= torch.cuda.device_count():
            found.append(f"experiment.device: {device} is not available on this machine")
    backbone = None
    if not concerns(problems, "backbone"):
        try:
            backbone = build_backbone(config["backbone"])  # checks the name and weights file first
        except BackboneError as error:
            found.append(str(error))
    if backbone is not None and not concerns(
        problems, "sdlora.blocks", "experiment.strategy", "experiment.compare"
    ):
        blocks = config["sdlora"]["blocks"]
        uses_sdlora = any(method in SDLORA_VARIANTS for method in methods_of(config))
        depth = len(backbone.blocks)
        if uses_sdlora and blocks is not None and any(index >= depth for index in blocks):
            found.append(
                f"sdlora.blocks: the backbone has {depth} blocks (0..{depth - 1}), got {blocks}"
            )
    if found:
        raise ConfigError(found)
    return backbone
