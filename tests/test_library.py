"""The package as a library: two layers, no global side effects on import, one source for every
setting, and Avalanche's conventions (template keyword arguments, optimizer factories, phase events)."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from avalanche.training.plugins import SupervisedPlugin
from conftest import make_small_vit
from streams import separable_benchmark

from avalanche_sdlora import SDLoRA, SDLoRAViT
from avalanche_sdlora.runner.cli import _parser
from avalanche_sdlora.runner.config import SCHEMA, defaults
from avalanche_sdlora.settings import SDLoRASettings, SettingsError

PACKAGE = Path(__file__).resolve().parents[1] / "avalanche_sdlora"
METHOD_MODULES = sorted(p for p in PACKAGE.glob("*.py") if p.name != "run.py")
"""The method layer; ``run.py`` is only the command's entry point into the runner."""
RUNNER_ONLY = ("avalanche_sdlora.runner", "matplotlib", "sklearn")


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("module", METHOD_MODULES, ids=lambda p: p.name)
def test_the_method_never_imports_the_runner_or_its_dependencies(module):
    found = {
        name
        for name in imported_modules(module)
        if any(name == top or name.startswith(f"{top}.") for top in RUNNER_ONLY)
    }
    assert found == set()


def test_the_data_stream_module_does_not_share_a_name_with_the_studies_folder():
    assert not (PACKAGE / "benchmarks.py").exists()
    assert (PACKAGE / "runner" / "streams.py").exists()


SIDE_EFFECTS = """
import json, warnings
import matplotlib, torch.optim
from avalanche.benchmarks.utils import data_loader
def state():
    backend = str(matplotlib.rcParams._get("backend"))
    return sorted(vars(torch.optim)), len(warnings.filters), data_loader.DistributedSampler, backend
before = state()
import avalanche_sdlora, avalanche_sdlora.runner.cli, avalanche_sdlora.runner.plots
import avalanche_sdlora.runner.experiment
print(json.dumps({"same": before == state()}))
"""


def test_importing_the_library_and_the_runner_changes_no_global_state():
    done = subprocess.run(
        [sys.executable, "-c", SIDE_EFFECTS], capture_output=True, text=True, check=True
    )
    assert done.stdout.strip().splitlines()[-1] == '{"same": true}'


def test_plots_draw_without_choosing_a_backend(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, matplotlib\n"
            "from avalanche_sdlora.runner.plots import plot_seen_accuracy\n"
            f"plot_seen_accuracy({{'m': [[1.0, 2.0]]}}, __import__('pathlib').Path({str(tmp_path)!r}) / 'p.png')\n"
            "print(str(matplotlib.rcParams._get('backend')).lower())",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert (
        done.stdout.split()[-1] != "agg"
    )  # untouched: matplotlib's own sentinel, not a forced Agg
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_leaving_the_process_group_gives_avalanche_back_its_sampler(tmp_path, monkeypatch):
    from avalanche.benchmarks.utils import data_loader

    from avalanche_sdlora import distributed

    original = data_loader.DistributedSampler
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29581")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    distributed.init_process_group("cpu")
    assert data_loader.DistributedSampler is distributed.SharedOrderSampler
    distributed.leave_process_group()
    assert data_loader.DistributedSampler is original


def test_one_source_gives_the_strategy_defaults_the_config_schema_and_help():
    fields = {spec.name: spec for spec in dataclasses.fields(SDLoRASettings)}
    signature = inspect.signature(SDLoRA.__init__).parameters
    help_text = " ".join(_parser().format_help().split())
    resolved = defaults()["sdlora"]
    for name, spec in fields.items():
        assert signature[name].default == spec.default, name
        assert SCHEMA["sdlora"][name].default == spec.default, name
        assert SCHEMA["sdlora"][name].help == spec.metadata["help"], name
        assert resolved[name] == spec.default, name
        line = f"sdlora.{name} = {__import__('json').dumps(spec.default)}: {spec.metadata['help']}"
        assert " ".join(line.split()) in help_text, name
    strategy = SDLoRA(model=SDLoRAViT(make_small_vit(), rank=2))
    assert strategy.settings == SDLoRASettings()


def test_the_settings_report_every_problem_at_once_and_the_config_says_the_same():
    with pytest.raises(SettingsError) as error:
        SDLoRASettings(lr=-1.0, sparsity="l1", momentum=1.0)
    assert error.value.problems == [
        "lr: must be > 0, got -1.0",
        "momentum: must be in [0, 1), got 1.0",
        "sparsity: 'l1' is not allowed; choose from ['gini', 'entropy'], got 'l1'",
    ]
    from avalanche_sdlora.runner.config import read_config

    _, problems = read_config(overrides=["sdlora.lr=-1", "sdlora.sparsity=l1"])
    assert problems == [
        "sdlora.lr: must be > 0, got -1.0",
        "sdlora.sparsity: 'l1' is not allowed; choose from ['gini', 'entropy'], got 'l1'",
    ]


class PhaseEvents(SupervisedPlugin):
    def __init__(self):
        super().__init__()
        self.events = []

    def before_training_phase(self, strategy, **kwargs):
        self.events.append(("before", strategy.clock.train_exp_counter, strategy.phase))

    def after_training_phase(self, strategy, **kwargs):
        self.events.append(("after", strategy.clock.train_exp_counter, strategy.phase))


def test_phases_fire_plugin_events_and_template_arguments_pass_through():
    events = PhaseEvents()
    built = []

    def factory(groups):
        built.append([group["name"] for group in groups])
        return torch.optim.SGD(groups, lr=0.1, momentum=0.5)

    strategy = SDLoRA(
        model=SDLoRAViT(make_small_vit(), rank=2),
        plugins=[events],
        optimizer=factory,
        train_mb_size=16,
        train_epochs=2,
        eval_every=5,
        peval_mode="iteration",
        device="cpu",
    )
    periodic = next(p for p in strategy.plugins if type(p).__name__ == "PeriodicEval")
    assert (strategy.eval_every, periodic.peval_mode) == (5, "iteration")  # passed through
    assert built == [["adapters", "alphas", "logits", "head"]]
    assert strategy.optimizer.defaults["momentum"] == 0.5
    for experience in separable_benchmark(experiences=2).train_stream:
        strategy.train(experience)
    assert events.events == [
        ("before", 0, 1),
        ("after", 0, 1),
        ("before", 0, 2),
        ("after", 0, 2),
        ("before", 1, 1),
        ("after", 1, 1),
        ("before", 1, 2),
        ("after", 1, 2),
    ]


def test_a_misspelled_setting_is_refused_by_name():
    with pytest.raises(TypeError, match="phase1_fractoin"):
        SDLoRA(model=SDLoRAViT(make_small_vit(), rank=2), phase1_fractoin=0.5)
