"""Everything that can fail before work starts, checked together: the data and its split (every
image of an ImageFolder tree), the device, the backbone and its weights (probed on one image),
RanPAC's memory, the output folder, a resumed run's files."""

from __future__ import annotations

import json
import os
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from avalanche_sdlora.distributed import launched_processes, process_device
from avalanche_sdlora.runner.backbones import BackboneError, build_backbone
from avalanche_sdlora.runner.config import SDLORA_VARIANTS, ConfigError, concerns, methods_of
from avalanche_sdlora.runner.data_path import data_path
from avalanche_sdlora.runner.ranpac import (
    MATRICES_AT_ONCE,
    default_projection_dim,
    largest_projection_dim,
    memory_bytes,
)
from avalanche_sdlora.runner.streams import (
    backbone_transforms,
    batch_transforms,
    check_dataset,
    dataset_classes,
    download_cifar100,
    image_tree_problems,
    split_problems,
)

__all__ = ["check_run_files", "output_problems", "preflight"]

NAME_BYTES = 255
"""The longest file or folder name Linux file systems take (``NAME_MAX``)."""


def _ensure_dataset(benchmark: Mapping[str, Any]) -> None:
    """The benchmark's data is on disk, downloaded first where ``benchmark.download`` allows it."""
    try:
        check_dataset(benchmark["name"], benchmark["root"])
    except FileNotFoundError:
        if not (benchmark["download"] and benchmark["name"] == "split_cifar100"):
            raise
        download_cifar100(benchmark["root"])


def output_problems(option: str, folder: Path) -> list[str]:
    """Why the run folder ``folder`` (given as ``option``) could not be written: a name too long for
    the file system, a file in place of a parent folder, a read-only file system, no write
    permission. Nothing is written to find out. (A file or a device such as ``/dev/null`` in the
    folder's own place is :func:`~avalanche_sdlora.runner.ownership.new_folder_problem`'s.)"""
    long = [part for part in folder.parts if len(os.fsencode(part)) > NAME_BYTES]
    if long:
        return [
            f"{option} {folder}: a file system takes names of at most {NAME_BYTES} bytes, "
            f"{long[0][:20]}... has {len(os.fsencode(long[0]))}"
        ]
    existing = next(p for p in (folder, *folder.parents) if os.path.exists(p))
    if existing == folder and not folder.is_dir():
        return []
    if not existing.is_dir():
        return [f"{option} {folder}: {existing} is a file, not a folder; give a folder path"]
    if os.statvfs(existing).f_flag & os.ST_RDONLY:
        return [f"{option} {folder}: {existing} is on a read-only file system"]
    if not os.access(existing, os.W_OK | os.X_OK):
        return [f"{option} {folder}: {existing} is not writable (no permission to write in it)"]
    return []


def _probe_problem(backbone: torch.nn.Module, batched: bool) -> str | None:
    """What fails when one image goes through the data transforms (``batched``: the batched
    path's) and the backbone (no gradient), as in every training step: the transforms' size,
    interpolation and crop, the input channels."""
    training = backbone.training
    try:
        if batched:
            transform = batch_transforms(backbone, train_augmentation=False)
            images = transform.eval(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
        else:
            _, transform = backbone_transforms(backbone, train_augmentation=False)
            images = transform(Image.new("RGB", (32, 32)))[None]
        backbone.eval()
        with torch.no_grad():
            backbone(images)
    except Exception as error:  # whatever fails here would fail the first training step
        return (
            f"backbone: one image of the data transforms fails in {type(backbone).__name__} "
            f"({type(error).__name__}: {str(error)[:300]}); check backbone.kwargs and "
            "backbone.pretrained_cfg"
        )
    finally:
        backbone.train(training)
    return None


def _adapter_problems(config: Mapping[str, Any], backbone: torch.nn.Module) -> list[str]:
    """Adapter settings the backbone cannot hold: blocks it lacks, a rank above its width (the
    adapted projections are width x width, so a larger rank adds parameters, not capacity)."""
    sdlora, problems = config["sdlora"], []
    blocks, depth = sdlora["blocks"], len(backbone.blocks)
    if blocks is not None and any(index >= depth for index in blocks):
        problems.append(
            f"sdlora.blocks: the backbone has {depth} blocks (0..{depth - 1}), got {blocks}"
        )
    width = getattr(backbone, "embed_dim", None)
    if width is not None and sdlora["rank"] > width:
        problems.append(
            f"sdlora.rank: must be at most the backbone's width, {width} (an adapter of a "
            f"{width} x {width} projection has rank {width} at most), got {sdlora['rank']}"
        )
    return problems


def available_memory(device: str) -> int:
    """Bytes free for new tensors on ``device``: CUDA's free memory, or the system's available
    memory (Linux's ``MemAvailable``; elsewhere the physical memory) for the CPU."""
    if device.startswith("cuda"):
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        with open("/proc/meminfo") as meminfo:
            fields = dict(line.split(":", 1) for line in meminfo)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _ranpac_problem(
    config: Mapping[str, Any], backbone: torch.nn.Module, device: str
) -> str | None:
    """Whether RanPAC's ``M x M`` float64 matrices fit in the device's free memory."""
    width = backbone.num_features
    chosen = config["baselines"]["ranpac"]["projection_dim"]
    m = chosen or default_projection_dim(width)
    needed, free = memory_bytes(m), available_memory(device)
    if needed <= free:
        return None
    origin = "" if chosen else f" (the default for {width}-wide features)"
    return (
        f"baselines.ranpac.projection_dim: RanPAC holds {MATRICES_AT_ONCE} M x M float64 matrices "
        f"at once (its Gram matrix and the ridge's choice) and a chunk of projected images: "
        f"{needed / 2**30:.1f} GiB for M = {m}"
        f"{origin}, but {device} has {free / 2**30:.1f} GiB free; set "
        f"baselines.ranpac.projection_dim to at most {largest_projection_dim(free)}"
    )


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
    config: Mapping[str, Any],
    run_dir: Path | None = None,
    problems: Sequence[str] = (),
    output: Path | None = None,
) -> torch.nn.Module:
    """Everything that can fail before work starts: the data and its split (every image of an
    ImageFolder tree decodes), the data path (``benchmark.augmentation_device: cpu`` needs images
    that fit in memory), the device, the backbone with its weights (returned, for the data
    transforms) and one image through both, the adapters it must hold, whether RanPAC's matrices fit
    in the device's free memory, the ``--output`` folder,
    and, for a resumed ``run_dir``, its progress and checkpoint files. ``problems`` are those
    already found in the configuration: a check that reads a setting they name is skipped, the
    others run. Every problem is reported together in one ``ConfigError``."""
    found = [*problems, *([] if run_dir is None else check_run_files(run_dir))]
    if output is not None:
        found += output_problems("--output", output)
    benchmark, batched = config["benchmark"], False
    if not concerns(problems, "benchmark.name", "benchmark.root", "benchmark.download"):
        try:
            _ensure_dataset(benchmark)
        except FileNotFoundError as error:
            found.append(str(error))
        else:
            tree = (
                image_tree_problems(benchmark["root"]) if benchmark["name"] == "imagefolder" else []
            )
            found += tree
            if not tree and not concerns(
                problems, "benchmark.augmentation_device", "benchmark.num_workers", "experiment"
            ):
                try:
                    batched = data_path(config).batched
                except ValueError as error:
                    found.append(str(error))
            if not concerns(
                problems,
                "benchmark.n_experiences",
                "benchmark.class_order",
                "benchmark.num_classes",
                "benchmark.initial_classes",
            ):
                total = dataset_classes(benchmark["name"], benchmark["root"])
                found += split_problems(
                    total,
                    benchmark["n_experiences"],
                    benchmark["class_order"],
                    benchmark["num_classes"],
                    benchmark["initial_classes"],
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
        else:
            if (probe := _probe_problem(backbone, batched)) is not None:
                found.append(probe)
    if (
        backbone is not None
        and not concerns(
            problems, "sdlora.blocks", "sdlora.rank", "experiment.strategy", "experiment.compare"
        )
        and any(method in SDLORA_VARIANTS for method in methods_of(config))
    ):
        found += _adapter_problems(config, backbone)
    if (
        backbone is not None
        and device is not None
        and not any(problem.startswith("experiment.device") for problem in found)
        and not concerns(problems, "baselines.ranpac", "experiment.strategy", "experiment.compare")
        and "ranpac" in methods_of(config)
        and (problem := _ranpac_problem(config, backbone, device)) is not None
    ):
        found.append(problem)
    if found:
        raise ConfigError(found)
    return backbone
