"""Which data path a run takes, and the loader settings that go with it.

``benchmark.augmentation_device``:

- ``"auto"`` (default): in-memory data (CIFAR-100, digits, an ImageFolder tree whose images have
  one size and fit :data:`~avalanche_sdlora.runner.in_memory.MAX_DECODED_BYTES`) takes the batched
  path on the training device; any other data takes the PIL path.
- ``"cpu"``: the batched path, its transforms on the CPU (a mis-fit dataset is an error).
- ``"pil"``: the PIL path, one image at a time in the loader (every run's path before the setting
  existed).

The batched path decodes the images once into a uint8 tensor and transforms whole batches
(:class:`~avalanche_sdlora.plugins.BatchTransformPlugin`); the PIL path runs torchvision's
transforms per image in the loader. ``benchmark.num_workers: "auto"`` gives the loader
:func:`auto_workers`; on CUDA the loader pins its batches, which the template copies to the
device without blocking.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from avalanche_sdlora.distributed import launched_processes, process_device
from avalanche_sdlora.runner.in_memory import in_memory_problem

__all__ = [
    "AUGMENTATION_DEVICES",
    "MAX_AUTO_WORKERS",
    "DataPath",
    "auto_workers",
    "data_path",
]

AUGMENTATION_DEVICES = ("auto", "cpu", "pil")
MAX_AUTO_WORKERS = 8
"""The most loader workers ``"auto"`` gives the PIL path per process: PIL takes about 1 ms per
224 px image and core (docs/cost.md), so 8 cores feed a GPU with about 8,000 images/s."""
BATCHED_AUTO_WORKERS = 2
"""Loader workers ``"auto"`` gives the batched path on CUDA: they only index uint8 tensors, but
Avalanche's per-sample indexing (tens of microseconds) would otherwise keep the GPU waiting."""


@dataclass(frozen=True)
class DataPath:
    """A run's data path: where batch transforms run (``None``: the PIL path) and the loader's
    settings; ``reason`` says why, for the plan."""

    transform_device: str | None
    num_workers: int
    pin_memory: bool
    reason: str

    @property
    def batched(self) -> bool:
        return self.transform_device is not None

    def loader_arguments(self) -> dict[str, Any]:
        """Keyword arguments of ``strategy.train`` / ``strategy.eval`` for Avalanche's loaders."""
        return {
            "num_workers": self.num_workers,
            "pin_memory": self.pin_memory,
            "persistent_workers": self.num_workers > 0,
        }

    def describe(self) -> str:
        where = f"batched on {self.transform_device}" if self.batched else "PIL per image"
        pinned = ", pinned memory" if self.pin_memory else ""
        return f"data: {where} ({self.reason}); {self.num_workers} loader workers{pinned}"


def auto_workers(batched: bool, device: str) -> int:
    """Loader workers for ``num_workers: "auto"``: none on the CPU (they would take the cores
    training uses); on CUDA, for the PIL path this process's share of the CPUs, at most
    :data:`MAX_AUTO_WORKERS`, and :data:`BATCHED_AUTO_WORKERS` for the batched path."""
    if not device.startswith("cuda"):
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    share = max(1, (cpus or 1) // launched_processes())
    return min(share, BATCHED_AUTO_WORKERS if batched else MAX_AUTO_WORKERS)


def data_path(config: Mapping[str, Any]) -> DataPath:
    """The data path of ``config``. Raises ``ValueError`` naming ``benchmark.augmentation_device``
    when ``"cpu"`` asks for the batched path on data that cannot be decoded into memory."""
    benchmark = config["benchmark"]
    setting = benchmark["augmentation_device"]
    device = process_device(config["experiment"]["device"])
    if setting == "pil":
        transform_device, reason = None, "benchmark.augmentation_device: pil"
    else:
        problem = in_memory_problem(benchmark["name"], benchmark["root"])
        if problem is not None and setting == "cpu":
            raise ValueError(
                f"benchmark.augmentation_device: cpu needs data that can be decoded into memory, "
                f"but {problem}; use auto or pil"
            )
        if problem is not None:
            transform_device, reason = None, f"auto: {problem}"
        else:
            transform_device = "cpu" if setting == "cpu" else device
            reason = f"{setting}: the images are decoded once into memory"
    workers = benchmark["num_workers"]
    if workers == "auto":
        workers = auto_workers(transform_device is not None, device)
    return DataPath(transform_device, workers, device.startswith("cuda"), reason)
