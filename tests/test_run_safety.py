"""A run folder cannot be corrupted or mixed up: files of another run, a hand-edited config, a second
process, a folder that is not a run and a full disk are each refused or reported, before any work and
without writing anything."""

import errno
import json
import os
import shutil
import socket

import pytest
from test_cli import DEMO, SHRINK

from avalanche_sdlora.runner import experiment
from avalanche_sdlora.runner.cli import main
from avalanche_sdlora.runner.ownership import LOCK, MARKER
from avalanche_sdlora.strategy import SDLoRA

ALONE = [*SHRINK, "--set", "experiment.compare=[]"]


def snapshot(folder):
    """Every file below ``folder`` with its bytes."""
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def copy_of(run, tmp_path):
    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


def write_lock(folder, pid):
    owner = {"pid": pid, "host": socket.gethostname(), "since": "2024-01-01T00:00:00+00:00"}
    (folder / LOCK).write_text(json.dumps(owner))


def dead_pid():
    """A pid that no process has now."""
    for pid in range(2**22 - 1, 1, -1):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            continue
    raise AssertionError("every pid is taken")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """SD-LoRA and Naive, both finished."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["--config", DEMO, "--output", str(out), *SHRINK, "--compare", "naive"]) == 0
    return out


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory):
    """SD-LoRA alone, stopped by Ctrl-C in its second experience: one finished, the lock gone."""
    out = tmp_path_factory.mktemp("interrupted") / "run"
    train, calls = SDLoRA.train, []

    def interrupt_the_second(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return train(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(SDLoRA, "train", interrupt_the_second)
        assert main(["--config", DEMO, "--output", str(out), *ALONE]) == 1
    assert not (out / LOCK).exists() and (out / MARKER).exists()
    return out


@pytest.mark.parametrize(
    "method, name, message",
    [
        ("naive", "checkpoint.pkl", "it was written by naive seed 0, but sits in the folder of sdlora seed0"),
        ("naive", "progress.json", "it was written by naive seed 0, but sits in the folder of sdlora seed0"),
        ("sdlora", "checkpoint.pkl", "it was written with other settings (config sha256"),
    ],
)  # fmt: skip
def test_a_file_of_another_run_is_refused(
    finished, interrupted, tmp_path, capsys, method, name, message
):
    run = copy_of(interrupted, tmp_path)
    target = run / "sdlora" / "seed0" / name
    shutil.copyfile(finished / method / "seed0" / name, target)
    before = snapshot(run)
    assert main(["--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"{target} belongs to another run: {message}" in err
    assert f"delete {target.parent} to train that run again from its start" in err
    assert snapshot(run) == before


def test_a_config_edited_by_hand_is_refused(interrupted, tmp_path, capsys):
    run = copy_of(interrupted, tmp_path)
    config = json.loads((run / "config.json").read_text())
    config["training"]["epochs"], config["sdlora"]["lr"] = 2, 0.05
    (run / "config.json").write_text(json.dumps(config, indent=2))
    before = snapshot(run)
    assert main(["--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert "config.json was edited by hand after the run started" in err
    assert f"use --resume {run} --set key=value for the settings a resume may change" in err
    assert "or start a new run" in err
    assert snapshot(run) == before


@pytest.mark.parametrize("option", ["--config", "--output"])
def test_config_or_output_with_resume_is_refused(finished, tmp_path, capsys, option):
    before = snapshot(finished)
    value = DEMO if option == "--config" else str(tmp_path / "elsewhere")
    assert main(["--resume", str(finished), option, value]) == 2
    assert f"{option} {value} cannot go with --resume {finished}" in capsys.readouterr().err
    assert snapshot(finished) == before and not (tmp_path / "elsewhere").exists()


def test_a_folder_in_use_is_refused_and_a_stale_lock_taken_over(interrupted, tmp_path, capsys):
    run = copy_of(interrupted, tmp_path)
    write_lock(run, os.getpid())  # a live owner
    before = snapshot(run)
    assert main(["--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"{run} is in use by another run: pid {os.getpid()} on {socket.gethostname()}" in err
    assert snapshot(run) == before

    new = tmp_path / "new"  # a new run into a folder another one is starting in
    new.mkdir()
    write_lock(new, os.getpid())
    assert main(["--config", DEMO, "--output", str(new), *ALONE]) == 2
    assert f"pid {os.getpid()}" in capsys.readouterr().err
    assert [p.name for p in new.iterdir()] == [LOCK]

    stale = dead_pid()
    write_lock(run, stale)
    assert main(["--resume", str(run)]) == 0
    assert f"took over the stale lock {run / LOCK} of pid {stale}" in capsys.readouterr().err
    assert not (run / LOCK).exists()


def test_a_folder_that_is_not_a_run_is_never_written(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "metrics.json").write_text('{"my": "results"}')
    before = snapshot(mine)
    assert main(["--config", DEMO, "--output", str(mine), *ALONE]) == 2
    err = capsys.readouterr().err
    assert f"--output {mine} is not empty and holds no run" in err
    assert "choose a new or empty folder" in err
    assert snapshot(mine) == before and [p.name for p in mine.iterdir()] == ["metrics.json"]


def test_a_run_in_an_empty_folder_resumes_when_finished_and_leaves_no_lock(tmp_path, capsys):
    out = tmp_path / "empty"
    out.mkdir()
    assert main(["--config", DEMO, "--output", str(out), *ALONE]) == 0
    assert not (out / LOCK).exists()
    marker = json.loads((out / MARKER).read_text())
    assert marker["format"] == 1 and marker["created"]
    progress = json.loads((out / "sdlora" / "seed0" / "progress.json").read_text())
    assert progress["provenance"]["method"] == "sdlora" and progress["provenance"]["seed"] == 0
    assert progress["provenance"]["config_sha256"] == marker["config_sha256"]
    assert set(progress["provenance"]["versions"]) == {"avalanche-sdlora", "torch", "avalanche-lib"}
    assert main(["--resume", str(out)]) == 0
    assert main(["--resume", str(out), "--set", "experiment.threads=1"]) == 0  # a new config hash
    assert main(["--resume", str(out)]) == 0
    assert not (out / LOCK).exists()
    assert "error" not in capsys.readouterr().err


def test_a_full_disk_names_the_folder_and_the_way_on(tmp_path, monkeypatch, capsys):
    save, calls = experiment.save_checkpoint, []

    def full_after_the_first(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        save(*args, **kwargs)

    monkeypatch.setattr(experiment, "save_checkpoint", full_after_the_first)
    out = tmp_path / "run"
    assert main(["--config", DEMO, "--output", str(out), *ALONE]) == 1
    err = capsys.readouterr().err
    assert f"no space left on device for the run folder {out}" in err
    assert f"continue with --resume {out}" in err
    assert not (out / LOCK).exists()
    monkeypatch.setattr(experiment, "save_checkpoint", save)  # space freed
    assert main(["--resume", str(out)]) == 0
