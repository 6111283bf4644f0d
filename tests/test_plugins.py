"""Avalanche's plugins with SD-LoRA: each one that composes trains two tiny experiences and fills its own
state; each one that cannot is refused when the strategy is built, named with the reason (docs/plugins.md)."""

import importlib.util
import math

import pytest
import torch
from avalanche.models import MlpVAE
from avalanche.training.plugins import (
    AGEMPlugin,
    BiCPlugin,
    CoPEPlugin,
    CurrentDataFeCAMUpdate,
    CurrentDataNCMUpdate,
    CWRStarPlugin,
    EWCPlugin,
    FeatureDistillationPlugin,
    FeCAMOracle,
    FromScratchTrainingPlugin,
    GDumbPlugin,
    GEMPlugin,
    GenerativeReplayPlugin,
    GSS_greedyPlugin,
    LFLPlugin,
    LwFPlugin,
    MASPlugin,
    MemoryFeCAMUpdate,
    MemoryNCMUpdate,
    MIRPlugin,
    NCMOracle,
    RARPlugin,
    ReplayPlugin,
    RWalkPlugin,
    SynapticIntelligencePlugin,
    TrainGeneratorAfterExpPlugin,
)
from avalanche.training.supervised import VAETraining
from streams import IMAGE_SIZE, separable_benchmark
from test_strategy import make_strategy, quiet_evaluator

from avalanche_sdlora.compatibility import IncompatiblePluginError

HAS_QUADPROG = importlib.util.find_spec("quadprog") is not None
NEW_LOGIT = "gate.logits.1"  # a parameter that appears only in the second experience


def generative_replay() -> list:
    """A small VAE as the generator, trained after each of the solver's experiences."""
    vae = MlpVAE((3, IMAGE_SIZE, IMAGE_SIZE), nhid=8)
    generator = VAETraining(
        vae,
        torch.optim.Adam(vae.parameters(), lr=1e-3),
        train_mb_size=16,
        train_epochs=1,
        evaluator=quiet_evaluator(),
        plugins=[GenerativeReplayPlugin()],
    )
    return [GenerativeReplayPlugin(generator_strategy=generator), TrainGeneratorAfterExpPlugin()]


def b_of_adapter_0(strategy) -> float:
    return sum(m.lora_B[0].abs().sum().item() for m in strategy.model.qkv_modules)


# name -> (plugins, what the first plugin filled, as a value to compare, and that value)
COMPOSING = {
    "Replay": (lambda: [ReplayPlugin(mem_size=20)], lambda p, s: len(p.storage_policy.buffer), 20),
    "GDumb": (lambda: [GDumbPlugin(mem_size=20)], lambda p, s: len(p.storage_policy.buffer), 20),
    "MIR": (
        lambda: [MIRPlugin(mem_size=20, subsample=10, batch_size_mem=4)],
        lambda p, s: len(p.storage_policy.buffer),
        20,
    ),
    "GSS_greedy": (
        lambda: [GSS_greedyPlugin(mem_size=100, mem_strength=2, input_size=[3, 16, 16])],
        lambda p, s: p.ext_mem_list_current_index,
        100,
    ),
    "AGEM": (lambda: [AGEMPlugin(20, 10)], lambda p, s: len(p.buffers), 2),
    "LwF": (lambda: [LwFPlugin()], lambda p, s: p.lwf.prev_model.num_adapters, 2),
    "LFL": (lambda: [LFLPlugin(lambda_e=0.1)], lambda p, s: p.prev_model.num_adapters, 2),
    "FeatureDistillation": (
        lambda: [FeatureDistillationPlugin()],
        lambda p, s: p.prev_model.num_adapters,
        2,
    ),
    "EWC separate": (
        lambda: [EWCPlugin(0.1)],
        lambda p, s: (sorted(p.importances), NEW_LOGIT in p.importances[1]),
        ([0, 1], True),
    ),
    "EWC online": (
        lambda: [EWCPlugin(0.1, mode="online", decay_factor=0.5)],
        lambda p, s: (sorted(p.importances), NEW_LOGIT in p.importances[1]),
        ([1], True),
    ),
    "MAS": (lambda: [MASPlugin()], lambda p, s: NEW_LOGIT in p.importance, True),
    "SynapticIntelligence": (
        lambda: [SynapticIntelligencePlugin(si_lambda=0.1)],
        lambda p, s: NEW_LOGIT in p.ewc_data[1],
        True,
    ),
    "RWalk": (  # the logits train in phase 1 only: their phase-2 importance has no gradient
        lambda: [RWalkPlugin()],
        lambda p, s: (
            "gate.alphas.0" in p.exp_penalties,
            "gate.logits.0" in p.exp_penalties,
            NEW_LOGIT in p.checkpoint_scores,
        ),
        (True, False, True),
    ),
    "FromScratchTraining": (  # adapter 0 is put back to its zero-B init when experience 1 starts
        lambda: [FromScratchTrainingPlugin(reset_optimizer=False)],
        lambda p, s: (NEW_LOGIT in p.initial_weights, b_of_adapter_0(s)),
        (True, 0.0),
    ),
    "GenerativeReplay": (
        generative_replay,
        lambda p, s: (p.generator_strategy.clock.train_exp_counter, p.old_model is not None),
        (2, True),
    ),
    "GEM": pytest.param(
        lambda: [GEMPlugin(patterns_per_experience=10, memory_strength=0.5)],
        lambda p, s: sorted(p.memory_x),
        [0, 1],
        marks=pytest.mark.skipif(not HAS_QUADPROG, reason="GEM needs quadprog"),
    ),
}


@pytest.mark.parametrize("plugins, filled, expected", COMPOSING.values(), ids=COMPOSING)
def test_a_composing_plugin_trains_two_experiences_and_fills_its_state(plugins, filled, expected):
    plugins = plugins()
    strategy = make_strategy(plugins, train_epochs=2)
    benchmark = separable_benchmark()
    for experience in benchmark.train_stream[:2]:
        strategy.train(experience)
    accuracy = strategy.eval(benchmark.test_stream[:2])[
        "Top1_Acc_Stream/eval_phase/test_stream/Task000"
    ]
    assert strategy.model.num_adapters == 2
    assert filled(plugins[0], strategy) == expected
    assert math.isfinite(accuracy) and accuracy > 0.5  # chance is 1/4


REFUSED = {
    "CWRStar": (lambda: CWRStarPlugin(torch.nn.Linear(2, 2)), "would silently undo the freezing"),
    "RAR": (lambda: RARPlugin(batch_size_mem=4, mem_size=10), "torch.fx cannot trace"),
    "CoPE": (lambda: CoPEPlugin(), "fixed-size embedding"),
    "BiC": (lambda: BiCPlugin(), "MultiStepLR(verbose=...)"),
    "CurrentDataNCMUpdate": (CurrentDataNCMUpdate, "NCMClassifier/FeCAMClassifier"),
    "MemoryNCMUpdate": (MemoryNCMUpdate, "NCMClassifier/FeCAMClassifier"),
    "NCMOracle": (NCMOracle, "NCMClassifier/FeCAMClassifier"),
    "CurrentDataFeCAMUpdate": (CurrentDataFeCAMUpdate, "NCMClassifier/FeCAMClassifier"),
    "MemoryFeCAMUpdate": (MemoryFeCAMUpdate, "NCMClassifier/FeCAMClassifier"),
    "FeCAMOracle": (FeCAMOracle, "NCMClassifier/FeCAMClassifier"),
    "FromScratchTraining": (FromScratchTrainingPlugin, "pass reset_optimizer=False"),
    "GenerativeReplay": (GenerativeReplayPlugin, "pass a generator strategy"),
    "GEM": pytest.param(
        lambda: GEMPlugin(10, 0.5),
        "'quadprog' solver, which is not installed",
        marks=pytest.mark.skipif(HAS_QUADPROG, reason="quadprog is installed: GEM composes"),
    ),
}


@pytest.mark.parametrize("make, reason", REFUSED.values(), ids=REFUSED)
def test_a_plugin_that_cannot_compose_is_refused_when_the_strategy_is_built(make, reason):
    plugin = make()
    with pytest.raises(IncompatiblePluginError) as refused:
        make_strategy([LwFPlugin(), plugin])
    message = str(refused.value)
    assert f"{type(plugin).__name__}: " in message and reason in message
    assert "LwFPlugin" not in message  # only the plugin that cannot compose is named
