"""SD-LoRA-RR (adapters of smaller rank) and SD-LoRA-KD (absorbing redundant directions)."""

import copy
import json
from types import SimpleNamespace

import pytest
import torch
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.training.plugins import EvaluationPlugin
from conftest import make_small_vit
from streams import separable_benchmark
from test_cli import DEMO, SHRINK
from test_model import FakeExperience, assert_product_equals_loop, randomise_adapter

from avalanche_sdlora import KnowledgeDistillationPlugin, SDLoRA, SDLoRAViT
from avalanche_sdlora.runner.cli import main

X = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(7))
WIDTH = 32 + 32  # d_in + d_out of one projection of the small ViT


def mixed_rank_model(gate: bool = False, backbone=None) -> SDLoRAViT:
    """Three consolidated adapters of ranks 4, 3 and 2 (by the schedule), trained-looking."""
    model = SDLoRAViT(backbone or make_small_vit(), rank=4, rank_schedule={1: 3, 2: 2}, gate=gate)
    model.head.adaptation(FakeExperience([0, 1, 2, 3, 4]))
    for index in range(3):
        model.add_adapter()
        randomise_adapter(model, index)
        with torch.no_grad():
            model.gate.alphas[index].fill_(0.5 + index)
    model.consolidate()
    return model


def evaluated(model: SDLoRAViT) -> torch.Tensor:
    """The unmerged forward in evaluation mode (autograd on, so no merge is used)."""
    model.eval()
    with torch.enable_grad():
        return model(X).detach()


def test_the_rank_schedule_sets_each_new_adapters_rank():
    model = SDLoRAViT(make_small_vit(), rank=5, rank_schedule={2: 3, 4: 1}).train()
    for experience in range(6):
        model.adaptation(
            SimpleNamespace(classes_in_this_experience=[experience], current_experience=experience)
        )
    ranks = [model.qkv_modules[0].adapter_rank(i) for i in range(6)]
    assert ranks == [5, 5, 3, 3, 1, 1]
    assert [model.rank_for(e) for e in (0, 1, 2, 7)] == [5, 5, 3, 1]
    head = 6 * 32 + 6
    # 2 blocks x (q, v) x rank x (d_in + d_out) per adapter, plus alpha and logit
    assert model.trainable_parameter_count() == sum(4 * r * WIDTH + 2 for r in ranks) + head


@pytest.mark.parametrize("gate", [True, False])
def test_mixed_ranks_forward_and_gradients_equal_a_per_adapter_loop(monkeypatch, gate):
    model = mixed_rank_model(gate)
    model.add_adapter()  # a fourth, still training, rank 2
    randomise_adapter(model, 3)
    with torch.no_grad():  # an absorbed slice and a correction take part too
        model.qkv_modules[0].absorbed[1, 0] = True
        model.qkv_modules[1].corrections[0, 1] = 0.7
    trained = assert_product_equals_loop(model.train(), X, monkeypatch)
    assert any("lora_B.3" in name for name in trained)


def make_exact_combination(model: SDLoRAViT, weights: dict[int, tuple[float, float]]) -> int:
    """Add an adapter whose update on block b's projections is w0 B0 A0 + w1 B1 A1 (weights[b]),
    by concatenating adapters 0 and 1 along the rank; blocks not in ``weights`` get random B."""
    modules = model.qkv_modules
    rank = modules[0].adapter_rank(0) + modules[0].adapter_rank(1)
    index = model.add_adapter(rank=rank)
    randomise_adapter(model, index)
    with torch.no_grad():
        for block, (w0, w1) in weights.items():
            module = modules[block]
            module.lora_A[index].copy_(torch.cat([module.lora_A[0], module.lora_A[1]], dim=1))
            module.lora_B[index].copy_(
                torch.cat([w0 * module.lora_B[0], w1 * module.lora_B[1]], dim=2)
            )
    model.consolidate()
    return index


def test_absorbing_an_exact_combination_keeps_the_outputs_and_drops_the_adapter():
    model = SDLoRAViT(make_small_vit(), rank=3, gate=False)
    model.head.adaptation(FakeExperience([0, 1, 2, 3, 4]))
    for index in range(2):
        model.add_adapter()
        randomise_adapter(model, index)
    new = make_exact_combination(model, {0: (2.0, -0.5), 1: (0.3, 1.5)})
    assert model.qkv_modules[0].adapter_rank(new) == 6
    before = evaluated(model)
    fits = model.direction_fits(new)
    assert [(f.block, f.projection) for f in fits] == [(0, "q"), (0, "v"), (1, "q"), (1, "v")]
    assert max(f.residual for f in fits) < 1e-9
    assert model.absorb(new, threshold=9e-4) == [(0, "q"), (0, "v"), (1, "q"), (1, "v")]
    assert model.gate.active_indices == [0, 1]  # absorbed everywhere: gone
    torch.testing.assert_close(evaluated(model), before, rtol=0, atol=1e-5)
    # the old adapters' corrections carry it: w_i * ||B_i A_i|| * alpha_new / ||B_new A_new||
    module, p = model.qkv_modules[0], 0
    norms = [torch.linalg.matrix_norm(module.lora_B[i][p] @ module.lora_A[i][p]) for i in (0, 1, 2)]
    expected = 2.0 * norms[0] / norms[2] * model.gate.alphas[new].item()
    assert module.corrections[0, p].item() == pytest.approx(expected.item(), rel=1e-4)
    head = 5 * 32 + 5
    corrections = 2 * 2 * 2  # two old adapters x 2 blocks x (q, v), all non-zero
    assert model.trainable_parameter_count() == 2 * (4 * 3 * WIDTH + 1) + corrections + head


def two_random_adapters() -> SDLoRAViT:
    model = SDLoRAViT(make_small_vit(), rank=3, gate=False)
    model.head.adaptation(FakeExperience([0, 1, 2, 3, 4]))
    for index in range(2):
        model.add_adapter()
        randomise_adapter(model, index)
    return model


def test_a_poor_fit_absorbs_nothing():
    model = two_random_adapters()
    new = make_exact_combination(model, {})  # random everywhere: nearly orthogonal to the old
    assert min(f.residual for f in model.direction_fits(new)) > 0.5
    before, count = evaluated(model), model.trainable_parameter_count()
    assert model.absorb(new, threshold=9e-4) == []
    assert all(not m.absorbed.any() and not m.corrections.any() for m in model.qkv_modules)
    torch.testing.assert_close(evaluated(model), before, rtol=0, atol=0)
    assert model.trainable_parameter_count() == count


def test_absorption_is_per_projection():
    model = two_random_adapters()
    new = make_exact_combination(model, {1: (0.3, 1.5)})  # exact on block 1 only
    before, count = evaluated(model), model.trainable_parameter_count()
    assert model.absorb(new, threshold=9e-4) == [(1, "q"), (1, "v")]
    assert new in model.gate.active_indices  # it still acts on block 0
    torch.testing.assert_close(evaluated(model), before, rtol=0, atol=1e-5)
    # block 1 loses the new adapter's q and v slices (rank 6) and gains two corrections each
    assert count - model.trainable_parameter_count() == 2 * 6 * WIDTH - 2 * 2


def test_merged_evaluation_equals_unmerged_with_mixed_ranks_and_absorbed_slices():
    model = mixed_rank_model()
    with torch.no_grad():
        model.qkv_modules[1].absorbed[2] = True
        model.qkv_modules[1].corrections[0] = torch.tensor([0.4, -0.2])
    unmerged = evaluated(model)
    with torch.no_grad():
        merged = model(X)
    assert all(m.merged_weight is not None for m in model.qkv_modules)
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-5)
    with torch.no_grad():  # an in-place change of a correction drops the merge
        model.qkv_modules[1].corrections[0, 0] = 3.0
        changed = model(X)
    torch.testing.assert_close(changed, evaluated(model), rtol=0, atol=1e-5)
    assert (changed - merged).abs().max() > 1e-4


def test_a_checkpoint_with_mixed_ranks_and_absorptions_loads_into_a_fresh_model():
    backbone = make_small_vit()
    pristine = copy.deepcopy(backbone)
    model = mixed_rank_model(backbone=backbone)
    new = make_exact_combination(model, {0: (1.0, 1.0)})
    assert model.absorb(new, threshold=9e-4) == [(0, "q"), (0, "v")]
    expected = evaluated(model)
    fresh = SDLoRAViT(pristine, rank=7, gate=False, initial_classes=2)  # no schedule, other rank
    fresh.load_state_dict(model.state_dict())
    assert [fresh.qkv_modules[0].adapter_rank(i) for i in range(4)] == [4, 3, 2, 7]
    for loaded, saved in zip(fresh.qkv_modules, model.qkv_modules, strict=True):
        assert torch.equal(loaded.absorbed, saved.absorbed)
        assert torch.equal(loaded.corrections, saved.corrections)
    torch.testing.assert_close(evaluated(fresh), expected, rtol=0, atol=0)
    assert fresh.trainable_parameter_count() == model.trainable_parameter_count()


def test_absorption_needs_the_gate_off_and_a_consolidated_adapter():
    gated = mixed_rank_model(gate=True)
    with pytest.raises(ValueError, match="plain SD-LoRA"):
        gated.absorb(2, threshold=9e-4)
    with pytest.raises(ValueError, match="plain SD-LoRA"):
        SDLoRA(model=gated, plugins=[KnowledgeDistillationPlugin()])
    plain = mixed_rank_model()
    plain.add_adapter()
    with pytest.raises(ValueError, match="still training"):
        plain.direction_fits(3)
    with pytest.raises(ValueError, match="threshold"):
        KnowledgeDistillationPlugin(threshold=0.0)


@pytest.mark.parametrize(
    "schedule, message",
    [
        ({0: 3}, "ints >= 1"),
        ({"4": 3}, "ints >= 1"),
        ({4: 0}, ">= 1"),
        ({4: 3, 2: 2}, "increasing"),
        ([4, 3], "must map"),
    ],
)
def test_bad_rank_schedules_raise(schedule, message):
    with pytest.raises((TypeError, ValueError), match=message):
        SDLoRAViT(make_small_vit(), rank_schedule=schedule)


def test_the_plugin_fits_and_absorbs_after_each_experience_and_publishes_each_fit():
    benchmark = separable_benchmark(experiences=3)
    plugin = KnowledgeDistillationPlugin(threshold=1.01)  # residuals are <= 1: absorb everything
    strategy = SDLoRA(
        model=SDLoRAViT(make_small_vit(), rank=4, rank_schedule={2: 2}, gate=False),
        plugins=[plugin],
        evaluator=EvaluationPlugin(accuracy_metrics(stream=True), loggers=[]),
        train_mb_size=16,
        train_epochs=2,
        lr=0.05,
    )
    for experience in benchmark.train_stream:
        strategy.train(experience)
    results = strategy.eval(benchmark.test_stream)
    assert [(f.experience, f.block, f.projection) for f in plugin.history] == [
        (e, b, p) for e in (1, 2) for b in (0, 1) for p in "qv"
    ]
    assert all(f.absorbed and 0 <= f.residual <= 1 for f in plugin.history)
    assert strategy.model.gate.active_indices == [0]  # adapters 1 and 2 went into adapter 0
    assert strategy.model.qkv_modules[0].adapter_rank(2) == 2
    assert 0.0 < results["Top1_Acc_Stream/eval_phase/test_stream/Task000"] <= 1.0
    published = strategy.evaluator.get_all_metrics()
    assert "Absorption/Exp002/Block01/v/residual" in published
    record = strategy.experience_log[-1]
    assert record["active_adapters"] == 1
    assert [a["absorbed_projections"] for a in record["adapters"]] == [0, 4, 4]


def test_the_runner_trains_rr_and_kd_resumes_them_and_plots_accuracy_per_parameter(
    tmp_path, monkeypatch
):
    args = ["--config", DEMO, *SHRINK, "--set", "benchmark.num_classes=6"]
    args += ["--set", "benchmark.n_experiences=3", "--set", "experiment.strategy=sdlora_rr"]
    args += ["--compare", "sdlora_kd", "--set", 'sdlora.rank_schedule={"1":2,"2":1}']
    args += ["--set", "sdlora.kd_threshold=1.01"]  # residuals are <= 1: absorb everything
    whole = tmp_path / "whole"
    assert main([*args, "--output", str(whole)]) == 0

    train, calls = SDLoRA.train, []

    def crash_mid_rr_then_mid_kd(self, *a, **k):
        # calls 1-3: sdlora_rr's experiences, 4-6: sdlora_kd's; a resume retrains the crashed one
        calls.append(1)
        if len(calls) in (3, 7):  # rr after its rank-2 adapter; kd after its first absorption
            raise RuntimeError("simulated crash")
        return train(self, *a, **k)

    monkeypatch.setattr(SDLoRA, "train", crash_mid_rr_then_mid_kd)
    broken = tmp_path / "broken"
    assert main([*args, "--output", str(broken)]) == 1
    assert main(["--resume", str(broken)]) == 1
    assert main(["--resume", str(broken)]) == 0
    assert len(calls) == 8

    metrics = json.loads((whole / "metrics.json").read_text())["methods"]
    resumed = json.loads((broken / "metrics.json").read_text())["methods"]
    for method in ("sdlora_rr", "sdlora_kd"):
        for key in ("accuracy_matrix", "absorption"):
            assert resumed[method]["seeds"]["0"][key] == metrics[method]["seeds"]["0"][key]
    rr = metrics["sdlora_rr"]["seeds"]["0"]["experiences"][-1]["adapters"]
    assert [a["rank"] for a in rr] == [4, 2, 1]
    kd = metrics["sdlora_kd"]["seeds"]["0"]
    assert [(f["experience"], f["absorbed"]) for f in kd["absorption"]] == [
        (e, True)
        for e in (1, 2)
        for _ in range(4 * 2)  # 4 blocks x (q, v)
    ]
    assert kd["experiences"][-1]["active_adapters"] == 1
    rows = (whole / "absorption.csv").read_text().splitlines()
    assert (
        rows[0] == "method,seed,experience,adapter,block,projection,residual,absorbed,coefficients"
    )
    assert len(rows) == 1 + 16
    assert (whole / "plots" / "params_vs_accuracy.png").stat().st_size > 0


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--set", 'sdlora.rank_schedule={"0":4}'],
            "sdlora.rank_schedule: keys must be experience",
        ),
        (
            ["--set", 'sdlora.rank_schedule={"x":4}'],
            "sdlora.rank_schedule: keys must be experience",
        ),
        (["--set", 'sdlora.rank_schedule={"4":2,"2":1}'], "keys must be increasing"),
        (["--set", 'sdlora.rank_schedule={"4":0}'], "values must be ranks (ints >= 1)"),
        (["--set", "sdlora.rank_schedule=[4,8]"], "sdlora.rank_schedule: expected dict"),
        (["--set", "sdlora.kd_threshold=0"], "sdlora.kd_threshold: must be > 0"),
        (
            ["--set", "sdlora.knowledge_distillation=true"],
            "SD-LoRA-KD is defined for plain SD-LoRA (gate off), but ['sdlora'] run with the gate",
        ),
    ],
)
def test_bad_variant_settings_exit_2(tmp_path, capsys, args, message):
    out = tmp_path / "run"
    assert main(["--config", DEMO, "--output", str(out), *args]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
