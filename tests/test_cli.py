import json
import math
from pathlib import Path

import pytest
import torch

from avalanche_sdlora.runner import plots
from avalanche_sdlora.runner.cli import main
from avalanche_sdlora.strategy import SDLoRA

ROOT = Path(__file__).parents[1]
DEMO = str(ROOT / "exps" / "demo.json")
WEIGHTS = str(ROOT / "benchmarks" / "weights" / "vit_tin100.safetensors")
SHRINK = [
    "--set", "training.epochs=1",
    "--set", "benchmark.num_classes=4",
    "--set", "benchmark.n_experiences=2",
    "--set", "benchmark.train_per_class=15",
]  # fmt: skip


def test_demo_end_to_end_with_a_baseline(tmp_path, monkeypatch, capsys):
    lines_per_plot = {}
    save = plots._save

    def counting_save(figure, path):
        lines_per_plot[path.name] = len(figure.axes[0].get_lines())
        save(figure, path)

    monkeypatch.setattr(plots, "_save", counting_save)
    out = tmp_path / "run"
    assert main(["--config", DEMO, "--output", str(out), *SHRINK, "--compare", "naive"]) == 0

    for name in ("config.json", "metrics.json", "accuracy_matrix.csv", "pruning.csv", "summary.md"):
        assert (out / name).stat().st_size > 0
    for method in ("sdlora", "naive"):
        assert (out / method / "seed0" / "checkpoint.pkl").exists()
        assert (out / method / "seed0" / "csv" / "eval_results.csv").exists()
        assert any((out / method / "seed0" / "tensorboard").iterdir())
    assert (out / "plots" / "adapters_sdlora.png").exists()
    assert (out / "plots" / "gate_trace_sdlora.png").exists()

    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics["methods"]) == ["sdlora", "naive"]
    for method, entry in metrics["methods"].items():
        report = entry["seeds"]["0"]
        matrix = report["accuracy_matrix"]
        assert len(matrix) == 2 and all(len(row) == 2 for row in matrix)
        assert all(0.0 <= v <= 100.0 for row in matrix for v in row)
        # last accuracy: on every test image, as Avalanche's stream accuracy counts them
        progress = json.loads((out / method / "seed0" / "progress.json").read_text())
        stream = progress["eval_results"][-1]["Top1_Acc_Stream/eval_phase/test_stream/Task000"]
        assert report["last_accuracy"] == pytest.approx(100 * stream)
        assert report["average_incremental_accuracy"] == pytest.approx(
            (matrix[0][0] + report["last_accuracy"]) / 2
        )
        assert entry["summary"]["last_accuracy"]["mean"] == pytest.approx(report["last_accuracy"])
    sdlora_log = metrics["methods"]["sdlora"]["seeds"]["0"]["experiences"]
    assert [r["adapters_added"] for r in sdlora_log] == [1, 2]
    assert set(sdlora_log[0]["phase_seconds"]) == {"2"}  # one epoch: phase 2 only
    trace = metrics["methods"]["sdlora"]["seeds"]["0"]["gate_trace"]
    assert [(r["experience"], r["adapter"]) for r in trace] == [(0, 0), (1, 0), (1, 1)]

    csv_rows = (out / "accuracy_matrix.csv").read_text().strip().splitlines()
    assert len(csv_rows) == 1 + 2 * 2
    table = [r for r in (out / "summary.md").read_text().splitlines() if r.startswith("| ")]
    assert [r.split("|")[1].strip() for r in table[1:]] == ["sdlora", "naive"]
    assert lines_per_plot["seen_accuracy.png"] == 2
    printed = capsys.readouterr().out
    assert "[sdlora seed 0] experience 2/2: seen-class accuracy" in printed


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--set", "training.epocs=1"], "training.epocs: unknown key; did you mean 'epochs'"),
        (["--set", "training.epochs=x"], "training.epochs: expected int, got 'x'"),
        (["--set", "sdlora.phase1_fraction=2"], "sdlora.phase1_fraction: must be in (0, 1)"),
        (
            ["--set", "benchmark.name=imagefolder", "--set", "benchmark.root=/nonexistent/tin"],
            "/nonexistent/tin/train",
        ),
        (
            ["--set", "backbone.pretrained_file=/nonexistent/w.safetensors"],
            "backbone.pretrained_file: /nonexistent/w.safetensors does not exist",
        ),
        (["--compare", "naive,sgd"], "'sgd' is not allowed"),
    ],
)
def test_bad_input_exits_2_before_any_work(tmp_path, capsys, overrides, message):
    out = tmp_path / "run"
    assert main(["--config", DEMO, "--output", str(out), *overrides]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["--config", DEMO, "--output", str(out), "--dry-run", "--seed", "4"]) == 0
    printed = capsys.readouterr().out
    assert '"seeds": [\n      4\n    ]' in printed
    assert "methods: sdlora, naive; seeds: [4]" in printed
    assert not out.exists()


def crash_and_resume(args: list[str], broken: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run ``args`` into ``broken`` with a crash in the second experience's training (exit 1,
    no metrics), then resume it to the end."""
    train = SDLoRA.train
    calls = []

    def crash_on_second_experience(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated crash")
        return train(self, *a, **k)

    monkeypatch.setattr(SDLoRA, "train", crash_on_second_experience)
    assert main([*args, "--output", str(broken)]) == 1
    assert not (broken / "metrics.json").exists()
    monkeypatch.setattr(SDLoRA, "train", train)
    assert main(["--resume", str(broken)]) == 0


def test_resume_after_a_crash_ends_with_the_same_metrics(tmp_path, monkeypatch):
    args = ["--config", DEMO, *SHRINK, "--set", "experiment.compare=[]"]
    assert main([*args, "--output", str(tmp_path / "whole")]) == 0
    broken = tmp_path / "broken"
    crash_and_resume(args, broken, monkeypatch)

    def runs(folder):
        return json.loads((folder / "metrics.json").read_text())["methods"]["sdlora"]["seeds"]

    whole, resumed = runs(tmp_path / "whole"), runs(broken)
    assert resumed["0"]["accuracy_matrix"] == whole["0"]["accuracy_matrix"]
    assert resumed["0"]["pruning"] == whole["0"]["pruning"]

    # Avalanche's CSV log keeps the rows written before the crash, once each
    def eval_rows(folder):
        lines = (folder / "sdlora" / "seed0" / "csv" / "eval_results.csv").read_text().splitlines()
        return [line.split(",")[:3] for line in lines[1:]]

    assert eval_rows(broken) == eval_rows(tmp_path / "whole")


def test_an_existing_run_folder_is_not_overwritten(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    assert main(["--config", DEMO, "--output", str(tmp_path)]) == 2
    assert "use --resume" in capsys.readouterr().err


def test_help_explains_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in (
        "--config",
        "--set",
        "--output",
        "--seed",
        "--device",
        "--resume",
        "--compare",
        "--dry-run",
    ):
        assert option in text
    assert "sdlora.phase1_fraction = 0.6" in text


def test_bf16_precision_runs_under_autocast_on_the_cpu(tmp_path, monkeypatch):
    from avalanche_sdlora.plugins import AutocastPlugin

    dtypes = []
    before = AutocastPlugin.before_forward

    def spy(self, strategy, **kwargs):
        before(self, strategy, **kwargs)
        dtypes.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)

    monkeypatch.setattr(AutocastPlugin, "before_forward", spy)
    args = [*SHRINK, "--set", "experiment.compare=[]", "--set", "backbone.precision=bf16"]
    assert main(["--config", DEMO, "--output", str(tmp_path / "run"), *args]) == 0
    assert dtypes and set(dtypes) == {torch.bfloat16}
    assert not torch.is_autocast_enabled("cpu")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["methods"]["sdlora"]["seeds"]["0"]["last_accuracy"] >= 0.0


def test_summary_over_seeds_reports_mean_and_std():
    from avalanche_sdlora.runner.report import summarize_run
    from avalanche_sdlora.runner.run_folder import summarize_seeds, summary_table

    def report(first: float, second: float):
        key = "Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp{:03d}"
        results = [
            {key.format(0): first, key.format(1): 0.0},
            {key.format(0): first, key.format(1): second},
        ]
        records = [{"train_seconds": 1.0, "peak_memory_mb": 10.0, "trainable_parameters": 5}] * 2
        return summarize_run(results, records)

    summary = summarize_seeds([report(0.8, 0.6), report(0.6, 0.6)])
    assert summary["last_accuracy"]["mean"] == pytest.approx(65.0)
    assert summary["last_accuracy"]["std"] == pytest.approx(5.0)
    assert summary["train_seconds"]["mean"] == pytest.approx(2.0)
    table = summary_table({"methods": {"m": {"summary": summary, "seeds": {"0": 0, "1": 1}}}})
    assert "| m | 2 | 65.00 ± 5.00 |" in table
    assert "| - |" in table  # no adapters for a baseline


def test_sdlora_variants_and_baseline_seeds(tmp_path, capsys):
    from avalanche_sdlora.runner.config import load_config, seeds_of
    from avalanche_sdlora.runner.experiment import _make_strategy

    args = ["--compare", "sdlora_joint,sdlora_plain,naive", "--set", "experiment.seeds=[0,1,2]"]
    args += ["--set", "experiment.baseline_seeds=[0]", "--dry-run"]
    assert main(["--config", DEMO, "--output", str(tmp_path / "run"), *args]) == 0
    plan = capsys.readouterr().out
    assert (
        "methods: sdlora, sdlora_joint, sdlora_plain, naive; seeds: [0, 1, 2] (baselines: [0])"
        in plan
    )

    config = load_config(DEMO, ["experiment.baseline_seeds=[0]", "experiment.seeds=[0,1,2]"])
    assert seeds_of(config, "sdlora_plain") == [0, 1, 2] and seeds_of(config, "naive") == [0]
    joint = _make_strategy("sdlora_joint", config, tmp_path / "joint", 10)
    plain = _make_strategy("sdlora_plain", config, tmp_path / "plain", 10)
    gated = _make_strategy("sdlora", config, tmp_path / "gated", 10)
    assert (joint.settings.two_phase, joint.model.gate_enabled) == (False, True)
    assert (plain.settings.two_phase, plain.model.gate_enabled) == (True, False)
    assert (gated.settings.two_phase, gated.model.gate_enabled) == (True, True)


def test_l2p_baseline_runs_through_the_cli(tmp_path):
    out = tmp_path / "run"
    args = [*SHRINK, "--set", "experiment.strategy=l2p", "--set", "experiment.compare=[]"]
    assert main(["--config", DEMO, "--output", str(out), *args]) == 0
    report = json.loads((out / "metrics.json").read_text())["methods"]["l2p"]["seeds"]["0"]
    assert len(report["accuracy_matrix"]) == 2
    assert report["experiences"][0]["trainable_parameters"] > 0


def test_default_run_folder_never_overwrites_a_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the config's relative paths resolve from the working directory
    args = ["--config", DEMO, *SHRINK, "--set", "experiment.compare=[]"]
    args += ["--set", f"backbone.pretrained_file={WEIGHTS}"]
    assert main(args) == 0
    assert main(args) == 0
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert runs[0] == "demo" and runs[1].startswith("demo-") and len(runs) == 2


def test_parallel_workers_give_the_same_metrics_as_one_process(tmp_path):
    """Replay starts first in the pool (it costs more); results still come back in method order."""
    args = ["--config", DEMO, *SHRINK, "--set", "experiment.threads=1", "--seed", "2"]
    args += ["--compare", "naive,replay"]
    assert main([*args, "--output", str(tmp_path / "serial")]) == 0
    assert (
        main([*args, "--output", str(tmp_path / "parallel"), "--set", "experiment.workers=2"]) == 0
    )

    def methods(folder):
        entries = json.loads((folder / "metrics.json").read_text())["methods"]
        return {m: e["seeds"]["2"]["accuracy_matrix"] for m, e in entries.items()}

    assert methods(tmp_path / "parallel") == methods(tmp_path / "serial")
    assert list(methods(tmp_path / "parallel")) == ["sdlora", "naive", "replay"]
    summary = (tmp_path / "parallel" / "summary.md").read_text()
    assert "wall time (s)" in summary


def test_a_diverged_run_is_reported(tmp_path):
    out = tmp_path / "run"
    args = [*SHRINK, "--set", "experiment.strategy=naive", "--set", "experiment.compare=[]"]
    args += ["--set", "baselines.naive.lr=1e30", "--set", "experiment.checkpoint=false"]
    # one mini-batch per experience: the first loss is computed before any update, the next is not
    with pytest.warns(RuntimeWarning, match="naive seed 0: the training loss of experience 1 is"):
        assert main(["--config", DEMO, "--output", str(out), *args]) == 0
    records = json.loads((out / "metrics.json").read_text())["methods"]["naive"]["seeds"]["0"]
    losses = [record.get("train_loss") for record in records["experiences"]]
    assert math.isfinite(losses[0]) and losses[1] is None  # strict JSON: NaN is written as null
