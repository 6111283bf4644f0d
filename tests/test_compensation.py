"""The alpha/beta compensation measure behind benchmarks/RESULTS.md."""

import importlib.util
from pathlib import Path

import pytest

_SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "compensation.py"
_spec = importlib.util.spec_from_file_location("compensation", _SCRIPT)
compensation_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compensation_script)


def _row(experience: int, epoch: int, adapter: int, alpha: float, beta: float) -> dict:
    return {
        "experience": experience,
        "epoch": epoch,
        "adapter": adapter,
        "alpha": alpha,
        "beta": beta,
    }


def test_compensating_adapter_keeps_its_product():
    trace = [
        _row(0, 1, 0, 9.0, 1.0),  # its own experience: not counted
        _row(1, 0, 0, -1.0, 1.0),
        _row(1, 0, 1, 1.0, 0.5),
        _row(1, 1, 0, -2.0, 0.5),
        _row(1, 1, 1, 1.0, 0.75),  # adapter 1 has no later experience: no ratio
        _row(2, 0, 0, -4.0, 0.25),
    ]
    result = compensation_script.compensation(trace)
    assert result["alpha_ratio"] == pytest.approx(4.0)
    assert result["beta_ratio"] == pytest.approx(0.25)
    assert result["product_ratio"] == pytest.approx(1.0)
    assert result["opposite_share"] == pytest.approx(1.0)


def test_constant_beta_has_no_direction_share_and_table_lists_each_seed():
    trace = [_row(1, 0, 0, 1.0, 1.0), _row(2, 0, 0, 3.0, 1.0), _row(2, 0, 1, 1.0, 1.0)]
    result = compensation_script.compensation(trace)
    assert result["product_ratio"] == pytest.approx(3.0)
    assert result["opposite_share"] != result["opposite_share"]  # NaN
    metrics = {"methods": {"plain": {"seeds": {"0": {"gate_trace": trace}, "1": {}}}}}
    table = compensation_script.table(metrics)
    assert "| plain | 0 | 3.000 | 1.000 | 3.000 | nan |" in table
    assert "| plain | 1 |" not in table
