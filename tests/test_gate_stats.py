"""The gate statistics behind benchmarks/RESULTS.md: logit spread and agreement per run."""

import importlib.util
import json
from pathlib import Path

import pytest

_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gate_stats.py"
_spec = importlib.util.spec_from_file_location("gate_stats", _SCRIPT)
gate_stats = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gate_stats)


def _row(experience, adapter, logit, pruned=False, new=False, agreement=1.0):
    return {
        "experience": experience,
        "adapter": adapter,
        "logit": logit,
        "pruned": pruned,
        "new": new,
        "agreement": agreement,
    }


ROWS = [
    _row(1, 0, 0.0),
    _row(1, 1, 3.0, new=True),  # experience 1 is left out of the spread
    _row(2, 0, -1.0, pruned=True, agreement=0.5),
    _row(2, 1, 0.5),
    _row(2, 2, 0.5, new=True),
    _row(3, 1, 0.2),
    _row(3, 2, 2.0),
    _row(3, 3, 0.0, pruned=True, new=True),
]


def test_decision_stats():
    stats = gate_stats.decision_stats(ROWS, from_experience=2)
    assert stats["median_spread"] == pytest.approx(1.75)  # spreads 1.5 and 2.0
    assert stats["max_spread"] == pytest.approx(2.0)
    assert stats["mean_agreement"] == pytest.approx(7.5 / 8)
    assert (stats["pruned"], stats["pruned_new"]) == (2, 1)
    assert 0.0 < stats["seed_rule_agreement"] <= 1.0


def test_the_seed_rule_follows_the_noise_on_close_logits_only():
    close = [_row(4, i, 0.01 * i) for i in range(6)]
    apart = [_row(4, 0, 4.0), _row(4, 1, 4.0), _row(4, 2, -4.0)]
    assert gate_stats.seed_rule_agreement(close, 4, tau_final=0.5) < 0.9
    assert gate_stats.seed_rule_agreement(apart, 4, tau_final=0.5) == 1.0


def test_table_from_a_metrics_file(tmp_path, capsys):
    report = {
        "pruning": ROWS,
        "experiences": [{"active_adapters": 2, "adapters_added": 4, "train_loss": 0.5}],
        "last_accuracy": 41.0,
    }
    plain = {"pruning": [], "experiences": [], "last_accuracy": 40.0}
    metrics = {
        "methods": {"sdlora": {"seeds": {"0": report}}, "sdlora_plain": {"seeds": {"0": plain}}}
    }
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps(metrics))
    gate_stats.main([str(path), "--accuracy"])
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3  # header, rule, one gated run: plain SD-LoRA has no decisions
    assert lines[2] == "| sdlora | 0 | 1.75 | 2.00 | 0.938 | 0.825 | 2 (1) | 2/4 | 0.500 | 41.00 |"
