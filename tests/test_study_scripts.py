"""The scripts behind the study: residual statistics, accuracy per parameter, and the lever table
that measures how much the adapters buy over the head-only control."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from avalanche.training.plugins import EWCPlugin
from conftest import make_small_vit

from avalanche_sdlora.runner.baselines import make_baseline
from avalanche_sdlora.runner.config import defaults

_BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, _BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


absorption_stats = _load("absorption_stats")
params_vs_accuracy = _load("params_vs_accuracy")
lever_table = _load("lever_table")
ewc_stiffness = _load("ewc_stiffness")
study_table = _load("study_table")
survivors = _load("survivors")


def _fit(experience, residual, absorbed=False):
    return {"experience": experience, "residual": residual, "absorbed": absorbed}


def _report(params, accuracy, fits=()):
    return {
        "experiences": [{"trainable_parameters": params}],
        "last_accuracy": accuracy,
        "absorption": list(fits),
    }


METRICS = {
    "methods": {
        "sdlora_kd": {
            "seeds": {
                "0": _report(100, 20.0, [_fit(1, 0.5), _fit(1, 0.0005, True), _fit(2, 0.9)]),
                "1": _report(120, 22.0, [_fit(1, 0.2), _fit(2, 0.05)]),
            }
        },
        "sdlora_rr": {"seeds": {"0": _report(80, 21.0)}},
    }
}


def test_residual_statistics_per_experience_and_threshold():
    fits = absorption_stats.fits_by_method(METRICS)
    assert list(fits) == ["sdlora_kd"]  # runs without fits are left out
    every = [fit for per_seed in fits.values() for seed in per_seed.values() for fit in seed]
    assert absorption_stats.residual_table(every) == [
        (1, 3, 0.0005, 0.2, 0.5),
        (2, 2, 0.05, pytest.approx(0.475), 0.9),
    ]
    assert absorption_stats.below(every, (9e-4, 0.1, 1.0)) == {9e-4: 1, 0.1: 2, 1.0: 5}
    text = absorption_stats.report(METRICS)
    assert "| 0 | 3 | 1 |" in text and "| 1 | 2 | 0 |" in text


def test_points_gather_several_runs_and_refuse_a_method_twice():
    other = {"methods": {"sdlora_plain": {"seeds": {"0": _report(500, 23.0)}}}}
    gathered = params_vs_accuracy.points([METRICS, other])
    assert gathered == {
        "sdlora_kd": [(100, 20.0), (120, 22.0)],
        "sdlora_rr": [(80, 21.0)],
        "sdlora_plain": [(500, 23.0)],
    }
    rows = params_vs_accuracy.table(gathered).splitlines()[2:]
    assert rows == [
        "| sdlora_rr | 1 | 80 | 21.00 |",
        "| sdlora_kd | 2 | 110 | 21.00 ± 1.00 |",
        "| sdlora_plain | 1 | 500 | 23.00 |",
    ]
    with pytest.raises(ValueError, match="'sdlora_kd' appears in more than one"):
        params_vs_accuracy.points([METRICS, METRICS])


def _scores(last, incremental, forgetting):
    return {
        "last_accuracy": last,
        "average_incremental_accuracy": incremental,
        "average_forgetting": forgetting,
    }


def test_the_lever_table_gives_each_rows_gain_over_its_runs_head_only(tmp_path):
    with_control = {
        "methods": {
            "sdlora_plain": {
                "seeds": {"0": _scores(30.0, 40.0, 5.0), "1": _scores(32.0, 42.0, 7.0)}
            },
            "head_only": {"seeds": {"0": _scores(27.5, 39.0, 4.0), "1": _scores(28.5, 41.0, 6.0)}},
        }
    }
    run = tmp_path / "lr-0.1"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps(with_control))
    alone = tmp_path / "naive-only"
    alone.mkdir()
    (alone / "metrics.json").write_text(
        json.dumps({"methods": {"naive": {"seeds": {"0": _scores(5, 6, 7)}}}})
    )
    lines = lever_table.main([str(run / "metrics.json"), str(alone / "metrics.json")]).splitlines()
    assert lines[2:] == [
        "| lr-0.1 | sdlora_plain | 2 | 31.00 | 41.00 | 6.00 | +3.00 |",
        "| lr-0.1 | head_only | 2 | 28.00 | 40.00 | 5.00 | +0.00 |",
        "| naive-only | naive | 1 | 5.00 | 6.00 | 7.00 |  |",
    ]


def test_ewc_stiffness_sums_importances_over_experiences_and_rows_all_have():
    first = {"w": torch.tensor([[0.1, 0.3]]), "head": torch.tensor([[0.2], [0.1]])}
    second = {"w": torch.tensor([[0.2, 0.1]]), "head": torch.tensor([[0.05], [0.3], [0.9]])}
    assert ewc_stiffness.stiffest([first]) == (pytest.approx(0.3), "w")
    value, name = ewc_stiffness.stiffest([first, second])
    assert (round(value, 6), name) == (
        0.4,
        "w",
    )  # head: rows 0-1 only, 0.25 and 0.4 -> w's 0.4 first


@pytest.mark.parametrize(
    ("overrides", "mode", "decay"),
    [({}, "online", 0.5), ({"mode": "separate"}, "separate", None)],
)
def test_ewc_baseline_gets_the_configured_mode_and_decay(overrides, mode, decay):
    settings = {**defaults()["baselines"]["ewc"], **overrides}
    strategy = make_baseline(
        "ewc", make_small_vit(), settings, num_classes=4, train_mb_size=8, train_epochs=1,
        eval_mb_size=8, device="cpu",
    )  # fmt: skip
    ewc = next(p for p in strategy.plugins if isinstance(p, EWCPlugin))
    assert (ewc.mode, ewc.decay_factor, ewc.ewc_lambda) == (mode, decay, 5000.0)
    assert ewc.cap == pytest.approx(0.5 * 1.9 / (1e-3 * 5000))  # half of SGD's limit: 0.19


def test_ewc_stiffness_reads_every_importance_in_separate_mode_and_the_last_in_online_mode():
    importances = {0: {"w": torch.tensor([[0.4]])}, 1: {"w": torch.tensor([[0.5]])}}
    separate = ewc_stiffness.penalty_importances(importances, 1, "separate")
    online = ewc_stiffness.penalty_importances(importances, 1, "online")
    assert ewc_stiffness.stiffest(separate) == (pytest.approx(0.9), "w")
    assert ewc_stiffness.stiffest(online) == (pytest.approx(0.5), "w")


def _study_report(accuracy, forgetting, params, adapters=None):
    experience = {"trainable_parameters": params, "active_adapters": adapters, "wall_seconds": 5.0}
    return {
        "last_accuracy": accuracy,
        "average_incremental_accuracy": accuracy + 10,
        "average_forgetting": forgetting,
        "experiences": [dict(experience, wall_seconds=3.0), experience],
    }


def test_study_table_gathers_a_methods_seeds_over_parts_and_compares_with_head_only():
    plain = {
        "methods": {
            "sdlora_plain": {"seeds": {"0": _study_report(24.0, 10.0, 900, 10)}},
            "head_only": {"seeds": {"0": _study_report(22.0, 9.0, 300, 0)}},
        }
    }
    baselines = {"methods": {"replay": {"seeds": {"0": _study_report(20.0, 30.0, 5000)}}}}
    replay = {"methods": {"replay": {"seeds": {"1": _study_report(22.0, 34.0, 5000)}}}}
    lines = study_table.table([replay, baselines, plain]).splitlines()
    assert lines[2:] == [
        "| head_only | 1 | 22.00 | 32.00 | 9.00 | 0 | 300 | 8 | +0.00 |",
        "| sdlora_plain | 1 | 24.00 | 34.00 | 10.00 | 10 | 900 | 8 | +2.00 |",
        "| replay | 2 | 21.00 ± 1.00 | 31.00 | 32.00 ± 2.00 |  | 5,000 | 8 | -1.00 |",
    ]
    assert study_table.per_seed([replay, baselines, plain]).splitlines() == [
        "| method | seed 0 | seed 1 |",
        "|---|---|---|",
        "| replay | 20.00 | 22.00 |",
    ]
    with pytest.raises(ValueError, match="replay seed 0 appears in two parts"):
        study_table.table([baselines, baselines])


def test_a_part_at_other_growth_settings_names_its_gated_rows_by_them(tmp_path):
    gated = {"pruning": [{"experience": 0, "adapter": 0, "pruned": False, "new": True}]}
    part = {
        "methods": {
            "sdlora": {"seeds": {"0": dict(gated, last_accuracy=24.0)}},
            "head_only": {"seeds": {"0": {"pruning": [], "last_accuracy": 22.0}}},
        }
    }
    config = defaults()
    config["sdlora"].update(growth="phase1", prune_patience=2)
    (tmp_path / "metrics.json").write_text(json.dumps(part))
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = study_table.load_part(tmp_path / "metrics.json")
    assert list(loaded["methods"]) == ["sdlora (growth=phase1, prune_patience=2)", "head_only"]
    # a config from before the growth settings existed ran growth "always" with patience 1
    del config["sdlora"]["growth"], config["sdlora"]["prune_patience"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert list(study_table.load_part(tmp_path / "metrics.json")["methods"]) == [
        "sdlora (growth=always, prune_patience=1)",
        "head_only",
    ]
    # one at the defaults renames nothing
    (tmp_path / "config.json").write_text(json.dumps(defaults()))
    assert list(study_table.load_part(tmp_path / "metrics.json")["methods"]) == [
        "sdlora",
        "head_only",
    ]
    # the renamed rows rank beside their method, and stay apart from the default rule's seeds
    # EWC: a config from before the importance cap ran Avalanche's EWC, uncapped
    ewc = {"methods": {"ewc": {"seeds": {"0": {"pruning": [], "last_accuracy": 1.0}}}}}
    (tmp_path / "metrics.json").write_text(json.dumps(ewc))
    del config["baselines"]["ewc"]["max_stiffness"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert list(study_table.load_part(tmp_path / "metrics.json")["methods"]) == [
        "ewc (max_stiffness=null)"
    ]
    config = defaults()
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert list(study_table.load_part(tmp_path / "metrics.json")["methods"]) == ["ewc"]
    # a part without a config keeps its names, gated rows included
    (tmp_path / "config.json").unlink()
    (tmp_path / "metrics.json").write_text(json.dumps(part))
    assert list(study_table.load_part(tmp_path / "metrics.json")["methods"]) == [
        "sdlora",
        "head_only",
    ]
    phase1 = {"methods": {"sdlora (growth=phase1)": {"seeds": {"0": gated}}}}
    ranked = study_table.seeds_by_method([phase1, part])
    assert list(ranked) == ["head_only", "sdlora", "sdlora (growth=phase1)"]


def _decisions(table: dict[int, list[tuple[int, bool]]]) -> list[dict]:
    """A decision table: experience -> (adapter, pruned) rows; an experience's own adapter is new."""
    return [
        {"experience": e, "adapter": a, "pruned": pruned, "new": a == e}
        for e, rows in table.items()
        for a, pruned in rows
    ]


def test_survivors_per_seed_and_their_overlap_across_seeds():
    # seed 0 keeps 0 and 2; seed 1 declines to grow at experience 1 (its adapter 1 pruned as new)
    # and keeps 0 and 2; seed 2 prunes adapter 0 and keeps 1 and 2
    seed0 = {0: [(0, False)], 1: [(0, False), (1, False)], 2: [(0, False), (1, True), (2, False)]}
    seed1 = {0: [(0, False)], 1: [(0, False), (1, True)], 2: [(0, False), (2, False)]}
    seed2 = {0: [(0, False)], 1: [(0, True), (1, False)], 2: [(1, False), (2, False)]}
    part = {
        "methods": {
            "sdlora": {"seeds": {"0": {"pruning": _decisions(seed0)}}},
            "sdlora_plain": {"seeds": {"0": {"pruning": []}}},  # no gate: left out
        }
    }
    later = {
        "methods": {
            "sdlora": {
                "seeds": {str(k): {"pruning": _decisions(t)} for k, t in ((1, seed1), (2, seed2))}
            }
        }
    }
    methods = survivors.gated([part, later])
    assert list(methods) == ["sdlora"]
    assert survivors.per_seed(methods).splitlines()[2:] == [
        "| sdlora | 0 | 0, 2 | 2/3 | 0 |",
        "| sdlora | 1 | 0, 2 | 2/3 | 1 (1) |",
        "| sdlora | 2 | 1, 2 | 2/3 | 0 |",
    ]
    # Jaccard: seeds 0-1 = 1, 0-2 = 1/3, 1-2 = 1/3
    assert survivors.overlap(methods).splitlines()[2:] == ["| sdlora | 3 | 0.556 | 0.333 | 2 |"]
    assert survivors.jaccard(set(), set()) == 1.0 and survivors.jaccard({1}, {2}) == 0.0
