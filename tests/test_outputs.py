import json
import os
import subprocess
import sys

import pytest

from avalanche_sdlora.runner.outputs import (
    ResumableCSVLogger,
    atomic_write,
    trim_csv_logs,
    write_json,
)


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path):
    target = tmp_path / "metrics.json"
    write_json(target, {"last_accuracy": 50.0})

    def crash(path):
        path.write_text('{"last_acc')
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, crash)
    assert target.read_text() == '{\n  "last_accuracy": 50.0\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_resumable_csv_logger_keeps_earlier_rows(tmp_path):
    first = ResumableCSVLogger(tmp_path)
    print("0,0,0.5,1.0,0", file=first.eval_file)
    first.eval_file.flush()
    second = ResumableCSVLogger(tmp_path)  # as built again by a resumed run
    print("1,1,0.7,0.9,0", file=second.eval_file)
    second.eval_file.flush()
    lines = (tmp_path / "eval_results.csv").read_text().splitlines()
    assert lines[1:] == ["0,0,0.5,1.0,0", "1,1,0.7,0.9,0"]
    assert lines[0].startswith("eval_exp")


def test_metrics_are_strict_json_with_normal_permissions(tmp_path):
    target = tmp_path / "metrics.json"
    write_json(target, {"loss": float("nan"), "rows": [1.0, float("inf")], "ok": 2})
    assert json.loads(target.read_text(), parse_constant=pytest.fail) == {
        "loss": None,
        "rows": [1.0, None],
        "ok": 2,
    }
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask


def test_importing_the_package_prints_no_qp_solver_warning():
    done = subprocess.run(
        [sys.executable, "-W", "default", "-c", "import avalanche_sdlora.runner.cli"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "QP solver" not in done.stderr


def test_a_resume_drops_the_rows_of_the_unfinished_experience(tmp_path):
    training = "training_exp,epoch,training_accuracy,val_accuracy,training_loss,val_loss\n"
    training += "".join(f"{exp},{epoch},0,0,0.5,0\n" for exp in (0, 1, 2) for epoch in (0, 1))
    (tmp_path / "training_results.csv").write_text(training[: -len("2,1,0,0,0.5,0\n")])
    evaluation = (
        "eval_exp,training_exp,eval_accuracy,eval_loss,forgetting\n0,0,0.5,0,0\n0,1,0.4,0,0\n"
    )
    (tmp_path / "eval_results.csv").write_text(evaluation)
    logger = ResumableCSVLogger(tmp_path)  # open handles, as in a resumed run
    trim_csv_logs(tmp_path, finished=1)  # experience 1 was killed mid-way
    print("1,0,0,0,0.4,0", file=logger.training_file)
    logger.training_file.flush()
    lines = (tmp_path / "training_results.csv").read_text().splitlines()
    assert lines[1:] == ["0,0,0,0,0.5,0", "0,1,0,0,0.5,0", "1,0,0,0,0.4,0"]
    assert (tmp_path / "eval_results.csv").read_text().splitlines()[1:] == ["0,0,0.5,0,0"]
