"""Run a configured class-incremental experiment: every method x seed, resumable, with its outputs
(the run folder's layout: :mod:`avalanche_sdlora.runner.run_folder`)."""

from __future__ import annotations

import copy
import functools
import json
import multiprocessing
import time
import warnings
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from avalanche.checkpointing import maybe_load_checkpoint
from avalanche.evaluation.metrics import accuracy_metrics, loss_metrics
from avalanche.logging import InteractiveLogger, TensorboardLogger
from avalanche.training.determinism.rng_manager import RNGManager
from avalanche.training.plugins import EvaluationPlugin
from avalanche.training.templates import SupervisedTemplate

from avalanche_sdlora.distributed import (
    DistributedPlugin,
    is_main_process,
    mean_over_ranks,
    process_device,
    world_size,
)
from avalanche_sdlora.model import SDLoRAViT
from avalanche_sdlora.plugins import (
    AutocastPlugin,
    BatchTransformPlugin,
    GateTracePlugin,
    GumbelPruningPlugin,
    KnowledgeDistillationPlugin,
    TimeSplitPlugin,
)
from avalanche_sdlora.pruning import RandomPruner, SelectionPruner
from avalanche_sdlora.runner.backbones import build_backbone
from avalanche_sdlora.runner.baselines import make_baseline
from avalanche_sdlora.runner.checkpoints import save_checkpoint
from avalanche_sdlora.runner.config import RANDOM_CONTROL, SDLORA_VARIANTS, methods_of, seeds_of
from avalanche_sdlora.runner.data_path import DataPath, data_path
from avalanche_sdlora.runner.frozen import FrozenFeatureStrategy
from avalanche_sdlora.runner.metrics import NearestMeanPlugin, top5_accuracy
from avalanche_sdlora.runner.outputs import (
    ResumableCSVLogger,
    atomic_write,
    trim_csv_logs,
    write_json,
)
from avalanche_sdlora.runner.ownership import provenance, record_config
from avalanche_sdlora.runner.report import RunReport, summarize_run
from avalanche_sdlora.runner.run_folder import jsonable, summarize_seeds, write_run_folder
from avalanche_sdlora.runner.streams import (
    backbone_transforms,
    batch_transforms,
    class_order,
    dataset_classes,
    make_benchmark,
    rgb_rendition,
)
from avalanche_sdlora.settings import SDLoRASettings
from avalanche_sdlora.strategy import SDLoRA, peak_memory_mb

__all__ = ["run_experiment"]


# Training cost relative to Naive: Cumulative retrains on every experience so far, Replay doubles
# each mini-batch with memory samples.
_RELATIVE_COST = {"cumulative": 5, "replay": 2}


def _build_benchmark(
    config: Mapping[str, Any], backbone: torch.nn.Module, path: DataPath | None = None
):
    """The benchmark of ``config``: PIL images with the backbone's transforms, or, on the batched
    ``path`` (default: the config's), uint8 images decoded once (the transforms come with each
    strategy's plugin)."""
    path = path or data_path(config)
    settings = config["benchmark"]
    order = class_order(
        dataset_classes(settings["name"], settings["root"]),
        settings["class_order_seed"],
        settings["class_order"],
    )
    train_transform = eval_transform = decode = None
    if path.batched:
        decode = rgb_rendition(settings["rendition"])
    else:
        train_transform, eval_transform = backbone_transforms(
            backbone,
            settings["train_augmentation"],
            settings["rendition"],
            tuple(settings["crop_scale"]),
        )
    return make_benchmark(
        settings["name"],
        root=settings["root"],
        n_experiences=settings["n_experiences"],
        order=order,
        train_transform=train_transform,
        eval_transform=eval_transform,
        num_classes=settings["num_classes"],
        train_per_class=settings["train_per_class"],
        validation_per_class=settings["validation_per_class"],
        initial_classes=settings["initial_classes"],
        decode=decode,
    )


def _make_strategy(
    method: str,
    config: Mapping[str, Any],
    folder: Path,
    num_classes: int,
    seed: int = 0,
    reference: RunReport | None = None,
    path: DataPath | None = None,
) -> SupervisedTemplate:
    """One method's strategy, its inputs made by ``path`` (default: the config's data path);
    ``reference`` is the ``sdlora`` run whose pruning counts ``sdlora_random`` copies."""
    path = path or data_path(config)
    experiment, training = config["experiment"], config["training"]
    loggers = (
        [
            InteractiveLogger(),
            ResumableCSVLogger(folder / "csv"),
            TensorboardLogger(str(folder / "tensorboard")),
        ]
        if is_main_process()
        else []  # only rank 0 writes the run folder (Avalanche refuses a logger elsewhere)
    )
    evaluator = EvaluationPlugin(
        accuracy_metrics(experience=True, stream=True),
        top5_accuracy(),
        loss_metrics(epoch=True, stream=True),
        loggers=loggers,
    )
    backbone = build_backbone(config["backbone"])
    plugins = [TimeSplitPlugin()]
    if path.batched:
        benchmark = config["benchmark"]
        transforms = batch_transforms(
            backbone, benchmark["train_augmentation"], tuple(benchmark["crop_scale"])
        )
        plugins.append(BatchTransformPlugin(transforms, seed, path.transform_device))
    if config["backbone"]["precision"] == "bf16":
        plugins.append(AutocastPlugin())
    template = {
        "train_mb_size": training["batch_size"] // world_size(),  # the global batch, split
        "train_epochs": training["epochs"],
        "eval_mb_size": training["eval_batch_size"],
        "device": process_device(experiment["device"]),
        "evaluator": evaluator,
    }
    shared = [DistributedPlugin(seed)] if world_size() > 1 else []
    if method not in SDLORA_VARIANTS:
        return make_baseline(
            method,
            backbone,
            config["baselines"][method],
            num_classes=num_classes,
            seed=seed,
            plugins=plugins + shared,
            **template,
        )
    s = {**config["sdlora"], **SDLORA_VARIANTS[method]}
    model = SDLoRAViT(
        backbone,
        rank=s["rank"],
        rank_schedule={int(k): v for k, v in s["rank_schedule"].items()}
        if s["rank_reduction"]
        else None,
        targets=s["targets"],
        blocks=s["blocks"],
        adapters=s["adapters"],
        gate=s["gate"],
        init_logit=s["init_logit"],
        alpha_init=s["alpha_init"],
        tau_final=s["gumbel_tau_final"],
    )
    if shared:  # every rank draws the same Gumbel noise (the global stream is per rank)
        model.generator = torch.Generator().manual_seed(seed)
    plugins.append(GateTracePlugin())
    if s["pruning"]:
        pruner = {"rule": s["prune_rule"], "num_samples": s["num_samples"], "seed": seed}
        if method == RANDOM_CONTROL:
            counts = RandomPruner.counts_from(reference.pruning)
            chosen = RandomPruner(counts, **pruner)
        else:
            chosen = SelectionPruner(
                threshold=s["prune_threshold"],
                growth=s["growth"],
                growth_gain=s["growth_gain"],
                patience=s["prune_patience"],
                **pruner,
            )
        plugins.insert(0, GumbelPruningPlugin(pruner=chosen))
    if s["knowledge_distillation"]:
        plugins.insert(0, KnowledgeDistillationPlugin(s["kd_threshold"]))
    if s["eval_nme"]:
        plugins.append(NearestMeanPlugin(num_classes))
    settings = {name: s[name] for name in SDLoRASettings.names()}
    return SDLoRA(model=model, plugins=plugins + shared, **settings, **template)


def _experience_record(strategy: SupervisedTemplate, index: int, seconds: float) -> dict:
    """What every method reports per experience; SD-LoRA adds phases and adapters, RanPAC its
    ridge. The training time's data and forward/backward parts come from the strategy's
    :class:`TimeSplitPlugin` (a run resumed from a checkpoint written before it existed has none)."""
    timer = _plugin(strategy, TimeSplitPlugin)
    split = {f"{part}_seconds": t for part, t in timer.seconds.items()} if timer else {}
    if isinstance(strategy, SDLoRA | FrozenFeatureStrategy):
        return {**strategy.experience_log[-1], **split}
    trainable = sum(p.numel() for p in strategy.model.parameters() if p.requires_grad)
    return {
        "experience": index,
        "trainable_parameters": trainable,
        "train_seconds": seconds,
        **split,
        "peak_memory_mb": peak_memory_mb(strategy.device),
    }


def _run_one(
    method: str,
    seed: int,
    config: Mapping[str, Any],
    benchmark,
    folder: Path,
    num_classes: int,
    reference: RunReport | None = None,
    path: DataPath | None = None,
) -> RunReport:
    """Train and evaluate one method with one seed, continuing from its checkpoint if any."""
    progress_file, checkpoint = folder / "progress.json", folder / "checkpoint.pkl"
    progress = {"eval_results": [], "records": [], "world_size": world_size()}
    if progress_file.exists():
        progress = json.loads(progress_file.read_text())
    progress["provenance"] = origin = provenance(method, seed, config)
    experiences = len(benchmark.train_stream)
    RNGManager.set_random_seeds(seed)
    path = path or data_path(config)
    strategy = _make_strategy(method, config, folder, num_classes, seed, reference, path)
    start = 0
    if progress["eval_results"] and checkpoint.exists():
        loggers = strategy.evaluator.loggers
        strategy, start = maybe_load_checkpoint(strategy, checkpoint, map_location=strategy.device)
        strategy.evaluator.loggers = loggers  # checkpoints hold none: see save_checkpoint
    del progress["eval_results"][start:], progress["records"][start:]
    main = is_main_process()
    if main:
        trim_csv_logs(folder / "csv", start)
    loader = path.loader_arguments()
    test_sizes = [len(experience.dataset) for experience in benchmark.test_stream]
    for experience in benchmark.train_stream[start:]:
        index = experience.current_experience
        began = time.perf_counter()
        strategy.train(experience, **loader)
        seconds = time.perf_counter() - began
        loss = mean_over_ranks(_last_training_loss(strategy))
        progress["eval_results"].append(strategy.eval(benchmark.test_stream, **loader))
        wall = time.perf_counter() - began
        record = {**_experience_record(strategy, index, seconds), "eval_seconds": wall - seconds}
        progress["records"].append({**record, "wall_seconds": wall, "train_loss": loss})
        if main and loss is not None and not np.isfinite(loss):
            warnings.warn(
                f"{method} seed {seed}: the training loss of experience {index} is {loss}, so the "
                "run has diverged; a lower learning rate (or regulariser weight) may fix it",
                RuntimeWarning,
                stacklevel=1,
            )
        if main:  # progress first: a crash between the two retrains this experience, never skips it
            write_json(folder / "progress.json", jsonable(progress))
            if config["experiment"]["checkpoint"]:
                save_checkpoint(strategy, checkpoint, origin)
            _print_progress(method, seed, index, experiences, progress, test_sizes)
    if main and isinstance(strategy, SDLoRA):  # the learned adapters, without the backbone
        atomic_write(folder / "adapters.safetensors", strategy.model.save_adapters)
    pruning = _plugin(strategy, GumbelPruningPlugin)
    trace = _plugin(strategy, GateTracePlugin)
    absorption = _plugin(strategy, KnowledgeDistillationPlugin)
    return summarize_run(
        progress["eval_results"],
        progress["records"],
        pruning.history if pruning else (),
        trace.trace if trace else (),
        test_sizes=test_sizes,
        absorption_fits=absorption.history if absorption else (),
    )


def _last_training_loss(strategy: SupervisedTemplate) -> float | None:
    """The mean training loss of the last epoch, from Avalanche's ``Loss_Epoch`` metric (if logged)."""
    metrics = strategy.evaluator.get_last_metrics()
    return next(
        (float(v) for k, v in metrics.items() if k.startswith("Loss_Epoch/train_phase/")), None
    )


def _plugin(strategy: SupervisedTemplate, kind: type):
    return next((p for p in strategy.plugins if isinstance(p, kind)), None)


def _print_progress(
    method: str, seed: int, index: int, total: int, progress: dict, test_sizes: Sequence[int]
) -> None:
    done = len(progress["eval_results"])
    seen = summarize_run(
        progress["eval_results"], test_sizes=test_sizes[:done]
    ).seen_class_accuracy[-1]
    record = progress["records"][-1]
    adapters = (
        f" | adapters {record['active_adapters']}/{record['adapters_added']}"
        if "active_adapters" in record
        else ""
    )
    print(
        f"[{method} seed {seed}] experience {index + 1}/{total}: seen-class accuracy "
        f"{seen:.2f}%{adapters} | {record['train_seconds']:.1f} s",
        flush=True,
    )


def _run_job(
    config: Mapping[str, Any],
    run_dir: Path,
    job: Sequence[tuple[str, int]],
    benchmark=None,
    path: DataPath | None = None,
) -> list[RunReport]:
    """One or more method x seed runs in order, each in its own folder; builds the benchmark itself
    when run in a worker. A ``sdlora_random`` run follows the ``sdlora`` run it copies."""
    if config["experiment"]["threads"] is not None:
        torch.set_num_threads(config["experiment"]["threads"])
    path = path or data_path(config)
    if benchmark is None:
        benchmark = _build_benchmark(config, build_backbone(config["backbone"]), path)
    num_classes = sum(len(e.classes_in_this_experience) for e in benchmark.train_stream)
    reports: list[RunReport] = []
    for method, seed in job:
        folder = run_dir / method / f"seed{seed}"
        if is_main_process():
            folder.mkdir(parents=True, exist_ok=True)
        reference = reports[-1] if method == RANDOM_CONTROL else None
        reports.append(
            _run_one(
                method, seed, copy.deepcopy(config), benchmark, folder, num_classes, reference, path
            )
        )
    return reports


def _jobs(config: Mapping[str, Any]) -> list[list[tuple[str, int]]]:
    """The runs, grouped into jobs: each ``sdlora_random`` run joins its seed's ``sdlora`` run."""
    runs = [(m, seed) for m in methods_of(config) for seed in seeds_of(config, m)]
    jobs = [[run] for run in runs if run[0] != RANDOM_CONTROL]
    for _, seed in (run for run in runs if run[0] == RANDOM_CONTROL):
        next(job for job in jobs if job[0] == ("sdlora", seed)).append((RANDOM_CONTROL, seed))
    return jobs


def _job_cost(job: Sequence[tuple[str, int]]) -> int:
    return sum(_RELATIVE_COST.get(method, 1) for method, _ in job)


def run_experiment(
    config: Mapping[str, Any], run_dir: Path, backbone: torch.nn.Module
) -> dict[str, Any]:
    """Run (or continue) every method x seed of ``config`` in ``run_dir`` and write the outputs.

    ``backbone`` (from :func:`~avalanche_sdlora.runner.preflight.preflight`) sets the data transforms;
    each run builds its own copy. The data path (:func:`~avalanche_sdlora.runner.data_path.data_path`)
    is chosen once, for every run.
    With ``experiment.workers`` > 1 the runs go to that many processes (each with its own
    ``experiment.threads``); every run is seeded on its own, so the order does not matter. Under
    ``torchrun`` every rank calls this and trains each run with the others; rank 0 alone writes.
    """
    if is_main_process():
        record_config(run_dir, config)
    started = time.perf_counter()
    jobs = _jobs(config)
    workers = config["experiment"]["workers"]
    path = data_path(config)
    if workers == 1:
        benchmark = _build_benchmark(config, backbone, path)
        job_reports = [_run_job(config, run_dir, job, benchmark, path) for job in jobs]
    else:
        context = multiprocessing.get_context("spawn")
        # the costliest jobs start first, so no worker is left alone with one at the end
        order = sorted(range(len(jobs)), key=lambda i: -_job_cost(jobs[i]))
        with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=context) as pool:
            started_reports = pool.map(
                functools.partial(_run_job, config, run_dir, path=path), [jobs[i] for i in order]
            )
            job_reports = [r for _, r in sorted(zip(order, started_reports, strict=True))]
    found = {
        run: report
        for job, reports in zip(jobs, job_reports, strict=True)
        for run, report in zip(job, reports, strict=True)
    }
    results: dict[str, dict[int, RunReport]] = {}
    for method in methods_of(config):
        for seed in seeds_of(config, method):
            results.setdefault(method, {})[seed] = found[(method, seed)]
    metrics = {
        "methods": {
            method: {
                "summary": summarize_seeds(list(per_seed.values())),
                "seeds": {str(seed): report.as_dict() for seed, report in per_seed.items()},
            }
            for method, per_seed in results.items()
        },
        "wall_seconds": time.perf_counter() - started,
        "accuracy_unit": "percent",
        "world_size": world_size(),
    }
    if is_main_process():
        write_run_folder(run_dir, metrics, results)
    return metrics
