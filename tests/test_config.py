import json
import re
from pathlib import Path

import pytest

from avalanche_sdlora.runner.config import ConfigError, apply_override, defaults, load_config

EXPS = Path(__file__).parents[1] / "exps"


def write(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("name", sorted(p.name for p in EXPS.glob("*.json")))
def test_shipped_configs_are_valid(name):
    config = load_config(EXPS / name)
    assert set(config) == set(defaults())


def test_paper_protocol_config():
    config = load_config(EXPS / "c100.json")
    assert config["benchmark"] | {"root": None} == {
        **defaults()["benchmark"],
        "name": "split_cifar100",
        "n_experiences": 10,
        "class_order_seed": 1993,
        "root": None,
    }
    assert config["backbone"]["name"] == "vit_base_patch16_224.augreg2_in21k_ft_in1k"
    assert config["training"] == {"epochs": 20, "batch_size": 128, "eval_batch_size": 256}
    sdlora = config["sdlora"]
    assert (sdlora["rank"], sdlora["targets"], sdlora["lr"], sdlora["gate"]) == (
        10,
        "qv",
        0.008,
        True,
    )
    assert (
        sdlora["gumbel_tau_init"],
        sdlora["gumbel_tau_final"],
        sdlora["gumbel_anneal_rate"],
    ) == (5.0, 0.5, 0.999)
    assert (sdlora["lambda_sparsity"], sdlora["prune_threshold"], sdlora["alpha_lr"]) == (
        0.1,
        0.2,
        0.04,
    )
    assert load_config(EXPS / "c100_sdlora.json")["sdlora"]["gate"] is False


def test_every_problem_is_reported_together_with_its_path(tmp_path):
    config = {
        "sdlora": {"lamda_alpha": 1.0, "phase1_fraction": 1.5},
        "training": {"epochs": "ten"},
        "benchmrk": {},
    }
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, config))
    problems = caught.value.problems
    assert len(problems) == 4
    text = str(caught.value)
    assert "sdlora.lamda_alpha: unknown key; did you mean 'lambda_alpha'?" in text
    assert "sdlora.phase1_fraction: must be in (0, 1), got 1.5" in text
    assert "training.epochs: expected int, got 'ten'" in text
    assert "benchmrk: unknown key; did you mean 'benchmark'?" in text


def test_choices_and_cross_checks(tmp_path):
    with pytest.raises(
        ConfigError, match=r"'rmsprop' is not allowed; choose from \['sgd', 'adam', 'adamw'\]"
    ):
        load_config(write(tmp_path, {"sdlora": {"optimizer": "rmsprop"}}))
    with pytest.raises(
        ConfigError, match=re.escape("sdlora.gumbel_tau_init: must be >= gumbel_tau_final")
    ):
        load_config(write(tmp_path, {"sdlora": {"gumbel_tau_init": 0.1}}))
    with pytest.raises(
        ConfigError, match=re.escape("must be a multiple of benchmark.n_experiences")
    ):
        load_config(write(tmp_path, {"benchmark": {"num_classes": 7, "n_experiences": 2}}))
    with pytest.raises(ConfigError, match="'foo' is not allowed"):
        load_config(write(tmp_path, {"experiment": {"compare": ["naive", "foo"]}}))


def test_overrides_are_typed_by_the_schema():
    config: dict = {}
    for assignment in (
        "training.epochs=3",
        "sdlora.lr=1",
        "sdlora.gate=false",
        "experiment.compare=naive,ewc",
        "benchmark.root=null",
        "benchmark.class_order=[2, 0, 1]",
        "backbone.name=vit_small_patch16_224",
        'backbone.kwargs={"img_size": 32}',
    ):
        apply_override(config, assignment)
    assert config == {
        "training": {"epochs": 3},
        "sdlora": {"lr": 1.0, "gate": False},
        "experiment": {"compare": ["naive", "ewc"]},
        "benchmark": {"root": None, "class_order": [2, 0, 1]},
        "backbone": {"name": "vit_small_patch16_224", "kwargs": {"img_size": 32}},
    }
    assert isinstance(config["sdlora"]["lr"], float)


def test_bad_overrides_name_the_problem(tmp_path):
    path = write(tmp_path, {})
    with pytest.raises(
        ConfigError, match=re.escape("training.epocs: unknown key; did you mean 'epochs'")
    ):
        load_config(path, ["training.epocs=2"])
    with pytest.raises(ConfigError, match=re.escape("training.epochs: expected int, got 'two'")):
        load_config(path, ["training.epochs=two"])
    with pytest.raises(ConfigError, match=re.escape("expected key.sub=value")):
        load_config(path, ["training.epochs"])
    with pytest.raises(ConfigError, match="is a section"):
        load_config(path, ["training=3"])


def test_missing_or_broken_config_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path / "bad.json")
