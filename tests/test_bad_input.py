"""Every bad input exits 2 before any work starts, names the setting and what is allowed, and leaves
no run folder; a failure while running offers ``--resume`` only where finished work exists."""

import json
import shutil
import socket
import urllib.error

import pytest
import torchvision
from test_cli import DEMO, SHRINK

from avalanche_sdlora.runner import experiment
from avalanche_sdlora.runner.cli import main
from avalanche_sdlora.runner.streams import CIFAR100_URL

DEMO_KWARGS = {
    "img_size": 64,
    "patch_size": 8,
    "embed_dim": 128,
    "depth": 4,
    "num_heads": 4,
    "class_token": False,
    "global_pool": "avg",
}
CFG = '{"mean": [0.5, 0.5], "std": [0.2, 0.2, 0.2], "crop_pct": 1.0}'

CASES = [
    (["--set", f"backbone.kwargs={json.dumps({**DEMO_KWARGS, 'bogus': 1})}"], "backbone.kwargs:"),
    (["--set", "benchmark.n_experiences=3"], "benchmark.n_experiences: must split the 10 classes"),
    (["--set", "benchmark.n_experiences=20"], "equal experiences (one of [1, 2, 5, 10]), got 20"),
    (["--set", "sdlora.momentum=1.0"], "sdlora.momentum: must be in [0, 1), got 1.0"),
    (["--set", "sdlora.blocks=[0,9]"], "sdlora.blocks: the backbone has 4 blocks (0..3)"),
    (["--set", "benchmark.class_order=[0,1,2]"], "benchmark.class_order: class order must be"),
    (["--set", "benchmark.num_classes=20"], "benchmark.num_classes: must be in 1..10"),
    (["--set", f"backbone.pretrained_cfg={CFG}"], "backbone.pretrained_cfg.mean: must be a list"),
    (["--set", "baselines.l2p.top_k=20"], "baselines.l2p.top_k: must be <= baselines.l2p.pool"),
    (["--set", "sdlora.lr=Infinity"], "sdlora.lr: must be a finite number, got inf"),
    (["--set", "sdlora.gate_lr=Infinity"], "sdlora.gate_lr: must be a finite number"),
    (["--set", "experiment.seeds=[0,0]"], "experiment.seeds: must not repeat a value"),
    (["--set", "benchmark.root=data"], "benchmark.root: digits ships with scikit-learn"),
    (["--set", "experiment.name=../../x"], "experiment.name: must be a plain folder name"),
    (["--set", "benchmark.initial_classes=3"], "at least one each (one of [2, 6]), got 3"),
    (
        ["--set", "benchmark.initial_classes=5", "--set", "benchmark.num_classes=8"],
        "benchmark.initial_classes: the other 4 experiences must share the rest of the 8",
    ),
    (["--set", "baselines.ranpac.ridges=[]"], "baselines.ranpac.ridges: must be a non-empty list"),
    (
        ["--set", "baselines.ranpac.validation_fraction=1"],
        "baselines.ranpac.validation_fraction: must be in (0, 1)",
    ),
    (
        ["--set", "baselines.ewc.max_stiffness=1.5"],
        "baselines.ewc.max_stiffness: must be in (0, 1]: past 1 SGD cannot follow the penalty",
    ),
]


@pytest.mark.parametrize("args, message", CASES)
def test_bad_input_exits_2_naming_the_setting(tmp_path, capsys, args, message):
    out = tmp_path / "run"
    assert main(["--config", DEMO, "--output", str(out), *args]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_a_config_path_that_is_a_directory(tmp_path, capsys):
    assert main(["--config", str(tmp_path)]) == 2
    assert "is a directory; give a JSON file" in capsys.readouterr().err


TOGETHER = [  # (arguments, problems reported together, checks skipped since a setting they read is bad)
    (
        ["sdlora.momentum=1.0", "benchmark.n_experiences=3", "backbone.pretrained_file={broken}"],
        ["sdlora.momentum: must be", "benchmark.n_experiences: must split", "SafetensorError"],
        [],
    ),
    (
        ["benchmark.n_experiences=three", "backbone.pretrained_file={broken}"],
        ["benchmark.n_experiences: expected int", "backbone: could not load"],
        ["must split"],
    ),
    (
        ["benchmark.name=split_cifar100", "benchmark.root={tmp}", "benchmark.n_experiences=3"],
        ["CIFAR-100 not found", "or set benchmark.download to true"],
        ["must split"],  # without the data there is no class count to split
    ),
    (
        ["benchmark.name=split_cifar100", "benchmark.root={tmp}", "backbone.bogus=1"],
        ["CIFAR-100 not found", "backbone.bogus: unknown key"],
        ["backbone: could not load"],
    ),
    (
        ["sdlora.blocks=[0,9]", "experiment.device=gpu", "benchmark.class_order=[0,1,2]"],
        [
            "sdlora.blocks: the backbone has 4 blocks",
            "experiment.device: expected cpu, cuda",
            "benchmark.class_order: class order must be",
        ],
        [],
    ),
]


@pytest.mark.parametrize("settings, reported, skipped", TOGETHER)
def test_config_data_and_weights_problems_are_reported_together(
    tmp_path, capsys, settings, reported, skipped
):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    args = [item for s in settings for item in ("--set", s.format(broken=broken, tmp=tmp_path))]
    assert main(["--config", DEMO, "--output", str(tmp_path / "run"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: invalid configuration:\n")
    assert all(message in err for message in reported), err
    assert not any(message in err for message in skipped), err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("finished", [0, 1])
def test_a_failure_offers_resume_only_where_work_finished(tmp_path, monkeypatch, capsys, finished):
    def fail(config, run_dir, backbone):
        progress = run_dir / "sdlora" / "seed0" / "progress.json"
        progress.parent.mkdir(parents=True)
        progress.write_text(json.dumps({"eval_results": [{}] * finished, "records": []}))
        raise RuntimeError("boom")

    monkeypatch.setattr(experiment, "run_experiment", fail)
    out = tmp_path / "run"
    assert main(["--config", DEMO, "--output", str(out)]) == 1
    err = capsys.readouterr().err
    if finished:
        assert f"continue with --resume {out}" in err and out.exists()
    else:
        assert "--resume" not in err and "run folder was removed" in err and not out.exists()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume") / "run"
    assert (
        main(["--config", DEMO, *SHRINK, "--set", "experiment.compare=[]", "--output", str(out)])
        == 0
    )
    return out


def test_a_resume_refuses_settings_that_would_alter_finished_work(finished_run, capsys):
    assert main(["--resume", str(finished_run), "--set", "training.epochs=2"]) == 2
    err = capsys.readouterr().err
    assert "training.epochs: 1 -> 2" in err and "start a new run instead" in err
    assert json.loads((finished_run / "config.json").read_text())["training"]["epochs"] == 1
    assert main(["--resume", str(finished_run), "--set", "experiment.threads=1"]) == 0


@pytest.mark.parametrize("name", ["checkpoint.pkl", "progress.json"])
def test_a_truncated_run_file_is_named_with_the_way_out(finished_run, tmp_path, capsys, name):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    path = run / "sdlora" / "seed0" / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert main(["--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"{path} is unreadable" in err and f"delete {path.parent} to train that run again" in err


@pytest.mark.parametrize("download", [False, True])
def test_missing_cifar_names_the_download_option_and_a_failed_download(
    tmp_path, monkeypatch, capsys, download
):
    calls = []

    def offline(url, root, **kwargs):
        calls.append((url, root, socket.getdefaulttimeout()))
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.datasets.cifar, "download_and_extract_archive", offline)
    args = ["--set", "benchmark.name=split_cifar100", "--set", f"benchmark.root={tmp_path}"]
    args += ["--set", f"benchmark.download={str(download).lower()}"]
    assert main(["--config", DEMO, "--output", str(tmp_path / "run"), *args]) == 2
    err = capsys.readouterr().err
    if download:
        assert calls == [(CIFAR100_URL, str(tmp_path), 60.0)] and socket.getdefaulttimeout() is None
        assert f"benchmark.download: could not download CIFAR-100 from {CIFAR100_URL}" in err
    else:
        assert not calls and "or set benchmark.download to true" in err
    assert not (tmp_path / "run").exists()
