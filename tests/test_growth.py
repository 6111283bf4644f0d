"""The growth decision (the model grows only when its old adapters do not serve the new classes) and
the patience of pruning (an old adapter goes only after several decisions in a row marked it).

The growth tests train on checkerboard streams (tests/streams.py) and a ViT whose blocks are the
identity (``make_blind_vit``), so that only an adapter tells the classes apart. Over seeds 0-7 the
stream the old adapter solves declined growth in 8 of 8 seeds under both rules (phase-1 logit gaps
3.2 to 4.5 where 0.5 declines; gain 0.0 points where 1.0 keeps), and the stream that needs a new
direction grew at its contrast experience in 7 of 8 under ``growth="gain"`` (gains 22.5 to 50
points where measured) and declined at the repeat that follows in 8 of 8.
"""

from __future__ import annotations

import json
import math
import re
from types import SimpleNamespace

import pytest
import torch
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.training.plugins import EvaluationPlugin
from conftest import make_blind_vit, make_small_vit
from streams import contrast_pair, image_stream, plain_pair
from test_cli import DEMO, SHRINK
from test_data_path import MEAN, STD, uint8_stream
from test_selection import model_with_logits
from test_strategy import run_resume_script

from avalanche_sdlora import GumbelPruningPlugin, SDLoRA, SDLoRAViT
from avalanche_sdlora.batch_transforms import BatchTransforms
from avalanche_sdlora.plugins import BatchTransformPlugin
from avalanche_sdlora.pruning import (
    AdapterDecision,
    RandomPruner,
    SelectionPruner,
    experiences_without_growth,
)
from avalanche_sdlora.runner.cli import main
from avalanche_sdlora.runner.config import load_config
from avalanche_sdlora.runner.experiment import _make_strategy


def train_gated(experiences, growth: str, seed: int) -> SDLoRA:
    """SD-LoRA with one value adapter in the first block of ``make_blind_vit``, trained on
    ``experiences`` (``(images, labels)`` each) with the given growth rule."""
    torch.manual_seed(seed)
    strategy = SDLoRA(
        model=SDLoRAViT(make_blind_vit(), rank=4, targets="v", blocks=[0]),
        plugins=[GumbelPruningPlugin(growth=growth)],
        evaluator=EvaluationPlugin(accuracy_metrics(stream=True), loggers=[]),
        train_mb_size=16,
        train_epochs=30,
        optimizer="adam",
        lr=0.01,
        phase1_fraction=0.5,
    )
    for experience in image_stream(experiences).train_stream:
        strategy.train(experience)
    return strategy


def new_adapter_rows(strategy: SDLoRA) -> dict[int, AdapterDecision]:
    """The decision row of each experience's new adapter."""
    return {d.experience: d for d in strategy.pruning_plugin.history if d.new}


def trained(strategy: SDLoRA, adapter: int) -> bool:
    return any(module.lora_B[adapter].abs().sum() > 0 for module in strategy.model.qkv_modules)


@pytest.mark.parametrize("growth", ["phase1", "gain"])
def test_an_experience_the_old_adapter_solves_does_not_grow(growth):
    # experience 1 shows experience 0's images again, as new classes: adapter 0 tells them apart
    strategy = train_gated([(contrast_pair(0), [0, 1]), (contrast_pair(0), [2, 3])], growth, 0)
    rows = new_adapter_rows(strategy)
    history = [d.as_dict() for d in strategy.pruning_plugin.history]
    assert experiences_without_growth(history) == [1]  # "always" grows: []
    assert rows[1].pruned and not rows[1].grew and rows[0].grew
    assert strategy.model.gate.active_indices == [0]
    assert [r["active_adapters"] for r in strategy.experience_log] == [1, 1]
    if growth == "phase1":  # declined at the end of phase 1, so phase 2 never trained it
        assert rows[1].eval_beta == 0.0 and not trained(strategy, 1)
    else:  # trained, then measured: pruning it costs no accuracy on its classes
        assert rows[1].gain == 0.0 and trained(strategy, 1)


def test_an_experience_that_needs_a_new_direction_grows():
    # experience 0's classes need no adapter; experience 1's only an adapter tells apart (adapter 0,
    # trained on nothing it needed, does not); experience 2 shows experience 1's images again
    experiences = [
        (plain_pair(103), [0, 1]),
        (contrast_pair(3), [2, 3]),
        (contrast_pair(3), [4, 5]),
    ]
    strategy = train_gated(experiences, "gain", 3)
    rows = new_adapter_rows(strategy)
    history = [d.as_dict() for d in strategy.pruning_plugin.history]
    assert experiences_without_growth(history) == [2]  # "always" grows: []
    assert not rows[1].pruned and rows[1].gain >= 20.0  # the bar is 1 point
    assert rows[2].pruned and rows[2].gain < 1.0
    assert 1 in strategy.model.gate.active_indices and trained(strategy, 1)


def test_the_gain_is_measured_with_the_evaluation_transform_on_the_batched_path():
    batched = BatchTransformPlugin(BatchTransforms((16, 16), MEAN, STD), seed=3)
    pruning = GumbelPruningPlugin(growth="gain")
    strategy = SDLoRA(
        model=SDLoRAViT(make_small_vit(), rank=2),
        plugins=[pruning, batched],
        evaluator=EvaluationPlugin(accuracy_metrics(stream=True), loggers=[]),
        train_mb_size=8,
        train_epochs=1,
        lr=0.01,
    )
    for experience in uint8_stream().train_stream:  # 3 training batches each
        strategy.train(experience)
    assert batched.batches == 6  # the two passes over experience 1 drew no training crop
    gains = [d.gain for d in pruning.history if d.new]
    assert math.isnan(gains[0]) and math.isfinite(gains[1])  # the first adapter always stays


def test_phase1_growth_needs_a_phase_1():
    with pytest.raises(ValueError, match="growth 'phase1' decides at the end of phase 1"):
        SDLoRA(
            model=SDLoRAViT(make_blind_vit(), rank=2),
            plugins=[GumbelPruningPlugin(growth="phase1")],
            two_phase=False,
        )


@pytest.mark.parametrize(
    "settings, message",
    [
        (
            {"growth": "sometimes"},
            "growth must be one of ['always', 'phase1', 'gain'], got 'sometimes'",
        ),
        ({"patience": 0}, "patience must be an int >= 1, got 0"),
        ({"patience": 1.5}, "patience must be an int >= 1, got 1.5"),
        ({"growth_gain": -1.0}, "growth_gain must be in [0, 100] (points of accuracy), got -1.0"),
    ],
)
def test_bad_growth_and_patience_settings_are_named(settings, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        SelectionPruner(**settings)


@pytest.mark.parametrize("settings", [{"growth": "gain"}, {"patience": 2}])
def test_the_random_control_takes_no_growth_rule_or_patience(settings):
    with pytest.raises(ValueError, match="RandomPruner takes growth='always' and patience=1"):
        RandomPruner({1: 1}, **settings)


def test_the_plugin_decides_with_the_pruners_defaults_or_the_pruner_given():
    pruner = GumbelPruningPlugin().pruner
    assert (pruner.growth, pruner.growth_gain, pruner.patience) == ("gain", 1.0, 3)
    assert (pruner.rule, pruner.num_samples, pruner.threshold) == ("eval_beta", 200, 0.2)
    assert GumbelPruningPlugin(patience=1, growth="always").pruner.patience == 1
    control = RandomPruner({1: 1})
    assert GumbelPruningPlugin(pruner=control).pruner is control
    with pytest.raises(ValueError, match=r"not both: got a pruner and \['patience'\]"):
        GumbelPruningPlugin(pruner=control, patience=2)


def decide_and_apply(pruner: SelectionPruner, model: SDLoRAViT, experience: int) -> list:
    decisions = pruner.decide(model, experience)
    pruner.apply(model, decisions)
    return [(d.adapter, d.pruned, d.unused) for d in decisions]


def test_an_old_adapter_is_pruned_after_patience_markings_in_a_row():
    # adapter 1's evaluation beta is 0 (marked); adapter 2 is the pending (new) one, also marked
    model = model_with_logits([3.0, 0.0, -3.0, 3.0])
    model.consolidate()  # every adapter is old now
    pruner = SelectionPruner(patience=3, seed=0)
    assert decide_and_apply(pruner, model, 1) == [
        (0, False, 0),
        (1, False, 1),
        (2, False, 1),
        (3, False, 0),
    ]
    with torch.no_grad():
        model.gate.logits[2].fill_(3.0)  # adapter 2 is used again: its count restarts
    assert decide_and_apply(pruner, model, 2) == [
        (0, False, 0),
        (1, False, 2),
        (2, False, 0),
        (3, False, 0),
    ]
    assert decide_and_apply(pruner, model, 3) == [
        (0, False, 0),
        (1, True, 3),
        (2, False, 0),
        (3, False, 0),
    ]
    assert model.gate.active_indices == [0, 2, 3] and 1 not in pruner.unused


def test_a_new_adapter_is_judged_at_once_and_patience_one_is_the_one_step_verdict():
    for patience, pruned in ((1, [1, 2]), (5, [2])):
        model = model_with_logits([3.0, 0.0, -3.0])  # adapter 2 is pending: the new one
        decisions = SelectionPruner(patience=patience).decide(model, 1)
        assert [d.adapter for d in decisions if d.pruned] == pruned
        assert [d.new for d in decisions] == [False, False, True]


def test_patience_counts_survive_a_checkpoint(tmp_path):
    args = ("--seed", "1", "--patience", "2", "--epochs", "6", "--experiences", "4")
    uninterrupted = run_resume_script(*args)
    checkpoint = str(tmp_path / "checkpoint.pkl")
    run_resume_script(*args, "--stop-after", "3", "--checkpoint", checkpoint)
    resumed = run_resume_script(*args, "--checkpoint", checkpoint)
    assert resumed == uninterrupted
    # (experience, adapter, pruned, unused): marked by the third decision, pruned by the fourth,
    # the first after the checkpoint
    pruned = [row for row in resumed["pruning"] if row[2]]
    assert pruned == [[3, 0, True, 2], [3, 1, True, 2]]
    assert [2, 0, False, 1] in resumed["pruning"] and [2, 1, False, 1] in resumed["pruning"]


def test_the_runner_hands_growth_and_patience_to_the_decision(tmp_path):
    overrides = ["sdlora.growth=gain", "sdlora.growth_gain=2.5", "sdlora.prune_patience=3"]
    gated = _make_strategy("sdlora", load_config(DEMO, overrides), tmp_path / "gated", 10)
    pruner = gated.pruning_plugin.pruner
    assert (pruner.growth, pruner.growth_gain, pruner.patience) == ("gain", 2.5, 3)
    config = load_config(DEMO, [*overrides, 'experiment.compare=["sdlora_random"]'])
    reference = SimpleNamespace(pruning=[])  # the gated run's report: nothing pruned
    control = _make_strategy("sdlora_random", config, tmp_path / "control", 10, reference=reference)
    assert (control.pruning_plugin.pruner.growth, control.pruning_plugin.pruner.patience) == (
        "always",
        1,
    )


def test_a_run_reports_the_experiences_without_growth(tmp_path):
    out = tmp_path / "run"
    args = [*SHRINK, "--set", "experiment.compare=[]", "--set", "sdlora.growth=gain"]
    args += ["--set", "sdlora.growth_gain=100"]  # no adapter adds 100 points: every one is declined
    assert main(["--config", DEMO, "--output", str(out), *args]) == 0
    run = json.loads((out / "metrics.json").read_text())["methods"]["sdlora"]
    decisions = run["seeds"]["0"]["pruning"]
    assert [(d["experience"], d["new"], d["pruned"], d["grew"]) for d in decisions if d["new"]] == [
        (0, True, False, True),  # the first adapter always stays
        (1, True, True, False),
    ]
    assert run["seeds"]["0"]["experiences_without_growth"] == 1
    assert run["summary"]["experiences_without_growth"] == {"mean": 1.0, "std": 0.0}
    header = (out / "pruning.csv").read_text().splitlines()[0]
    assert header.endswith(",agreement,grew,unused,gain")


def test_phase1_growth_with_a_joint_phase_is_refused_before_any_work(tmp_path, capsys):
    args = ["--set", "sdlora.growth=phase1", "--compare", "sdlora_joint"]
    assert main(["--config", DEMO, "--output", str(tmp_path / "run"), *args]) == 2
    assert "sdlora.growth: 'phase1' decides at the end of phase 1, which ['sdlora_joint']" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "run").exists()
