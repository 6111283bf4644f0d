"""The gate learns and decides: temperature schedules, seeded decisions and their agreement, the
new adapter's protection, the random-pruning control, and the fixes found on review."""

import copy
import itertools
import json

import pytest
import torch
from avalanche.training.plugins import GDumbPlugin, SupervisedPlugin
from conftest import make_small_vit
from streams import IMAGE_SIZE, separable_benchmark
from test_cli import DEMO, SHRINK
from test_strategy import make_strategy

from avalanche_sdlora import GumbelPruningPlugin, SDLoRAViT
from avalanche_sdlora.gate import phase_temperature
from avalanche_sdlora.pruning import RandomPruner, SelectionPruner
from avalanche_sdlora.runner.cli import main
from avalanche_sdlora.strategy import JOINT_PHASE


class TauRecorder(SupervisedPlugin):
    def __init__(self):
        super().__init__()
        self.taus: list[tuple[int, int, float]] = []

    def after_forward(self, strategy, **kwargs):
        self.taus.append(
            (strategy.clock.train_exp_counter, strategy.phase, strategy.model.gate.tau)
        )


@pytest.mark.parametrize("per_class", [40, 96])  # 5 and 12 steps per epoch
def test_the_temperature_reaches_tau_final_at_the_end_of_phase_1(per_class):
    recorder = TauRecorder()
    strategy = make_strategy([recorder], train_epochs=5)  # phase 1: 3 epochs, phase 2: 2
    strategy.train(separable_benchmark(per_class=per_class).train_stream[0])
    phase1 = [tau for _, phase, tau in recorder.taus if phase == 1]
    phase2 = [tau for _, phase, tau in recorder.taus if phase == 2]
    assert len(phase1) == 3 * per_class * 2 // 16
    assert phase1[0] == pytest.approx(5.0) and phase1[-1] == pytest.approx(0.5)
    assert all(a > b for a, b in itertools.pairwise(phase1))
    assert phase2 == pytest.approx([0.5] * len(phase2))


def test_a_joint_phase_anneals_over_phase1_fraction_of_its_steps():
    recorder = TauRecorder()
    strategy = make_strategy([recorder], train_epochs=5, two_phase=False, phase1_fraction=0.6)
    strategy.train(separable_benchmark().train_stream[0])  # 25 steps: anneal over the first 15
    taus = [tau for _, phase, tau in recorder.taus if phase == JOINT_PHASE]
    assert len(taus) == 25
    assert taus[13] > 0.5 and taus[14:] == pytest.approx([0.5] * 11)
    assert phase_temperature(0, 15, 5.0, 0.5) == 5.0 and phase_temperature(99, 15, 5.0, 0.5) == 0.5


def model_with_logits(logits, tau_final=0.5) -> SDLoRAViT:
    """Adapters with these logits, random non-zero directions and alpha 1; the last one pending."""
    model = SDLoRAViT(make_small_vit(), rank=2, tau_final=tau_final, initial_classes=3)
    for _ in logits:
        model.add_adapter()
    with torch.no_grad():
        for parameter, value in zip(model.gate.logits, logits, strict=True):
            parameter.fill_(value)
        for module in model.qkv_modules:
            for b in module.lora_B:
                b.normal_()
        for alpha in model.gate.alphas:
            alpha.fill_(1.0)
    return model


@pytest.mark.parametrize("rule", ["eval_beta", "frequency"])
def test_a_decision_on_separated_logits_is_the_same_under_20_redraws(rule):
    model = model_with_logits([3.0, 0.0, -3.0, 3.0])
    pruner = SelectionPruner(rule=rule, num_samples=200, seed=7, patience=1)
    torch.manual_seed(1)
    decisions = pruner.decide(model, experience=3)
    torch.manual_seed(2)  # the decision never reads torch's global generator
    assert pruner.decide(model, experience=3) == decisions
    assert [d.pruned for d in decisions] == [False, True, True, False]
    assert [d.agreement for d in decisions] == [1.0] * 4
    assert [d.eval_beta for d in decisions] == pytest.approx([0.5, 0.0, 0.0, 0.5])


def test_agreement_measures_a_decision_that_follows_the_noise():
    model = model_with_logits([0.0] * 8)
    decisions = SelectionPruner(rule="frequency", num_samples=10, seed=0).decide(model, 1)
    assert min(d.agreement for d in decisions) < 1.0
    exact = SelectionPruner(rule="eval_beta", seed=0).decide(model, 1)
    assert not any(d.pruned for d in exact) and {d.agreement for d in exact} == {1.0}


def images(count: int = 4) -> torch.Tensor:
    return torch.randn(count, 3, IMAGE_SIZE, IMAGE_SIZE)


def test_a_frozen_copy_under_no_grad_sees_the_deterministic_gate():
    model = model_with_logits([1.0, 0.0, -0.2])
    x = images()
    teacher = copy.deepcopy(model).train()  # LwF's teacher: a training-mode copy
    with torch.no_grad():
        first, second = teacher.forward_features(x), teacher.forward_features(x)
        expected = copy.deepcopy(model).eval().forward_features(x)
    assert torch.equal(first, second)
    assert torch.allclose(first, expected, atol=1e-5)
    noisy = [teacher.forward_features(x) for _ in range(3)]  # autograd on: the gate is sampled
    assert not all(torch.equal(noisy[0], n) for n in noisy[1:])


def test_tau_final_travels_with_the_state_dict():
    source = model_with_logits([1.0, 0.2], tau_final=2.0)
    target = SDLoRAViT(make_small_vit(), rank=2, tau_final=0.5)
    target.load_state_dict(source.state_dict())
    assert target.gate.tau_final == 2.0
    assert torch.equal(target.beta(noise=False), source.beta(noise=False))
    assert target.beta(noise=False)[1] > 0  # at tau 0.5 it would be exactly zero


def test_the_merged_weights_follow_in_place_data_edits():
    model = model_with_logits([0.0, 0.0]).eval()
    x = images()
    features = model.forward_features
    with torch.no_grad():
        before = features(x)
        model.gate.alphas[0].data.mul_(5.0)
        after_alpha = features(x)
        model.qkv_modules[0].lora_A[1].data.zero_()
        after_adapter = features(x)
    unmerged = features(x).detach()  # with autograd on: no merge, computed from the tensors
    assert not torch.allclose(before, after_alpha)
    assert not torch.allclose(after_alpha, after_adapter)
    assert torch.allclose(after_adapter, unmerged, atol=1e-5)


def test_a_pruning_plugin_appended_after_construction_names_the_right_experiences():
    strategy = make_strategy(train_epochs=2, pruning=False)
    plugin = GumbelPruningPlugin()
    strategy.plugins.append(plugin)  # after Avalanche's clock
    for experience in separable_benchmark().train_stream:
        strategy.train(experience)
    assert sorted({d.experience for d in plugin.history}) == [0, 1, 2]
    assert [d.adapter for d in plugin.history if d.new] == [0, 1, 2]


def test_one_adapter_per_training_experience_when_a_plugin_adapts_again():
    strategy = make_strategy([GDumbPlugin(mem_size=30)], train_epochs=1)
    benchmark = separable_benchmark()
    for experience in benchmark.train_stream:
        strategy.train(experience)
    assert strategy.model.num_adapters == 3
    model = SDLoRAViT(make_small_vit(), rank=2).train()
    for experience in [*benchmark.train_stream[:1]] * 3 + [benchmark.train_stream[1]]:
        model.adaptation(experience)
    assert model.num_adapters == 2


def test_trainable_parameters_count_only_the_classes_trained_so_far():
    strategy = make_strategy(train_epochs=1, gate=False)
    benchmark = separable_benchmark()  # 3 experiences of 2 classes
    per_adapter = 2 * 2 * 4 * (32 + 32) + 1  # 2 blocks x (q, v) x rank 4 x (in + out), alpha
    for experience in benchmark.train_stream[:2]:
        strategy.train(experience)
        strategy.eval(benchmark.test_stream)  # grows the head to all 6 classes
    assert strategy.model.head.classifier.out_features == 6
    counts = [record["trainable_parameters"] for record in strategy.experience_log]
    assert counts == [per_adapter + 2 * 33, 2 * per_adapter + 4 * 33]


class BuryTheNewAdapter(SupervisedPlugin):
    """What the README's demo at 8 epochs showed: phase 1 pushes the new adapter's logit to -13."""

    def after_training_epoch(self, strategy, **kwargs):
        if strategy.phase == 1 and strategy.clock.train_exp_counter == 1:
            with torch.no_grad():
                strategy.model.gate.logits[1].fill_(-13.0)


@pytest.mark.parametrize("protect", [True, False])
def test_a_new_adapter_trains_before_it_can_be_pruned(protect):
    always = GumbelPruningPlugin(growth="always")  # the protection alone decides
    strategy = make_strategy(
        [BuryTheNewAdapter(), always], train_epochs=3, protect_new_adapter=protect
    )
    for experience in separable_benchmark().train_stream[:2]:
        strategy.train(experience)
    model = strategy.model
    trained = any(module.lora_B[1].abs().sum() > 0 for module in model.qkv_modules)
    decision = [d for d in strategy.pruning_plugin.history if d.experience == 1 and d.new]
    assert (trained, decision[0].pruned) == ((True, False) if protect else (False, True))


class SelectionRecorder(SupervisedPlugin):
    """The logits at the end of each phase 1."""

    def __init__(self):
        super().__init__()
        self.logits: list[torch.Tensor] = []

    def after_training_epoch(self, strategy, **kwargs):
        if strategy.phase == 1:
            self.logits.append(strategy.model.gate.logit_vector().detach().clone())


def phase1_movement(**settings) -> float:
    recorder = SelectionRecorder()
    strategy = make_strategy([recorder], train_epochs=5, gate_lr=0.05, **settings)
    for experience in separable_benchmark().train_stream[:2]:
        strategy.train(experience)
    return recorder.logits[-1].abs().max().item()  # the logits start at 0


def test_the_logits_can_have_an_optimizer_of_their_own():
    adam = phase1_movement(gate_optimizer="adam")
    sgd = phase1_movement(gate_optimizer=None)
    assert adam > 0.1 and adam > 2 * sgd  # Adam moves a logit by up to gate_lr per step
    strategy = make_strategy()  # the default
    assert isinstance(strategy.gate_optimizer, torch.optim.Adam)
    strategy.train(separable_benchmark().train_stream[0])
    assert not next(g for g in strategy.optimizer.param_groups if g["name"] == "logits")["params"]


def test_random_control_prunes_the_same_counts_as_sdlora(tmp_path):
    args = [*SHRINK, "--set", "benchmark.num_classes=6", "--set", "benchmark.n_experiences=3"]
    args += ["--set", "sdlora.prune_rule=frequency", "--set", "sdlora.prune_threshold=0.9"]
    args += ["--set", "sdlora.num_samples=10", "--set", "experiment.seeds=[0,1]"]
    out = tmp_path / "run"
    assert main(["--config", DEMO, "--output", str(out), *args, "--compare", "sdlora_random"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())["methods"]
    for seed in ("0", "1"):
        gated = RandomPruner.counts_from(metrics["sdlora"]["seeds"][seed]["pruning"])
        control = RandomPruner.counts_from(metrics["sdlora_random"]["seeds"][seed]["pruning"])
        assert control == gated and sum(gated.values()) >= 2
    header = (out / "pruning.csv").read_text().splitlines()[0]
    assert header.endswith("eval_beta,mean_beta,frequency,pruned,new,agreement,grew,unused,gain")


def test_random_control_needs_the_gated_run(tmp_path, capsys):
    args = ["--set", "experiment.strategy=sdlora_plain", "--compare", "sdlora_random"]
    assert main(["--config", DEMO, "--output", str(tmp_path / "run"), *args]) == 2
    assert "sdlora_random prunes as many adapters as the sdlora run" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
