"""Avalanche plugins: the decisions after each experience (pruning, absorption), mixed precision, the
gate's trace, batched data transforms and the split of training time into data and compute."""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping
from typing import Any

import torch
from avalanche.evaluation.metric_results import MetricValue
from avalanche.training.plugins import SupervisedPlugin
from torch import Tensor
from torch.utils.data import DataLoader

from avalanche_sdlora.absorption import KD_THRESHOLD, DirectionFit
from avalanche_sdlora.batch_transforms import BatchTransforms
from avalanche_sdlora.distributed import derived_seed, rank
from avalanche_sdlora.pruning import AdapterDecision, SelectionPruner, accuracy_on

__all__ = [
    "AutocastPlugin",
    "BatchTransformPlugin",
    "GateTracePlugin",
    "GumbelPruningPlugin",
    "KnowledgeDistillationPlugin",
    "SDLoRAPlugin",
    "TimeSplitPlugin",
]


class SDLoRAPlugin(SupervisedPlugin):
    """A plugin of :class:`~avalanche_sdlora.strategy.SDLoRA`: Avalanche's ``SupervisedPlugin``
    plus the events of its training phases (``strategy.phase`` tells which one: 1 selection,
    2 new task, 0 a joint phase). Subclass it to act at phase boundaries."""

    def before_training_phase(self, strategy, *args, **kwargs) -> None:
        """Called when a phase starts, after its trainable tensors and optimizer are set."""

    def after_training_phase(self, strategy, *args, **kwargs) -> None:
        """Called when a phase's epochs are done."""


def _publish(strategy, origin: SupervisedPlugin, prefix: str, values: Mapping[str, float]) -> None:
    """Hand values to the strategy's evaluator, so every logger records them."""
    x_plot = strategy.clock.train_iterations
    for name, value in values.items():
        strategy.evaluator.publish_metric_value(
            MetricValue(origin, f"{prefix}/{name}", float(value), x_plot)
        )


class GumbelPruningPlugin(SDLoRAPlugin, supports_distributed=True):
    """Decides after each training experience whether the model grew and which adapters to prune,
    then consolidates the new adapter.

    The decision (:class:`~avalanche_sdlora.pruning.SelectionPruner`, or the ``pruner`` given, such
    as the :class:`~avalanche_sdlora.pruning.RandomPruner` control) runs in ``after_training_exp``,
    before the experience's evaluation; with ``growth="phase1"`` the new adapter's fate is decided
    at the end of phase 1 (``after_training_phase``), and with ``growth="gain"`` after phase 2 from
    its measured gain (:meth:`gain`). Each adapter's alpha, logit, betas, frequency, decision and
    agreement is published through the strategy's evaluator, so every logger records it, and kept in
    ``history`` for the report. With the model's gate off there is nothing to select: every adapter
    is kept.

    Place it before plugins that snapshot the model in ``after_training_exp`` (LwF), so they see the
    consolidated model; ``SDLoRA`` puts its default instance first. The experience index is taken
    when the experience starts, so the plugin may sit anywhere in the list.
    """

    def __init__(self, pruner: SelectionPruner | None = None, **settings: Any):
        """``settings`` are :class:`~avalanche_sdlora.pruning.SelectionPruner`'s keywords (``rule``,
        ``num_samples``, ``threshold``, ``seed``, ``growth``, ``growth_gain``, ``patience``, ...),
        with its defaults; or give a ``pruner``, built already."""
        super().__init__()
        if pruner is not None and settings:
            raise ValueError(
                f"give a pruner or its settings, not both: got a pruner and {sorted(settings)}"
            )
        self.pruner = pruner or SelectionPruner(**settings)
        self.history: list[AdapterDecision] = []
        self._experience = 0

    def before_training_exp(self, strategy, **kwargs) -> None:
        self._experience = strategy.clock.train_exp_counter

    def after_training_phase(self, strategy, **kwargs) -> None:
        model = strategy.model
        if strategy.phase == 1 and model.gate_enabled and self.pruner.growth == "phase1":
            self._apply(strategy, self.pruner.phase1_growth(model, self._experience))

    def after_training_exp(self, strategy, **kwargs) -> None:
        model = strategy.model
        if model.gate_enabled:
            decisions = self.pruner.decide(model, self._experience)
            if self.pruner.growth == "gain":
                decisions = self.pruner.with_gain(decisions, self.gain(strategy, decisions))
            self._apply(strategy, decisions)
        model.consolidate()

    def gain(self, strategy, decisions: list[AdapterDecision]) -> float:
        """Points of accuracy on the experience's classes, over its training data with the
        evaluation transforms, that the new adapter adds to the network these decisions leave; NaN
        when there is no new adapter left to judge, or no other adapter would stay."""
        gone = [d.adapter for d in decisions if d.pruned]
        new = [d.adapter for d in decisions if d.new and not d.pruned]
        if not new or len(gone) + len(new) == len(decisions):
            return math.nan
        model, experience = strategy.model, strategy.experience
        batches = DataLoader(experience.dataset.eval(), batch_size=strategy.eval_mb_size)
        classes = experience.classes_in_this_experience
        # an evaluation: the model in eval mode, and on the batched data path the evaluation
        # transform (BatchTransformPlugin reads is_training), with no training crop drawn
        training, is_training = model.training, strategy.is_training
        model.eval()
        strategy.is_training = False
        try:
            with model.adapters_left_out(gone):
                grown = accuracy_on(model, batches, classes, strategy.device)
            with model.adapters_left_out(gone + new):
                declined = accuracy_on(model, batches, classes, strategy.device)
        finally:
            model.train(training)
            strategy.is_training = is_training
        return grown - declined

    def _apply(self, strategy, decisions: list[AdapterDecision]) -> None:
        """Prune what ``decisions`` say, keep them in ``history`` and publish them."""
        self.pruner.apply(strategy.model, decisions)
        self.history.extend(decisions)
        for d in decisions:
            fields = ("alpha", "logit", "eval_beta", "mean_beta", "frequency", "pruned")
            prefix = f"Pruning/Exp{d.experience:03d}/Adapter{d.adapter:03d}"
            _publish(strategy, self, prefix, {f: getattr(d, f) for f in fields})


class KnowledgeDistillationPlugin(SupervisedPlugin, supports_distributed=True):
    """SD-LoRA-KD: after each training experience, the new adapter is absorbed by the old ones on
    every projection where its direction is their linear combination up to ``threshold``.

    It consolidates the new adapter, fits it (:meth:`SDLoRAViT.direction_fits`) and absorbs it
    (:meth:`SDLoRAViT.absorb`). Every fit's residual and outcome is published through the
    strategy's evaluator and kept in ``history``. Defined for plain SD-LoRA (the model's gate off);
    place it before plugins that snapshot the model in ``after_training_exp`` (LwF).
    """

    def __init__(self, threshold: float = KD_THRESHOLD):
        super().__init__()
        if not threshold > 0:
            raise ValueError(f"threshold must be > 0, got {threshold}")
        self.threshold = threshold
        self.history: list[DirectionFit] = []
        self._experience = 0

    def before_training_exp(self, strategy, **kwargs) -> None:
        self._experience = strategy.clock.train_exp_counter

    def after_training_exp(self, strategy, **kwargs) -> None:
        model = strategy.model
        model.consolidate()
        index = model.num_adapters - 1  # the adapter this experience trained
        fits = model.direction_fits(index, self._experience)
        absorbed = set(model.absorb(index, self.threshold))
        for fit in fits:
            fit = dataclasses.replace(fit, absorbed=(fit.block, fit.projection) in absorbed)
            self.history.append(fit)
            prefix = f"Absorption/Exp{fit.experience:03d}/Block{fit.block:02d}/{fit.projection}"
            _publish(strategy, self, prefix, {"residual": fit.residual, "absorbed": fit.absorbed})


class AutocastPlugin(SupervisedPlugin, supports_distributed=True):
    """Runs every forward pass (training and evaluation) under ``torch.autocast``.

    The outputs are cast back to float32 so losses and metrics are computed in full precision.
    bf16 autocast works on CUDA and on the CPU.
    """

    def __init__(self, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.dtype = dtype
        self._context: torch.autocast | None = None

    def _enter(self, strategy) -> None:
        self._context = torch.autocast(device_type=strategy.device.type, dtype=self.dtype)
        self._context.__enter__()

    def _exit(self, strategy) -> None:
        self._context.__exit__(None, None, None)
        self._context = None
        strategy.mb_output = strategy.mb_output.float()

    def before_forward(self, strategy, **kwargs) -> None:
        self._enter(strategy)

    def after_forward(self, strategy, **kwargs) -> None:
        self._exit(strategy)

    def before_eval_forward(self, strategy, **kwargs) -> None:
        self._enter(strategy)

    def after_eval_forward(self, strategy, **kwargs) -> None:
        self._exit(strategy)


class GateTracePlugin(SupervisedPlugin, supports_distributed=True):
    """Records every adapter's alpha and mean training beta after each training epoch.

    ``trace`` holds one row per epoch and adapter (experience, phase, epoch, adapter, alpha, beta), so
    one can see whether a shrinking beta is compensated by a growing alpha (the seed's
    identifiability problem, which the two phases are meant to remove).
    """

    def __init__(self):
        super().__init__()
        self.trace: list[dict[str, float | int]] = []
        self._beta_sum: torch.Tensor | None = None
        self._steps = 0

    def before_training_epoch(self, strategy, **kwargs) -> None:
        self._beta_sum, self._steps = None, 0

    def after_training_iteration(self, strategy, **kwargs) -> None:
        if strategy.model.last_beta is None:  # no adapter yet, or none at all (head_only)
            return
        beta = strategy.model.last_beta.detach()
        self._beta_sum = beta if self._beta_sum is None else self._beta_sum + beta
        self._steps += 1

    def after_training_epoch(self, strategy, **kwargs) -> None:
        if not self._steps:
            return
        gate, mean_beta = strategy.model.gate, (self._beta_sum / self._steps).tolist()
        for adapter in gate.active_indices:
            self.trace.append(
                {
                    "experience": strategy.clock.train_exp_counter,
                    "phase": strategy.phase,
                    "epoch": strategy.clock.train_exp_epochs,
                    "adapter": adapter,
                    "alpha": gate.alphas[adapter].item(),
                    "beta": mean_beta[adapter],
                }
            )


class BatchTransformPlugin(SupervisedPlugin, supports_distributed=True):
    """Turns every mini-batch of uint8 images ``(N, C, H, W)`` into the model's input with
    :class:`~avalanche_sdlora.batch_transforms.BatchTransforms`: training batches through
    ``transforms.train``, evaluation batches through ``transforms.eval``, on ``device`` (default:
    the strategy's), the result on the strategy's device.

    It only uses Avalanche's events, so every strategy (``SDLoRA``, Avalanche's baselines,
    ``LearningToPrompt``) gets its inputs the same way: it replaces ``strategy.mbatch[0]`` in
    ``before_training_iteration`` and ``before_eval_iteration``, after the template has moved the
    batch to the device and before the forward and any loss that reads ``mb_x``. While a training
    experience runs (until ``after_training``), the model also transforms any uint8 batch it is
    given as its first argument, so plugins that run the model on the experience's dataset
    themselves, as Avalanche's EWC does for its importances after each experience, see what
    training sees.

    Training batch ``k`` draws its crops and flips from a generator seeded by
    ``(seed, rank, k)``; ``batches`` (``k``) belongs to the plugin's state, which Avalanche's
    checkpoints keep, so a resumed run draws what an uninterrupted one would.
    """

    def __init__(
        self,
        transforms: BatchTransforms,
        seed: int = 0,
        device: str | torch.device | None = None,
    ):
        super().__init__()
        self.transforms = transforms
        self.seed = seed
        self.device = None if device is None else torch.device(device)
        self.batches = 0
        """Training batches transformed so far: the clock of the crops' generator."""
        self._hook: Any = None

    def transform(self, strategy, images: Tensor, train: bool | None = None) -> Tensor:
        """``images`` as the model's input: the training transform if ``train`` (default: while
        ``strategy`` trains), else the evaluation transform."""
        if images.dtype != torch.uint8:
            raise TypeError(
                f"BatchTransformPlugin transforms batches of uint8 images, got {images.dtype}: "
                "give the strategy datasets of uint8 image tensors without per-image transforms"
            )
        images = images.to(self.device or strategy.device, non_blocking=True)
        if strategy.is_training if train is None else train:
            seed = derived_seed(self.seed, rank(), self.batches)
            self.batches += 1
            inputs = self.transforms.train(images, torch.Generator().manual_seed(seed))
        else:
            inputs = self.transforms.eval(images)
        return inputs.to(strategy.device, non_blocking=True)

    def before_training_iteration(self, strategy, **kwargs) -> None:
        strategy.mbatch[0] = self.transform(strategy, strategy.mbatch[0])

    def before_eval_iteration(self, strategy, **kwargs) -> None:
        strategy.mbatch[0] = self.transform(strategy, strategy.mbatch[0])

    def before_training_exp(self, strategy, **kwargs) -> None:
        self.after_training(strategy)
        hook = _RawInputs(self, strategy)  # first, so other hooks see the transformed batch
        self._hook = strategy.model.register_forward_pre_hook(hook, prepend=True)

    def after_training(self, strategy, **kwargs) -> None:
        if self._hook is not None:
            self._hook.remove()
        self._hook = None


def _ignore_inputs(module: torch.nn.Module, args: tuple) -> None:
    """A forward pre-hook that changes nothing."""


class _RawInputs:
    """:class:`BatchTransformPlugin`'s forward pre-hook: a uint8 first argument is transformed.

    A copy of the model (LwF's snapshot, a pickled checkpoint) gets :func:`_ignore_inputs` in its
    place, so no copy holds the plugin or the strategy."""

    def __init__(self, plugin: BatchTransformPlugin, strategy: Any):
        self.plugin, self.strategy = plugin, strategy

    def __call__(self, module: torch.nn.Module, args: tuple) -> tuple | None:
        if args and isinstance(args[0], Tensor) and args[0].dtype == torch.uint8:
            return (self.plugin.transform(self.strategy, args[0]), *args[1:])
        return None

    def __deepcopy__(self, memo: dict) -> Any:
        return _ignore_inputs

    def __reduce__(self) -> str:
        return "_ignore_inputs"


class TimeSplitPlugin(SupervisedPlugin, supports_distributed=True):
    """Splits each training experience's steps into data and forward/backward time.

    Data is what a step waits for before its forward: the loader, the copy to the device and
    batch transforms (``before_training_iteration``). Forward/backward is the rest of the step:
    forward, loss, backward, optimizer step and the plugins that act on them. On CUDA both ends are
    synchronised, so each part is charged with its own kernels. ``seconds`` holds the sums of the
    current (or last) training experience; time outside the steps (an experience's set-up, what
    plugins do after it) is in neither.
    """

    def __init__(self):
        super().__init__()
        self.seconds = {"data": 0.0, "forward_backward": 0.0}
        self._mark = 0.0

    def _lap(self, strategy, part: str | None = None) -> None:
        """Charge the time since the last mark to ``part``, and mark now."""
        if strategy.device.type == "cuda":
            torch.cuda.synchronize(strategy.device)
        now = time.perf_counter()
        if part is not None:
            self.seconds[part] += now - self._mark
        self._mark = now

    def before_training_exp(self, strategy, **kwargs) -> None:
        self.seconds = dict.fromkeys(self.seconds, 0.0)

    def before_training_epoch(self, strategy, **kwargs) -> None:
        self._lap(strategy)

    def before_forward(self, strategy, **kwargs) -> None:
        self._lap(strategy, "data")

    def after_training_iteration(self, strategy, **kwargs) -> None:
        self._lap(strategy, "forward_backward")

    def after_training_epoch(self, strategy, **kwargs) -> None:
        self._lap(strategy, "data")  # the loader's end of the epoch
