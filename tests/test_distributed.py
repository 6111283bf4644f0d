import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from avalanche.checkpointing import maybe_load_checkpoint

from avalanche_sdlora.distributed import SharedOrderSampler
from avalanche_sdlora.runner.backbones import build_backbone
from avalanche_sdlora.runner.cli import main
from avalanche_sdlora.runner.config import load_config
from avalanche_sdlora.runner.experiment import _build_benchmark, _make_strategy
from avalanche_sdlora.runner.streams import LocalCIFAR100

ROOT = Path(__file__).parents[1]
_spec = importlib.util.spec_from_file_location("smoke", ROOT / "benchmarks" / "ddp_gpu_smoke.py")
smoke = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(smoke)
DEMO = str(ROOT / "exps" / "demo.json")
TINY = [
    "--set", "training.epochs=2",  # both SD-LoRA phases
    "--set", "training.batch_size=8",  # 4 steps per epoch, the last one of 6 samples
    "--set", "benchmark.num_classes=4",
    "--set", "benchmark.n_experiences=2",
    "--set", "benchmark.train_per_class=15",
    "--set", "experiment.threads=1",
]  # fmt: skip


def torchrun(*args: str) -> subprocess.CompletedProcess:
    """``tests/ddp_script.py`` on 2 gloo processes (see its docstring for ``args``)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    script = str(Path(__file__).with_name("ddp_script.py"))
    return subprocess.run(
        [*command, script, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600
    )


def methods(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())["methods"]


def test_two_gloo_processes_train_one_run_exactly_and_resume(tmp_path):
    whole, hashes = tmp_path / "whole", tmp_path / "hashes"
    args = ["--config", DEMO, *TINY]
    done = torchrun(
        "--record", str(hashes), "--", *args, "--compare", "replay", "--output", str(whole)
    )
    assert done.returncode == 0, done.stderr

    # after every experience both ranks hold bit-identical models (and drew the same Gumbel noise)
    per_rank = [(hashes / f"rank{r}.jsonl").read_text().splitlines() for r in (0, 1)]
    assert len(per_rank[0]) == 4 and per_rank[0] == per_rank[1]
    assert len({json.loads(line)["model"] for line in per_rank[0]}) == 4

    # one run folder, written by rank 0 alone
    assert json.loads((whole / "metrics.json").read_text())["world_size"] == 2
    for method in ("sdlora", "replay"):
        assert len(list((whole / method / "seed0" / "tensorboard").iterdir())) == 1
        rows = (whole / method / "seed0" / "csv" / "eval_results.csv").read_text().splitlines()
        assert len(rows) == 1 + 2 * 2  # a header, then 2 test experiences after each of 2
    gated = methods(whole)["sdlora"]["seeds"]["0"]

    # exact evaluation: the final model evaluated here, in one process, gives the same accuracies
    config = load_config(whole / "config.json")
    strategy = _make_strategy("sdlora", config, tmp_path / "one", num_classes=4, seed=0)
    strategy, _ = maybe_load_checkpoint(strategy, whole / "sdlora" / "seed0" / "checkpoint.pkl")
    benchmark = _build_benchmark(config, build_backbone(config["backbone"]))
    one_process = strategy.eval(benchmark.test_stream)
    two_processes = json.loads((whole / "sdlora" / "seed0" / "progress.json").read_text())
    accuracies = [k for k in one_process if k.startswith("Top1_Acc_")]
    assert len(accuracies) == 3  # two experiences and the stream
    assert {k: one_process[k] for k in accuracies} == {
        k: two_processes["eval_results"][-1][k] for k in accuracies
    }

    # a failing rank brings the other down; --resume then continues on both ranks, bit for bit
    broken = tmp_path / "broken"
    failed = torchrun("--fail-rank", "1", "--", *args, "--output", str(broken))
    assert failed.returncode != 0
    assert "error while running (rank 1 of 2): RuntimeError: simulated failure" in failed.stderr
    assert not (broken / "metrics.json").exists()
    resumed = torchrun("--", "--resume", str(broken))
    assert resumed.returncode == 0, resumed.stderr
    again = methods(broken)["sdlora"]["seeds"]["0"]
    assert again["accuracy_matrix"] == gated["accuracy_matrix"]
    assert again["pruning"] == gated["pruning"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--set", "experiment.workers=2"], "experiment.workers: must be 1 under torchrun"),
        (["--set", "training.batch_size=33"], "must be a multiple of 2, got 33"),
        (["--device", "cuda:1"], "it must be cpu or cuda, got 'cuda:1'"),
    ],
)
def test_settings_torchrun_cannot_run_exit_2_before_any_work(
    tmp_path, monkeypatch, capsys, overrides, message
):
    monkeypatch.setenv("WORLD_SIZE", "2")
    out = tmp_path / "run"
    assert main(["--config", DEMO, "--output", str(out), *overrides]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_a_resume_on_another_number_of_processes_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "sdlora" / "seed0").mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(load_config(DEMO)))
    progress = {"eval_results": [{}], "records": [{}], "world_size": 2}
    (out / "sdlora" / "seed0" / "progress.json").write_text(json.dumps(progress))
    assert main(["--resume", str(out)]) == 2
    assert "trained on 2 processes" in capsys.readouterr().err


def test_the_shared_order_splits_each_global_batch_and_evaluation_is_whole():
    SharedOrderSampler.epoch_seed = 7
    order = torch.randperm(9, generator=torch.Generator().manual_seed(7)).tolist()
    padded = order + order[:1]  # 9 samples on 2 ranks: the first one again, as torch pads
    shares = [list(SharedOrderSampler(range(9), num_replicas=2, rank=r)) for r in (0, 1)]
    assert shares == [padded[0::2], padded[1::2]]  # batches of 2 per rank: global batches of 4
    evaluation = [
        SharedOrderSampler(range(9), shuffle=False, num_replicas=2, rank=r) for r in (0, 1)
    ]
    assert [list(s) for s in evaluation] == [list(range(9))] * 2


def test_the_gpu_smoke_run_is_valid_on_the_cpu_at_tiny_size(tmp_path, capsys):
    smoke.write_cifar100(tmp_path / "data", per_class=2, test_per_class=1)
    train = LocalCIFAR100(str(tmp_path / "data"), train=True)
    assert len(train) == 200 and train[0][0].size == (32, 32)
    args = argparse.Namespace(folder=tmp_path, classes=4, tiny=True)
    assert main([*smoke.run_arguments(args), "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert "methods: sdlora, naive" in plan and "(bf16)" in plan
