"""What happens at the boundaries of SD-LoRA's phases: a stop request, the temperature, gradients of
tensors that stop training, the alpha penalty's scope, and where tau_final lives."""

from __future__ import annotations

import torch
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.training.plugins import EvaluationPlugin, SupervisedPlugin
from conftest import make_small_vit
from streams import separable_benchmark

from avalanche_sdlora import KnowledgeDistillationPlugin, SDLoRA, SDLoRAViT
from avalanche_sdlora.plugins import SDLoRAPlugin


def make_strategy(plugins=(), gate=True, **settings) -> SDLoRA:
    torch.manual_seed(0)
    options = {"train_mb_size": 16, "train_epochs": 3, "lr": 0.05, **settings}
    return SDLoRA(
        model=SDLoRAViT(make_small_vit(), rank=4, gate=gate),
        plugins=list(plugins),
        evaluator=EvaluationPlugin(accuracy_metrics(stream=True), loggers=[]),
        **options,
    )


class Temperatures(SupervisedPlugin):
    """Records each phase's epochs and the temperature of every step."""

    def __init__(self):
        super().__init__()
        self.epochs: dict[int, int] = {}
        self.taus: dict[int, list[float]] = {}

    def before_training_epoch(self, strategy, **kwargs):
        self.epochs[strategy.phase] = self.epochs.get(strategy.phase, 0) + 1

    def after_training_iteration(self, strategy, **kwargs):
        self.taus.setdefault(strategy.phase, []).append(strategy.model.gate.tau)


class StopInPhaseOne(Temperatures):
    """Asks the strategy to stop after the first iteration of phase 1, as an iteration-level early
    stopping would."""

    def after_training_iteration(self, strategy, **kwargs):
        super().after_training_iteration(strategy)
        if strategy.phase == 1:
            strategy.stop_training()


def test_a_stop_in_phase_one_ends_phase_one_only():
    recorder = StopInPhaseOne()
    strategy = make_strategy([recorder])  # 3 epochs: phase 1 has 1, phase 2 has 2
    strategy.train(separable_benchmark(experiences=1).train_stream[0])
    assert recorder.epochs == {1: 1, 2: 2}
    assert len(recorder.taus[1]) == 1  # phase 1 stopped after its first step
    assert recorder.taus[2] == [0.5] * len(recorder.taus[2])  # not still annealing from 5
    new_adapter = [m.lora_B[0] for m in strategy.model.qkv_modules]
    assert all(b.abs().sum() > 0 for b in new_adapter)  # phase 2 trained it


class FrozenGradients(SDLoRAPlugin):
    """At the start of each phase and after each experience: names of frozen tensors that still
    hold a gradient."""

    def __init__(self):
        super().__init__()
        self.stale: list[list[str]] = []

    def _check(self, strategy):
        self.stale.append(
            [
                name
                for name, p in strategy.model.named_parameters()
                if not p.requires_grad and p.grad is not None
            ]
        )

    def before_training_phase(self, strategy, **kwargs):
        self._check(strategy)

    def after_training_exp(self, strategy, **kwargs):
        self._check(strategy)


def test_a_tensor_that_stops_training_drops_its_gradient():
    recorder = FrozenGradients()
    strategy = make_strategy([recorder], pruning=False)
    for experience in separable_benchmark(experiences=2).train_stream:
        strategy.train(experience)
    assert len(recorder.stale) == 6  # 2 phases + the end, twice
    assert recorder.stale == [[]] * 6


def test_the_alpha_penalty_is_the_gates_alone():
    losses = {}
    for gate in (True, False):
        strategy = make_strategy(gate=gate, lambda_alpha=10.0, train_epochs=1, pruning=False)
        strategy.experience = separable_benchmark(experiences=1).train_stream[0]
        strategy.model.adaptation(strategy.experience)
        strategy.phase = 0
        strategy.model.gate.alphas[0].data.fill_(3.0)
        x = torch.randn(8, 3, 16, 16)
        strategy.mbatch = [x, torch.zeros(8, dtype=torch.long), torch.zeros(8, dtype=torch.long)]
        strategy.mb_output = strategy.model(x)
        strategy.is_training = True
        ce = strategy._criterion(strategy.mb_output[:, :2], torch.zeros(8, dtype=torch.long)).item()
        losses[gate] = (strategy.criterion().item(), ce)
    gated, gated_ce = losses[True]
    plain, plain_ce = losses[False]
    assert abs(plain - plain_ce) < 1e-6  # plain SD-LoRA: cross-entropy only
    assert abs(gated - gated_ce - 10.0 * 9.0) < 1e-3  # the gate's phase-2 penalty, 10 * 3^2


def test_the_model_holds_tau_final_and_the_schedule_follows_it():
    trained = make_strategy(gumbel_tau_final=0.25)
    recorder = Temperatures()
    strategy = make_strategy([recorder])
    experience = separable_benchmark(experiences=1).train_stream[0]
    trained.model.adaptation(experience)
    strategy.model.adaptation(experience)
    strategy.model.load_state_dict(trained.model.state_dict())
    assert strategy.model.gate.tau_final == 0.25 != strategy.settings.gumbel_tau_final
    strategy.model._adapted_experience = None
    strategy.train(experience)
    assert recorder.taus[2][-1] == 0.25
    assert recorder.taus[1][-1] == 0.25


def test_knowledge_distillation_runs_under_torchrun_without_a_warning():
    assert KnowledgeDistillationPlugin.supports_distributed is True
