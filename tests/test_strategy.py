import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.training.plugins import (
    EarlyStoppingPlugin,
    EvaluationPlugin,
    LRSchedulerPlugin,
    LwFPlugin,
    ReplayPlugin,
    SupervisedPlugin,
)
from conftest import make_small_vit
from streams import separable_benchmark

from avalanche_sdlora import GumbelPruningPlugin, SDLoRA, SDLoRAViT
from avalanche_sdlora.gate import annealed_temperature
from avalanche_sdlora.plugins import GateTracePlugin
from avalanche_sdlora.pruning import SelectionPruner
from avalanche_sdlora.runner.report import summarize_run
from avalanche_sdlora.strategy import JOINT_PHASE


def quiet_evaluator() -> EvaluationPlugin:
    return EvaluationPlugin(accuracy_metrics(experience=True, stream=True), loggers=[])


def make_strategy(plugins=(), gate=True, **settings) -> SDLoRA:
    options = {"train_mb_size": 16, "train_epochs": 3, "lr": 0.05, **settings}
    return SDLoRA(
        model=SDLoRAViT(make_small_vit(), rank=4, gate=gate),
        plugins=list(plugins),
        evaluator=quiet_evaluator(),
        **options,
    )


class PhaseRecorder(SupervisedPlugin):
    """Snapshots every parameter at the start and end of each phase, and what had gradients."""

    def __init__(self):
        super().__init__()
        self.start, self.end, self.with_grad, self.taus, self.new_alpha = {}, {}, {}, [], {}
        self.epochs = {}

    @staticmethod
    def snapshot(strategy):
        return {n: p.detach().clone() for n, p in strategy.model.named_parameters()}

    def before_training_epoch(self, strategy, **kwargs):
        key = (strategy.clock.train_exp_counter, strategy.phase)
        self.start.setdefault(key, self.snapshot(strategy))
        self.epochs[key] = self.epochs.get(key, 0) + 1

    def after_training_epoch(self, strategy, **kwargs):
        self.end[(strategy.clock.train_exp_counter, strategy.phase)] = self.snapshot(strategy)

    def after_forward(self, strategy, **kwargs):
        self.taus.append((strategy.clock.train_exp_counter, strategy.model.gate.tau))

    def after_backward(self, strategy, **kwargs):
        key = (strategy.clock.train_exp_counter, strategy.phase)
        names = {
            n
            for n, p in strategy.model.named_parameters()
            if p.requires_grad and p.grad is not None
        }
        self.with_grad.setdefault(key, set()).update(names)
        self.new_alpha.setdefault(key, []).append(strategy.model.gate.alphas[-1].item())

    def changed(self, key):
        return {n for n in self.start[key] if not torch.equal(self.start[key][n], self.end[key][n])}


def adapter_names(names, index):
    return {n for n in names if n.endswith(f"lora_A.{index}") or n.endswith(f"lora_B.{index}")}


def test_each_phase_trains_exactly_its_tensors():
    recorder = PhaseRecorder()
    strategy = make_strategy([recorder], train_epochs=5)
    benchmark = separable_benchmark()
    for experience in benchmark.train_stream[:2]:
        strategy.train(experience)
    names = set(recorder.start[(1, 1)])
    head = {n for n in names if n.startswith("head.")}
    logits = {"gate.logits.0", "gate.logits.1"}
    alphas = {"gate.alphas.0", "gate.alphas.1"}
    assert recorder.epochs[(1, 1)] == 3 and recorder.epochs[(1, 2)] == 2

    phase1 = recorder.changed((1, 1))
    assert phase1 == logits | head
    assert recorder.with_grad[(1, 1)] == logits | head
    assert recorder.new_alpha[(1, 1)] == [1.0] * len(recorder.new_alpha[(1, 1)])

    phase2 = recorder.changed((1, 2))
    new_adapter = adapter_names(names, 1)
    assert recorder.with_grad[(1, 2)] == new_adapter | alphas | head
    assert alphas | head <= phase2
    assert phase2 - head - alphas == {n for n in new_adapter if n in phase2}
    assert any("lora_B.1" in n for n in phase2)  # A moves only once B is non-zero (second order)
    # old adapters never change, in either phase
    assert not adapter_names(phase1 | phase2, 0)


def test_the_step_schedule_anneals_per_step_and_restarts_each_experience():
    recorder = PhaseRecorder()
    strategy = make_strategy([recorder], gumbel_schedule="step", gumbel_anneal_rate=0.9)
    for experience in separable_benchmark().train_stream[:2]:
        strategy.train(experience)
    for exp in (0, 1):
        taus = [tau for e, tau in recorder.taus if e == exp]
        assert taus[0] == pytest.approx(5.0)
        assert taus == pytest.approx(
            [annealed_temperature(s, 5.0, 0.5, 0.9) for s in range(len(taus))]
        )
        assert all(a > b for a, b in itertools.pairwise(taus))


@pytest.mark.parametrize(
    "epochs, fraction, plan",
    [
        (20, 0.6, [(1, 12), (2, 8)]),
        (2, 0.1, [(1, 1), (2, 1)]),
        (1, 0.6, [(2, 1)]),
        (3, 0.99, [(1, 2), (2, 1)]),
    ],
)
def test_phase_plan(epochs, fraction, plan):
    assert make_strategy(train_epochs=epochs, phase1_fraction=fraction).phase_plan() == plan


def test_gate_off_and_joint_training_use_one_phase():
    recorder = PhaseRecorder()
    strategy = make_strategy([recorder], gate=False)
    assert strategy.phase_plan() == [(JOINT_PHASE, 3)]
    strategy.train(separable_benchmark().train_stream[0])
    assert recorder.with_grad[(0, JOINT_PHASE)] >= {"gate.alphas.0"}
    assert "gate.logits.0" not in recorder.with_grad[(0, JOINT_PHASE)]

    joint = PhaseRecorder()
    strategy = make_strategy([joint], two_phase=False)
    assert strategy.phase_plan() == [(JOINT_PHASE, 3)]
    strategy.train(separable_benchmark().train_stream[0])
    assert {"gate.alphas.0", "gate.logits.0"} <= joint.with_grad[(0, JOINT_PHASE)]
    assert adapter_names(joint.with_grad[(0, JOINT_PHASE)], 0)


class ForceLogits(SupervisedPlugin):
    """Before the pruning decision of the third experience, make adapter 1 rarely selected."""

    def after_training_exp(self, strategy, **kwargs):
        if strategy.clock.train_exp_counter == 2:
            with torch.no_grad():
                for logit, value in zip(strategy.model.gate.logits, (4.0, -4.0, 4.0), strict=True):
                    logit.fill_(value)


def test_pruning_removes_the_rarely_selected_adapter():
    pruning = GumbelPruningPlugin(
        num_samples=20, threshold=0.2, rule="frequency", growth="always", patience=1
    )
    strategy = make_strategy([ForceLogits(), pruning], train_epochs=2)
    model = strategy.model
    counts = []
    for experience in separable_benchmark().train_stream:
        strategy.train(experience)
        counts.append((model.num_active_adapters, model.trainable_parameter_count()))
    assert strategy.pruning_plugin is pruning and strategy.plugins.count(pruning) == 1
    last = [d for d in pruning.history if d.experience == 2]
    assert [d.adapter for d in last if d.pruned] == [1]
    logged = strategy.evaluator.get_last_metrics()  # published to every logger
    assert logged["Pruning/Exp002/Adapter001/pruned"] == 1.0
    assert logged["Pruning/Exp002/Adapter001/frequency"] < 0.2
    assert model.gate.active_indices == [0, 2]
    per_adapter = 2 * 2 * 4 * (32 + 32) + 2
    assert counts[2] == (2, 2 * per_adapter + 6 * 32 + 6)  # head: 6 classes seen
    grown_before = counts[1][0]  # experience 1 may itself have pruned one (random draws)
    assert counts[1][1] == grown_before * per_adapter + 4 * 32 + 4
    assert strategy.experience_log[2]["active_adapters"] == 2


def test_the_most_selected_adapter_is_never_pruned():
    model = SDLoRAViT(make_small_vit(), rank=2)
    for _ in range(4):
        model.add_adapter()
    pruner = SelectionPruner(rule="frequency", num_samples=10, threshold=1.0, patience=1)
    decisions = pruner.decide(model, experience=3)
    assert sum(not d.pruned for d in decisions) == 1
    pruner.apply(model, decisions)
    assert model.num_active_adapters == 1


def test_three_experiences_reach_high_accuracy_on_every_experience_seen():
    strategy = make_strategy(train_epochs=4)
    benchmark = separable_benchmark()
    results = []
    for experience in benchmark.train_stream:
        strategy.train(experience)
        results.append(strategy.eval(benchmark.test_stream))
    for t, result in enumerate(results):
        for j in range(t + 1):
            accuracy = result[f"Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp{j:03d}"]
            assert accuracy > 0.7, (t, j, accuracy)  # chance is 1/6
    report = summarize_run(results, strategy.experience_log, strategy.pruning_plugin.history)
    assert report.last_accuracy > 70.0
    assert len(report.experiences) == 3 and report.experiences[0]["phase_seconds"].keys() == {
        "1",
        "2",
    }


def test_composes_with_replay_lr_scheduler_early_stopping_and_lwf():
    replay = ReplayPlugin(mem_size=20)
    strategy = make_strategy([replay, LwFPlugin()], train_epochs=4)
    scheduler = LRSchedulerPlugin(torch.optim.lr_scheduler.StepLR(strategy.optimizer, 1, gamma=0.5))
    lrs = []

    class LrProbe(SupervisedPlugin):
        def after_training_epoch(self, strategy, **kwargs):
            lrs.append([g["lr"] for g in strategy.optimizer.param_groups])

    strategy.plugins.extend([scheduler, LrProbe()])
    benchmark = separable_benchmark()
    for experience in benchmark.train_stream[:2]:
        strategy.train(experience)
    assert len(replay.storage_policy.buffer) == 20
    # the schedule runs over both phases of an experience, on whichever optimizer groups train
    assert [lr[0] for lr in lrs[:4]] == pytest.approx([0.025, 0.0125, 0.00625, 0.003125])
    assert [lr[1] for lr in lrs[:2]] == pytest.approx([0.02, 0.01])

    epochs = []

    class EpochCounter(SupervisedPlugin):
        def after_training_epoch(self, strategy, **kwargs):
            epochs.append(strategy.phase)

    stopper = EarlyStoppingPlugin(patience=1, val_stream_name="train_stream")
    strategy = make_strategy([stopper, EpochCounter()], train_epochs=8, eval_every=1)
    strategy.train(benchmark.train_stream[0])
    assert 0 < len(epochs) < 8
    assert 2 in epochs  # stopping ends a phase: phase 2 still trains the new adapter


def run_resume_script(*args: str) -> dict:
    script = Path(__file__).with_name("resume_script.py")
    done = subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_same_seed_same_metrics_and_checkpoint_resume_equals_an_uninterrupted_run(tmp_path):
    uninterrupted = run_resume_script("--seed", "3")
    checkpoint = str(tmp_path / "checkpoint.pkl")
    run_resume_script("--seed", "3", "--stop-after", "2", "--checkpoint", checkpoint)
    resumed = run_resume_script("--seed", "3", "--checkpoint", checkpoint)
    assert resumed == uninterrupted
    assert "Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp002" in resumed


def test_same_seed_gives_the_same_metrics_in_process():
    def run():
        torch.manual_seed(5)
        strategy = make_strategy(train_epochs=2)
        benchmark = separable_benchmark(experiences=2)
        for experience in benchmark.train_stream:
            strategy.train(experience)
        return strategy.eval(benchmark.test_stream), strategy.model.gate.alpha_vector().tolist()

    assert run() == run()


@pytest.mark.parametrize(
    "settings, error, message",
    [
        ({"phase1_fractoin": 0.5}, TypeError, "phase1_fractoin"),
        ({"phase1_fraction": 1.0}, ValueError, r"phase1_fraction: must be in \(0, 1\), got 1.0"),
        ({"phase1_fraction": 0.0}, ValueError, r"phase1_fraction: must be in \(0, 1\), got 0.0"),
        ({"gumbel_tau_final": 6.0}, ValueError, "gumbel_tau_init: must be >= gumbel_tau_final"),
        ({"optimizer": "rmsprop"}, ValueError, "optimizer: 'rmsprop' is not allowed; choose from"),
        ({"gate_optimizer": "rmsprop"}, ValueError, "gate_optimizer: 'rmsprop' is not allowed"),
        ({"gumbel_schedule": "epoch"}, ValueError, "gumbel_schedule: 'epoch' is not allowed"),
        ({"sparsity": "l1"}, ValueError, "sparsity: 'l1' is not allowed"),
        ({"loss_on": "all"}, ValueError, "loss_on: 'all' is not allowed"),
        ({"lr": 0.0, "alpha_lr": -1.0}, ValueError, "lr: must be > 0, got 0.0\n  - alpha_lr: must"),
    ],
)
def test_bad_arguments_fail_at_construction(settings, error, message):
    with pytest.raises(error, match=message):
        make_strategy(**settings)


def test_a_model_that_is_not_an_sdlora_vit_is_rejected():
    with pytest.raises(TypeError, match="SDLoRA trains an SDLoRAViT, got VisionTransformer"):
        SDLoRA(model=make_small_vit())


def test_eval_mb_size_defaults_to_the_training_batch():
    assert make_strategy(train_mb_size=16).eval_mb_size == 16


def test_report_metrics_from_a_known_matrix():
    matrix = [[90.0, 0.0, 0.0], [70.0, 80.0, 0.0], [60.0, 75.0, 85.0]]
    results = [
        {
            f"Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp{j:03d}": v / 100
            for j, v in enumerate(row)
        }
        for row in matrix
    ]
    report = summarize_run(results)
    assert [
        row == pytest.approx(expected)
        for row, expected in zip(report.accuracy_matrix, matrix, strict=True)
    ] == [True] * 3
    assert report.seen_class_accuracy == pytest.approx([90.0, 75.0, 220.0 / 3])
    assert report.last_accuracy == pytest.approx(220.0 / 3)
    assert report.average_incremental_accuracy == pytest.approx((90.0 + 75.0 + 220.0 / 3) / 3)
    assert report.average_forgetting == pytest.approx(((90 - 60) + (80 - 75)) / 2)
    assert report.backward_transfer == pytest.approx(((60 - 90) + (75 - 80)) / 2)
    assert math.isclose(summarize_run(results[:1]).average_forgetting, 0.0)
    with pytest.raises(ValueError, match="lacks per-experience accuracies"):
        summarize_run([{"Top1_Acc_Stream/eval_phase/test_stream/Task000": 0.5}])


def test_gate_trace_records_alpha_and_beta_per_adapter_and_epoch():
    trace = GateTracePlugin()
    always = GumbelPruningPlugin(growth="always")  # the new adapter stays, to be consolidated
    strategy = make_strategy([trace, always], two_phase=False, train_epochs=2)
    for experience in separable_benchmark().train_stream[:2]:
        strategy.train(experience)
    rows = trace.trace
    assert [(r["experience"], r["epoch"], r["adapter"]) for r in rows] == [
        (0, 0, 0), (0, 1, 0), (1, 0, 0), (1, 0, 1), (1, 1, 0), (1, 1, 1),
    ]  # fmt: skip
    assert {r["phase"] for r in rows} == {JOINT_PHASE}
    assert rows[0]["beta"] == 1.0  # a single adapter takes all of beta
    second = [r["beta"] for r in rows if r["experience"] == 1 and r["epoch"] == 0]
    assert sum(second) == pytest.approx(1.0, abs=1e-5)
    # the trace holds the trained alpha; consolidation then rescales it by the mean ||BA||
    model = strategy.model
    consolidated = rows[-1]["alpha"] * model.adapter_norms(1).mean().item()
    assert model.gate.alphas[1].item() == pytest.approx(consolidated, rel=1e-5)
