"""One run on several processes (``torchrun``), one device each, with torch DDP.

What is split: each training step's global batch, by rank. What is not: the model and the optimizer
(one copy per rank, kept bit-identical: DDP averages the gradients and broadcasts rank 0's parameters
at every wrap), and evaluation (every rank evaluates the whole test set, so the metrics count every
sample once and are the same on every rank).

Avalanche 0.6.0's data loaders build torch's ``DistributedSampler`` under a process group, with seed 0
in every epoch (the same order each epoch and each run) and padded duplicates in evaluation.
:func:`init_process_group` makes them build a :class:`SharedOrderSampler` instead.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import timedelta
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from avalanche.benchmarks.utils import data_loader
from avalanche.distributed import DistributedHelper
from avalanche.training.determinism.rng_manager import RNGManager
from avalanche.training.plugins import SupervisedPlugin
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import Dataset, DistributedSampler

__all__ = [
    "PROCESS_GROUP_TIMEOUT",
    "DistributedPlugin",
    "SharedOrderSampler",
    "derived_seed",
    "init_process_group",
    "is_main_process",
    "launch_problems",
    "launched_processes",
    "leave_process_group",
    "mean_over_ranks",
    "process_device",
    "rank",
    "share_from_main",
    "world_size",
]

T = TypeVar("T")

PROCESS_GROUP_TIMEOUT = timedelta(minutes=10)
"""How long a collective waits for the other ranks: a rank that hangs brings the others down."""


def launched_processes() -> int:
    """The processes ``torchrun`` started for this run (``WORLD_SIZE``); 1 without ``torchrun``."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def world_size() -> int:
    """Ranks in the process group; 1 when there is none."""
    return DistributedHelper.world_size


def rank() -> int:
    """This process's rank; 0 without a process group."""
    return DistributedHelper.rank


def is_main_process() -> bool:
    """Rank 0, the only one that writes the run folder (also true without a process group)."""
    return DistributedHelper.is_main_process


def share_from_main(value: T) -> T:
    """Rank 0's ``value``, on every rank."""
    return DistributedHelper.broadcast_object(value)


def mean_over_ranks(value: float | None) -> float | None:
    """The mean of ``value`` over the ranks (``value`` itself without a process group)."""
    if value is None or world_size() == 1:
        return value
    return float(np.mean(DistributedHelper.gather_all_objects(value)))


def launch_problems(config: Mapping[str, Any], processes: int) -> list[str]:
    """What in ``config`` cannot run on ``processes`` ``torchrun`` processes."""
    if processes == 1:
        return []
    experiment, batch = config["experiment"], config["training"]["batch_size"]
    problems = []
    if experiment["workers"] > 1:
        problems.append(
            f"experiment.workers: must be 1 under torchrun ({processes} processes already train "
            f"one run together), got {experiment['workers']}"
        )
    if batch % processes:
        problems.append(
            f"training.batch_size: the global batch is split across the {processes} processes, so "
            f"it must be a multiple of {processes}, got {batch}"
        )
    if experiment["device"] not in ("cpu", "cuda"):
        problems.append(
            "experiment.device: under torchrun each process takes cuda:LOCAL_RANK, so it must be "
            f"cpu or cuda, got {experiment['device']!r}"
        )
    return problems


def process_device(device: str) -> str:
    """This process's device: ``cuda:LOCAL_RANK`` for ``cuda`` under ``torchrun``."""
    if device == "cuda" and launched_processes() > 1:
        return f"cuda:{os.environ['LOCAL_RANK']}"
    return device


def init_process_group(device: str) -> None:
    """Join ``torchrun``'s process group: NCCL on CUDA, gloo on the CPU, with
    :data:`PROCESS_GROUP_TIMEOUT`; Avalanche's loaders then sample with :class:`SharedOrderSampler`."""
    mine = torch.device(process_device(device))
    if mine.type == "cuda":
        torch.cuda.set_device(mine)
    dist.init_process_group(
        "nccl" if mine.type == "cuda" else "gloo",
        timeout=PROCESS_GROUP_TIMEOUT,
        device_id=mine if mine.type == "cuda" else None,
    )
    data_loader.DistributedSampler = SharedOrderSampler


def leave_process_group() -> None:
    """Close the process group (torch warns at exit about one left open) and give Avalanche's
    loaders back torch's ``DistributedSampler``."""
    dist.destroy_process_group()
    data_loader.DistributedSampler = DistributedSampler


def derived_seed(*entropy: int) -> int:
    """A 32-bit seed from several integers (``numpy.random.SeedSequence``)."""
    return int(np.random.SeedSequence(list(entropy)).generate_state(1)[0])


class SharedOrderSampler(DistributedSampler):
    """The sampler Avalanche's loaders build per epoch under a process group.

    Training (``shuffle``): every rank draws the same permutation from :attr:`epoch_seed`, pads it to
    a multiple of the world size with its first indices (torch's ``DistributedSampler``), and takes
    every N-th index from its rank on. With per-rank batches of ``B / N``, rank r's k-th batch is the
    r-th strided share of the permutation's k-th global batch of B. Evaluation (no ``shuffle``):
    every rank gets every index once, in order.
    """

    epoch_seed: ClassVar[int] = 0
    """Seed of the current epoch's order, set on every rank by :class:`DistributedPlugin`."""

    def __init__(
        self,
        dataset: Dataset,
        shuffle: bool = True,
        drop_last: bool = False,
        num_replicas: int | None = None,
        rank: int | None = None,
    ):
        if shuffle:
            super().__init__(
                dataset, num_replicas, rank, shuffle=True, seed=self.epoch_seed, drop_last=drop_last
            )
        else:
            super().__init__(dataset, num_replicas=1, rank=0, shuffle=False)


def _wrap(model: torch.nn.Module, device: torch.device) -> DistributedDataParallel:
    """DDP over ``model``'s parameters that require grad now (rank 0's values are broadcast).

    ``find_unused_parameters``: L2P uses only the selected prompts of its pool in a step.
    """
    device_ids = [device] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=True)


class DistributedPlugin(SupervisedPlugin, supports_distributed=True):
    """Trains any Avalanche strategy's model with DDP, every rank in step; place it last.

    - Before each training epoch: the model is wrapped again when the parameters that require grad
      changed (model adaptation added an adapter or grew the head; an SD-LoRA phase trains another
      subset), so DDP all-reduces the gradients of exactly those. The epoch's data order is seeded
      by ``(seed, experience, epoch)``, the same on every rank; each rank's own random stream
      (augmentation, dropout) by ``(seed, experience, epoch, rank)``.
    - During the training forward, ``strategy.model`` is the DDP wrapper, so the backward all-reduces;
      before and after, plugins and losses see the plain model.
    - After each training experience every rank is seeded alike by ``(seed, experience)``, so what
      plugins draw then (a replay buffer) and evaluation's head growth are the same on every rank.

    SD-LoRA's Gumbel noise must come from a generator that is the same on every rank
    (``SDLoRAViT.generator``), not from the per-rank stream.
    """

    def __init__(self, seed: int):
        super().__init__()
        self.seed = seed
        self._ddp: DistributedDataParallel | None = None
        self._trainable: list[torch.nn.Parameter] = []

    def before_training_epoch(self, strategy, **kwargs) -> None:
        experience, epoch = strategy.clock.train_exp_counter, strategy.clock.train_exp_epochs
        SharedOrderSampler.epoch_seed = derived_seed(self.seed, experience, epoch)
        RNGManager.set_random_seeds(derived_seed(self.seed, experience, epoch, rank()))
        trainable = [p for p in strategy.model.parameters() if p.requires_grad]
        if len(trainable) != len(self._trainable) or any(
            a is not b for a, b in zip(trainable, self._trainable, strict=True)
        ):
            self._ddp = None  # its reducer's hooks go before the new wrapper's come
            self._ddp, self._trainable = _wrap(strategy.model, strategy.device), trainable

    def before_forward(self, strategy, **kwargs) -> None:
        strategy.model = self._ddp

    def after_forward(self, strategy, **kwargs) -> None:
        strategy.model = self._ddp.module

    def after_training_exp(self, strategy, **kwargs) -> None:
        self._ddp, self._trainable = None, []
        RNGManager.set_random_seeds(derived_seed(self.seed, strategy.clock.train_exp_counter))
