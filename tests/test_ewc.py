"""The runner's EWC: importances capped below SGD's stability limit, so the penalty cannot diverge."""

import pytest
import torch
from avalanche.training.plugins import EWCPlugin
from conftest import make_small_vit
from streams import separable_benchmark

from avalanche_sdlora.runner.baselines import make_baseline
from avalanche_sdlora.runner.config import defaults
from avalanche_sdlora.runner.ewc import importance_cap


def _train_ewc(max_stiffness: float | None) -> tuple[EWCPlugin, list[float], bool]:
    """EWC at lr 0.01 and lambda 1e5 on 4 experiences: each experience's largest importance, and
    whether every weight is finite at the end."""
    torch.manual_seed(0)
    settings = {
        **defaults()["baselines"]["ewc"],
        "lr": 0.01,
        "ewc_lambda": 1e5,
        "max_stiffness": max_stiffness,
    }
    strategy = make_baseline(
        "ewc", make_small_vit(), settings, num_classes=8, train_mb_size=16, train_epochs=2,
        eval_mb_size=32, device="cpu",
    )  # fmt: skip
    ewc = next(p for p in strategy.plugins if isinstance(p, EWCPlugin))
    largest = []
    for experience in separable_benchmark(experiences=4).train_stream:
        strategy.train(experience)
        importances = ewc.importances[experience.current_experience].values()
        largest.append(max(imp.data.max().item() for imp in importances))
    finite = all(torch.isfinite(p).all().item() for p in strategy.model.parameters())
    return ewc, largest, finite


def test_uncapped_importances_outgrow_sgd_and_the_weights_turn_nan():
    # Avalanche's EWC (no cap): once lr * 2 * lambda * F passes 2 * (1 + momentum), the penalty
    # makes the stiffest weights oscillate, their gradients (and the next importances) explode
    _, largest, finite = _train_ewc(None)
    assert largest[1] > importance_cap(0.01, 0.9, 1e5, 1.0)  # past the limit after experience 1
    assert largest[2] > 1e6 and not finite


def test_capped_importances_stay_below_the_limit_and_the_weights_finite():
    ewc, largest, finite = _train_ewc(0.5)
    cap = importance_cap(0.01, 0.9, 1e5, 0.5)
    assert ewc.cap == pytest.approx(cap) == pytest.approx(9.5e-4)
    assert finite and max(largest) <= cap * (1 + 1e-6)
    assert largest[0] < cap  # the first experience's importances were below the cap
    assert ewc.capped > 0  # later ones were lowered to it


@pytest.mark.parametrize("override", [{"optimizer": "adam"}, {"max_stiffness": None}])
def test_no_cap_for_adam_or_a_null_stiffness(override):
    settings = {**defaults()["baselines"]["ewc"], **override}
    strategy = make_baseline(
        "ewc", make_small_vit(), settings, num_classes=4, train_mb_size=8, train_epochs=1,
        eval_mb_size=8, device="cpu",
    )  # fmt: skip
    assert next(p for p in strategy.plugins if isinstance(p, EWCPlugin)).cap == float("inf")
