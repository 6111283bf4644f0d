"""The experiment configuration: one schema, its defaults, validation and ``--set`` overrides.

A config file is JSON with the sections of :data:`SCHEMA`; anything left out takes the default written
here (the paper's protocol and the seed's gate settings). Validation reports every problem at once,
each with its dotted path: unknown keys with the nearest valid key, wrong types and out-of-range values
with the value and what is allowed.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import inspect
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from timm.models import PretrainedCfg

from avalanche_sdlora.absorption import KD_THRESHOLD
from avalanche_sdlora.adapters import targets_problem
from avalanche_sdlora.batch_transforms import INTERPOLATIONS
from avalanche_sdlora.model import SDLoRAViT
from avalanche_sdlora.pruning import GROWTH_RULES, SelectionPruner
from avalanche_sdlora.runner.data_path import AUGMENTATION_DEVICES
from avalanche_sdlora.runner.ranpac import PAPER_RIDGES
from avalanche_sdlora.runner.streams import RENDITIONS, initial_classes_problem
from avalanche_sdlora.settings import (
    OPTIMIZERS,
    SDLoRASettings,
    SettingsError,
    at_least,
    in_open_unit,
    momentum,
    positive,
    value_problem,
)

__all__ = [
    "BASELINES",
    "FREE_FORM_SETTINGS",
    "METHODS",
    "RANDOM_CONTROL",
    "RECORDED_BEFORE",
    "SCHEMA",
    "SDLORA_VARIANTS",
    "ConfigError",
    "Setting",
    "apply_override",
    "concerns",
    "defaults",
    "describe_schema",
    "load_config",
    "read_config",
    "validate",
]

BASELINES = ("naive", "ewc", "lwf", "replay", "cumulative", "l2p", "simplecil", "ranpac")
RANDOM_CONTROL = "sdlora_random"
"""Prunes, per experience, as many adapters as the ``sdlora`` run of the same seed, at random."""
SDLORA_VARIANTS: dict[str, dict[str, bool]] = {
    "sdlora": {},
    "sdlora_joint": {"two_phase": False},  # the gate, trained in one joint phase (seed's ablation)
    "sdlora_plain": {"gate": False},  # plain SD-LoRA
    RANDOM_CONTROL: {},  # trains like sdlora; its pruning is chosen at random
    "sdlora_rr": {"gate": False, "rank_reduction": True},  # SD-LoRA-RR: later adapters smaller
    "sdlora_kd": {"gate": False, "knowledge_distillation": True},  # SD-LoRA-KD: absorption
    "head_only": {"gate": False, "adapters": False},  # the control: only the head trains
}
"""SD-LoRA methods: the ``sdlora`` section with these settings overridden."""
METHODS = (*SDLORA_VARIANTS, *BASELINES)
_NUMBER = (int, float)


class ConfigError(ValueError):
    """Every problem found in a configuration, one per line."""

    def __init__(self, problems: Sequence[str]):
        self.problems = list(problems)
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in self.problems))


@dataclass(frozen=True)
class Setting:
    """One configuration value: its default, JSON type(s), an optional check and its meaning."""

    default: Any
    types: tuple[type, ...]
    help: str
    nullable: bool = False
    choices: tuple | None = None
    check: Callable[[Any], str | None] | None = None
    """Returns what is wrong with a value of the right type (``None`` when it is fine)."""
    entry_check: Callable[[str, Any], str | None] | None = None
    """For a dict: returns what is wrong with one key and its value, named by the key's own path."""

    def problem(self, value: Any) -> str | None:
        if value is None:
            return None if self.nullable else f"must not be null; expected {self.expected}"
        if isinstance(value, bool) and bool not in self.types:
            return f"expected {self.expected}"
        if not isinstance(value, self.types):
            return f"expected {self.expected}"
        return value_problem(value, self.choices, self.check)

    @property
    def expected(self) -> str:
        names = " or ".join(t.__name__ for t in self.types)
        return f"{names}{' or null' if self.nullable else ''}"


def _unit(v: float) -> str | None:
    return None if 0 <= v <= 1 else "must be in [0, 1]"


def _share_of_limit(v: float) -> str | None:
    return None if 0 < v <= 1 else "must be in (0, 1]: past 1 SGD cannot follow the penalty"


def _crop_scale(v: list) -> str | None:
    numbers = all(isinstance(x, _NUMBER) and not isinstance(x, bool) for x in v)
    if len(v) == 2 and numbers and 0 < v[0] <= v[1] <= 1:
        return None
    return "must be [min, max] with 0 < min <= max <= 1"


def _workers(v: int | str) -> str | None:
    if v == "auto" or (isinstance(v, int) and v >= 0):
        return None
    return 'must be an int >= 0 or "auto"'


def _int_list(v: list) -> str | None:
    ok = all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in v)
    return None if ok else "must be a list of ints >= 0"


def _distinct_int_list(v: list) -> str | None:
    problem = _int_list(v)
    if problem is None and len(set(v)) != len(v):
        repeated = sorted({i for i in v if v.count(i) > 1})
        return f"must not repeat a value (repeated: {repeated})"
    return problem


def _ridges(v: list) -> str | None:
    numbers = all(isinstance(x, _NUMBER) and not isinstance(x, bool) for x in v)
    if v and numbers and all(0 < x < math.inf for x in v):
        return None
    return "must be a non-empty list of finite numbers > 0"


def _rank_schedule(v: dict) -> str | None:
    """``{"experience": rank}``: keys are experience indices >= 1 in increasing order."""
    keys = [k for k in v if k.isdigit() and int(k) >= 1]
    if len(keys) != len(v):
        return 'keys must be experience indices >= 1 written as strings, e.g. {"4": 8, "8": 6}'
    if [int(k) for k in keys] != sorted({int(k) for k in keys}):
        return "keys must be increasing experience indices"
    if not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in v.values()):
        return "values must be ranks (ints >= 1)"
    return None


RUN_NAME_BYTES = 255 - len("-20240101-120000")
"""A run folder ``runs/<name>-<time>`` must fit the 255-byte limit of a file name."""


def _run_name(v: str) -> str | None:
    """A run name becomes the folder ``runs/<name>`` (or ``runs/<name>-<time>``): one plain path
    component, short enough for the file system."""
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", v) or ".." in v:
        return "must be a plain folder name: letters, digits, '_', '-' and '.', no '/' or '..'"
    if len(v) > RUN_NAME_BYTES:
        return (
            f"must be at most {RUN_NAME_BYTES} characters, not {len(v)} (the run folder "
            "runs/<name>-<time> must fit the file system's 255-byte limit on a name)"
        )
    return None


_PRETRAINED_CFG_KEYS = sorted(field.name for field in dataclasses.fields(PretrainedCfg))


def _pretrained_cfg_entry(key: str, value: Any) -> str | None:
    """One key of ``backbone.pretrained_cfg``: a field of timm's ``PretrainedCfg``; the ones the
    data transforms read hold values they can use (timm only asserts, or fails with a KeyError)."""
    if key not in _PRETRAINED_CFG_KEYS:
        close = difflib.get_close_matches(key, _PRETRAINED_CFG_KEYS, n=1, cutoff=0.5)
        guess = f"did you mean {close[0]!r}? " if close else ""
        return f"not a key of timm's pretrained config; {guess}valid keys: {_PRETRAINED_CFG_KEYS}"
    ints = isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value
    )
    if key == "input_size" and not (ints and len(value) == 3):
        return f"must be [channels, height, width], 3 ints >= 1, got {value!r}"
    if key == "interpolation" and value not in INTERPOLATIONS:
        return f"{value!r} is not allowed; choose from {list(INTERPOLATIONS)}"
    number = isinstance(value, _NUMBER) and not isinstance(value, bool)
    if key == "crop_pct" and not (number and 0 < value < math.inf):
        return f"must be a number > 0 (the eval crop's share of the resized image), got {value!r}"
    return None


def _optimizer(lr: float, optimizer: str = "sgd") -> dict[str, Setting]:
    return {
        "lr": Setting(lr, _NUMBER, "learning rate", check=positive),
        "optimizer": Setting(optimizer, (str,), "optimizer", choices=tuple(OPTIMIZERS)),
        "momentum": Setting(0.9, _NUMBER, "SGD momentum", check=momentum),
        "weight_decay": Setting(0.0, _NUMBER, "weight decay", check=at_least(0.0)),
    }


def _first_session() -> dict[str, Setting]:
    """The optional first-session adaptation of a frozen-backbone method (RanPAC's Phase 1)."""
    return {
        "first_session_adaptation": Setting(
            False,
            (bool,),
            "train a LoRA adapter (and a head) on the first experience for training.epochs epochs, "
            "then merge it into the backbone, which stays frozen from then on",
        ),
        "adaptation_lr": Setting(
            0.01, _NUMBER, "first-session adaptation: SGD's learning rate", check=positive
        ),
        "adaptation_rank": Setting(
            10, (int,), "first-session adaptation: the adapter's rank", check=at_least(1)
        ),
    }


_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "float": _NUMBER,
    "int": (int,),
    "str": (str,),
    "bool": (bool,),
}


def _from_settings(settings: type) -> dict[str, Setting]:
    """The config entries of a method's settings dataclass: each field's default, help, choices and
    check as it declares them, typed for JSON (a field that may be ``None`` is nullable)."""
    entries = {}
    for spec in dataclasses.fields(settings):
        names = [name.strip() for name in str(spec.type).split("|")]
        entries[spec.name] = Setting(
            spec.default,
            tuple(t for name in names for t in _JSON_TYPES.get(name, ())),
            spec.metadata["help"],
            nullable="None" in names,
            choices=spec.metadata["choices"],
            check=spec.metadata["check"],
        )
    return entries


_MODEL = inspect.signature(SDLoRAViT.__init__).parameters
_PRUNER = inspect.signature(SelectionPruner.__init__).parameters
"""The method's own defaults for the model and pruning settings, read from their constructors."""

SCHEMA: dict[str, dict[str, Setting | dict]] = {
    "experiment": {
        "name": Setting(
            "sdlora",
            (str,),
            "name of the run (the default run folder is runs/<name>)",
            check=_run_name,
        ),
        "strategy": Setting("sdlora", (str,), "the main method", choices=METHODS),
        "compare": Setting([], (list,), "methods run too, on the same benchmark", choices=METHODS),
        "seeds": Setting(
            [0], (list,), "training seeds; metrics get mean +- std", check=_distinct_int_list
        ),
        "baseline_seeds": Setting(
            None,
            (list,),
            "seeds of the baselines (null: seeds)",
            nullable=True,
            check=_distinct_int_list,
        ),
        "device": Setting("cpu", (str,), "cpu, cuda or cuda:N"),
        "threads": Setting(
            None,
            (int,),
            "torch CPU threads per run (null: torch's default)",
            nullable=True,
            check=at_least(1),
        ),
        "workers": Setting(
            1,
            (int,),
            "runs (method x seed) trained at once, each in its own process",
            check=at_least(1),
        ),
        "checkpoint": Setting(True, (bool,), "save an Avalanche checkpoint after every experience"),
    },
    "benchmark": {
        "name": Setting(
            "split_cifar100",
            (str,),
            "class-incremental benchmark",
            choices=("split_cifar100", "imagefolder", "digits"),
        ),
        "root": Setting(
            "data",
            (str,),
            "dataset folder (CIFAR-100 in torchvision's layout, or train/ + val/ ImageFolder trees)",
            nullable=True,
        ),
        "n_experiences": Setting(10, (int,), "number of experiences", check=at_least(1)),
        "class_order_seed": Setting(
            1993, (int,), "class order = numpy RandomState(seed).permutation", nullable=True
        ),
        "class_order": Setting(
            None,
            (list,),
            "explicit class order (overrides class_order_seed)",
            nullable=True,
            check=_int_list,
        ),
        "num_classes": Setting(
            None,
            (int,),
            "use only the first N classes of the order",
            nullable=True,
            check=at_least(1),
        ),
        "initial_classes": Setting(
            None,
            (int,),
            "classes of the first experience; the rest split evenly over the others (null: all "
            "experiences equal; 50 with 6 experiences on CIFAR-100 is B50 Inc10)",
            nullable=True,
            check=at_least(1),
        ),
        "train_per_class": Setting(
            None,
            (int,),
            "keep at most N training images per class",
            nullable=True,
            check=at_least(1),
        ),
        "validation_per_class": Setting(
            None,
            (int,),
            "hold out N training images per class as the test stream (choose settings on it, "
            "never on test images)",
            nullable=True,
            check=at_least(1),
        ),
        "rendition": Setting(
            None,
            (str,),
            "redraw every image (train and test): grayscale, contour (a line drawing), invert (the "
            "negative), solarize (values >= 128 inverted), posterize (4 levels per channel) or "
            "lowres (a quarter of the resolution, upsampled back): a stream further from the "
            "pretraining images",
            nullable=True,
            choices=tuple(RENDITIONS),
        ),
        "train_augmentation": Setting(True, (bool,), "random resized crop + flip in training"),
        "crop_scale": Setting(
            [0.05, 1.0],
            (list,),
            "area range [min, max] of the training random resized crop (the paper's: [0.05, 1])",
            check=_crop_scale,
        ),
        "download": Setting(
            False,
            (bool,),
            "split_cifar100: download CIFAR-100 with torchvision (md5-checked) when it is missing",
        ),
        "augmentation_device": Setting(
            "auto",
            (str,),
            "where images are transformed: auto (in-memory data, i.e. CIFAR-100, digits or an "
            "ImageFolder of one image size: batched on the training device; other data: pil), cpu "
            "(batched on the CPU) or pil (torchvision on PIL images, one at a time in the loader)",
            choices=AUGMENTATION_DEVICES,
        ),
        "num_workers": Setting(
            "auto",
            (int, str),
            'data loader workers; "auto": 0 on the CPU, on CUDA the CPU count (at most 8) for '
            "the PIL path and 2 for the batched path",
            check=_workers,
        ),
    },
    "backbone": {
        "name": Setting("vit_base_patch16_224.augreg2_in21k_ft_in1k", (str,), "timm model name"),
        "pretrained": Setting(
            True, (bool,), "load pretrained weights (timm hub, or pretrained_file)"
        ),
        "pretrained_file": Setting(
            None, (str,), "local .pth/.safetensors/.npz weights (works offline)", nullable=True
        ),
        "kwargs": Setting(
            {}, (dict,), "extra timm.create_model arguments (img_size, patch_size, ...)"
        ),
        "pretrained_cfg": Setting(
            {},
            (dict,),
            "overrides of timm's pretrained config (mean, std, input_size, crop_pct, interpolation): the data transforms follow it",
            entry_check=_pretrained_cfg_entry,
        ),
        "precision": Setting("fp32", (str,), "bf16 uses autocast", choices=("fp32", "bf16")),
    },
    "training": {
        "epochs": Setting(20, (int,), "epochs per experience (all methods)", check=at_least(1)),
        "batch_size": Setting(128, (int,), "training mini-batch", check=at_least(1)),
        "eval_batch_size": Setting(256, (int,), "evaluation mini-batch", check=at_least(1)),
    },
    "sdlora": {
        "rank": Setting(_MODEL["rank"].default, (int,), "adapter rank r", check=at_least(1)),
        "rank_reduction": Setting(
            False, (bool,), "SD-LoRA-RR: later adapters take the ranks of rank_schedule"
        ),
        "rank_schedule": Setting(
            {"4": 8, "8": 6},
            (dict,),
            "with rank_reduction, adapters from experience k (0-based) on have rank v (the paper's values for rank 10)",
            check=_rank_schedule,
        ),
        "knowledge_distillation": Setting(
            False,
            (bool,),
            "SD-LoRA-KD: absorb a new adapter's directions that the old ones span (gate off only)",
        ),
        "kd_threshold": Setting(
            KD_THRESHOLD, _NUMBER, "SD-LoRA-KD: absorb below this relative residual", check=positive
        ),
        "targets": Setting(
            _MODEL["targets"].default,
            (str,),
            "qkv slices with adapters, letters from 'qkv'",
            check=targets_problem,
        ),
        "blocks": Setting(
            _MODEL["blocks"].default,
            (list,),
            "indices of the blocks with adapters (null: all)",
            nullable=True,
            check=_int_list,
        ),
        "adapters": Setting(
            _MODEL["adapters"].default,
            (bool,),
            "add one adapter per experience (false: only the head trains, the head_only control)",
        ),
        "gate": Setting(
            _MODEL["gate"].default, (bool,), "Gumbel-Sparsemax gate (false: plain SD-LoRA)"
        ),
        "init_logit": Setting(_MODEL["init_logit"].default, _NUMBER, "initial gate logit"),
        "alpha_init": Setting(
            _MODEL["alpha_init"].default, _NUMBER, "initial magnitude of a new adapter"
        ),
        **_from_settings(SDLoRASettings),
        "prune_rule": Setting(
            _PRUNER["rule"].default,
            (str,),
            "eval_beta: prune where the evaluation beta is 0; frequency: the seed's sampled rule",
            choices=("eval_beta", "frequency"),
        ),
        "num_samples": Setting(
            _PRUNER["num_samples"].default,
            (int,),
            "Gumbel samples of the pruning decision",
            check=at_least(1),
        ),
        "prune_threshold": Setting(
            _PRUNER["threshold"].default,
            _NUMBER,
            "frequency rule: prune below this selection frequency",
            check=_unit,
        ),
        "eval_nme": Setting(
            False,
            (bool,),
            "also evaluate by the nearest class mean (cosine) of the features, beside the linear "
            "head; each class's mean is taken over its training images once its experience is "
            "trained",
        ),
        "prune_patience": Setting(
            _PRUNER["patience"].default,
            (int,),
            "prune an old adapter only after this many decisions in a row marked it unused",
            check=at_least(1),
        ),
        "growth": Setting(
            _PRUNER["growth"].default,
            (str,),
            "always: keep every new adapter; phase1: prune it before phase 2 where the gate chose "
            "old adapters over it; gain: keep it only when it adds growth_gain points of accuracy",
            choices=GROWTH_RULES,
        ),
        "growth_gain": Setting(
            _PRUNER["growth_gain"].default,
            _NUMBER,
            "growth gain: points of its classes' training accuracy a new adapter must add to stay",
            check=lambda v: None if 0 <= v <= 100 else "must be in [0, 100]",
        ),
    },
    "baselines": {
        "naive": {**_optimizer(1e-3)},
        "ewc": {
            **_optimizer(1e-3),
            "ewc_lambda": Setting(5000.0, _NUMBER, "EWC penalty weight", check=at_least(0.0)),
            "mode": Setting(
                "online",
                (str,),
                "online: one importance, decayed by decay_factor each experience; separate: one "
                "per experience, summed (its stiffness grows with the stream: NaN on the study)",
                choices=("online", "separate"),
            ),
            "decay_factor": Setting(
                0.5,
                _NUMBER,
                "online mode: weight of the old importance, so the sum stays below max F / (1 - it)",
                check=momentum,
            ),
            "max_stiffness": Setting(
                0.5,
                _NUMBER,
                "SGD: every importance is capped so that its penalty's curvature is at most this "
                "share of SGD's stability limit 2 (1 + momentum) / lr (past 1 the loss turns NaN); "
                "null: no cap (Avalanche's EWC)",
                nullable=True,
                check=_share_of_limit,
            ),
        },
        "lwf": {
            **_optimizer(1e-3),
            "alpha": Setting(1.0, _NUMBER, "distillation weight", check=at_least(0.0)),
            "temperature": Setting(2.0, _NUMBER, "distillation temperature", check=positive),
        },
        "replay": {
            **_optimizer(1e-3),
            "mem_size": Setting(2000, (int,), "replay memory (samples)", check=at_least(1)),
        },
        "cumulative": {**_optimizer(1e-3)},
        "l2p": {
            "lr": Setting(
                0.03, _NUMBER, "learning rate (Adam, as Avalanche's L2P)", check=positive
            ),
            "pool_size": Setting(10, (int,), "prompt pool size", check=at_least(1)),
            "prompt_length": Setting(5, (int,), "tokens per prompt", check=at_least(1)),
            "top_k": Setting(5, (int,), "prompts selected per input", check=at_least(1)),
        },
        "simplecil": {**_first_session()},
        "ranpac": {
            "projection_dim": Setting(
                None,
                (int,),
                "M, the random projection's width (null: the paper's 10000 for ViT-B's 768 "
                "features, scaled with the backbone's width: ceil(10000 * width / 768))",
                nullable=True,
                check=at_least(1),
            ),
            "ridges": Setting(
                PAPER_RIDGES,
                (list,),
                "the ridge regulariser lambda is chosen from these (the paper's 1e-8 .. 1e8)",
                check=_ridges,
            ),
            "validation_fraction": Setting(
                0.2,
                _NUMBER,
                "share of each experience's training images held out to choose lambda",
                check=in_open_unit,
            ),
            **_first_session(),
        },
    },
}


def defaults(schema: Mapping[str, Any] = SCHEMA) -> dict[str, Any]:
    """The fully resolved default configuration."""
    return {
        key: defaults(node) if isinstance(node, Mapping) else copy.deepcopy(node.default)
        for key, node in schema.items()
    }


def _nearest(key: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(key, options, n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else f"; valid keys: {sorted(options)}"


def validate(
    config: Mapping[str, Any], schema: Mapping[str, Any] = SCHEMA, path: str = ""
) -> list[str]:
    """Every problem of a (partial) configuration, as messages with dotted paths."""
    problems = []
    for key, value in config.items():
        where = f"{path}{key}"
        node = schema.get(key)
        if node is None:
            problems.append(f"{where}: unknown key{_nearest(key, list(schema))}")
        elif isinstance(node, Mapping):
            if isinstance(value, Mapping):
                problems.extend(validate(value, node, f"{where}."))
            else:
                problems.append(f"{where}: expected a section (object), got {value!r}")
        elif (problem := node.problem(value)) is not None:
            problems.append(f"{where}: {problem}, got {value!r}")
        elif node.entry_check is not None:
            problems += [
                f"{where}.{entry}: {problem}"
                for entry, item in value.items()
                if (problem := node.entry_check(entry, item)) is not None
            ]
    return problems


FREE_FORM_SETTINGS = ("kwargs", "pretrained_cfg", "rank_schedule")
"""Dict settings replaced whole, not merged (or compared) key by key."""


def _merge(base: dict[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    for key, value in update.items():
        if (
            isinstance(value, Mapping)
            and isinstance(base.get(key), dict)
            and key not in FREE_FORM_SETTINGS
        ):
            _merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)
    return base


def _setting(path: str) -> Setting:
    node: Any = SCHEMA
    walked = []
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            options = list(node) if isinstance(node, Mapping) else []
            where = ".".join([*walked, part])
            raise ConfigError([f"{where}: unknown key{_nearest(part, options)}"])
        node = node[part]
        walked.append(part)
    if isinstance(node, Mapping):
        raise ConfigError([f"{path}: is a section; set one of its keys: {sorted(node)}"])
    return node


def _parse(text: str, setting: Setting) -> Any:
    """A ``--set`` value typed by its setting: JSON where it parses, else a bare string."""
    if text == "null":
        return None
    if setting.types == (list,) and not text.startswith("["):
        return [_parse_scalar(item) for item in text.split(",") if item]
    value = _parse_scalar(text)
    if float in setting.types and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if setting.types == (str,) and not isinstance(value, str):
        return text
    return value


def _parse_scalar(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_override(config: dict[str, Any], assignment: str) -> None:
    """Apply one ``key.sub=value`` override in place (the value typed by the schema)."""
    path, sep, text = assignment.partition("=")
    if not sep or not path:
        raise ConfigError([f"--set {assignment!r}: expected key.sub=value"])
    setting = _setting(path.strip())
    value = _parse(text.strip(), setting)
    section = config
    *parents, leaf = path.strip().split(".")
    for part in parents:
        section = section.setdefault(part, {})
    section[leaf] = value


def _objects(node: Any, repeated: list[str], path: str = "") -> Any:
    """JSON parsed with ``object_pairs_hook=tuple`` (each object a tuple of its key-value pairs),
    with dicts for objects; the dotted path of every key an object gives more than once goes to
    ``repeated``, since a dict would silently keep only its last value."""
    if isinstance(node, tuple):
        keys = [key for key, _ in node]
        repeated += [f"{path}{key}" for key in dict.fromkeys(keys) if keys.count(key) > 1]
        return {key: _objects(value, repeated, f"{path}{key}.") for key, value in node}
    if isinstance(node, list):
        return [_objects(item, repeated, f"{path}{i}.") for i, item in enumerate(node)]
    return node


RECORDED_BEFORE: dict[str, Any] = {"benchmark.augmentation_device": "pil"}
"""Settings added later whose default would change what a run recorded before them does: a run
folder's ``config.json`` without one of them means this value, the behaviour its run started with."""


def _recorded_before(user: dict[str, Any]) -> None:
    """Fill in :data:`RECORDED_BEFORE` where a recorded config lacks the setting."""
    for dotted, value in RECORDED_BEFORE.items():
        *sections, leaf = dotted.split(".")
        section = user
        for name in sections:
            section = section.setdefault(name, {})
        if isinstance(section, dict):
            section.setdefault(leaf, value)


def read_config(
    path: str | Path | None = None, overrides: Sequence[str] = (), recorded: bool = False
) -> tuple[dict[str, Any], list[str]]:
    """A JSON config with ``--set`` overrides applied and the defaults filled in, and every problem
    found in it (one line each, starting with the setting's dotted path). ``recorded``: ``path``
    is a run folder's ``config.json``, whose missing settings of :data:`RECORDED_BEFORE` keep the
    behaviour the run started with.

    Raises ``ConfigError`` only when there is nothing to check (the file is missing, not UTF-8 or
    not a JSON object). With problems, the values are kept as given, so a check that reads a setting named in
    a problem must be skipped (:func:`concerns`). Settings are checked against each other only once
    each is valid on its own.
    """
    user: dict[str, Any] = {}
    problems: list[str] = []
    if path is not None:
        try:
            pairs = json.loads(Path(path).read_text("utf-8"), object_pairs_hook=tuple)
        except FileNotFoundError:
            raise ConfigError([f"config file {path} does not exist"]) from None
        except IsADirectoryError:
            raise ConfigError([f"config file {path} is a directory; give a JSON file"]) from None
        except UnicodeDecodeError as error:
            raise ConfigError(
                [f"config file {path} is not UTF-8 text ({error.reason} at byte {error.start})"]
            ) from None
        except json.JSONDecodeError as error:
            raise ConfigError([f"config file {path} is not valid JSON: {error}"]) from None
        if not isinstance(pairs, tuple):
            raise ConfigError([f"config file {path} must hold a JSON object"])
        repeated: list[str] = []
        user = _objects(pairs, repeated)
        problems += [
            f"{key}: given more than once in {path} (JSON would keep only the last); keep one"
            for key in repeated
        ]
        if recorded:
            _recorded_before(user)
    for assignment in overrides:
        try:
            apply_override(user, assignment)
        except ConfigError as error:
            problems.extend(error.problems)
    problems.extend(validate(user))
    config = _merge(defaults(), user)
    if problems:
        return config, problems
    problems = _cross_checks(config, user)
    if not problems and config["benchmark"]["name"] == "digits":
        config["benchmark"]["root"] = None  # it reads no folder; the record says so
    return config, problems


def load_config(
    path: str | Path | None = None, overrides: Sequence[str] = (), recorded: bool = False
) -> dict[str, Any]:
    """Read a JSON config, apply ``--set`` overrides, validate everything and fill in the defaults
    (``recorded``: as :func:`read_config`)."""
    config, problems = read_config(path, overrides, recorded)
    if problems:
        raise ConfigError(problems)
    return config


def concerns(problems: Sequence[str], *settings: str) -> bool:
    """Whether a problem names one of ``settings`` (dotted paths), a section holding one, or a key
    inside one: a check that reads those settings cannot run."""
    named = [problem.partition(": ")[0] for problem in problems]
    return any(
        name == setting or name.startswith(f"{setting}.") or setting.startswith(f"{name}.")
        for name in named
        for setting in settings
    )


def _cross_checks(config: Mapping[str, Any], user: Mapping[str, Any]) -> list[str]:
    """Problems between settings; ``user`` (the settings as given) tells what was set explicitly."""
    problems = []
    sdlora, benchmark = config["sdlora"], config["benchmark"]
    if benchmark["name"] == "digits" and user.get("benchmark", {}).get("root") is not None:
        problems.append(
            "benchmark.root: digits ships with scikit-learn and reads no folder; set it to null, "
            f"got {benchmark['root']!r}"
        )
    l2p = config["baselines"]["l2p"]
    if l2p["top_k"] > l2p["pool_size"]:
        problems.append(
            f"baselines.l2p.top_k: must be <= baselines.l2p.pool_size ({l2p['pool_size']}), "
            f"got {l2p['top_k']}"
        )
    channels = config["backbone"]["kwargs"].get("in_chans", 3)
    for key in ("mean", "std"):
        values = config["backbone"]["pretrained_cfg"].get(key)
        if values is not None and (not isinstance(values, list) or len(values) != channels):
            problems.append(
                f"backbone.pretrained_cfg.{key}: must be a list of {channels} numbers (one per "
                f"input channel), got {values!r}"
            )
    try:
        SDLoRASettings(**{name: sdlora[name] for name in SDLoRASettings.names()})
    except SettingsError as error:
        problems.extend(f"sdlora.{problem}" for problem in error.problems)
    used, initial = benchmark["num_classes"], benchmark["initial_classes"]
    if used is not None and initial is not None:
        if problem := initial_classes_problem(used, benchmark["n_experiences"], initial):
            problems.append(problem)
    elif used is not None and used % benchmark["n_experiences"]:
        problems.append(
            f"benchmark.num_classes: must be a multiple of benchmark.n_experiences "
            f"({benchmark['n_experiences']}), got {benchmark['num_classes']}"
        )
    methods = [config["experiment"]["strategy"], *config["experiment"]["compare"]]
    gated_kd, reduced, joint = [], [], []
    for method in dict.fromkeys(methods):
        if method not in SDLORA_VARIANTS:
            continue
        settings = {**sdlora, **SDLORA_VARIANTS[method]}
        if settings["knowledge_distillation"] and settings["gate"]:
            gated_kd.append(method)
        if settings["rank_reduction"]:
            reduced.append(method)
        if settings["growth"] == "phase1" and settings["gate"] and not settings["two_phase"]:
            joint.append(method)
    larger = {k: r for k, r in sdlora["rank_schedule"].items() if r > sdlora["rank"]}
    if reduced and larger:
        problems.append(
            f"sdlora.rank_schedule: rank reduction ({', '.join(reduced)}) gives later adapters "
            f"smaller ranks, so each must be <= sdlora.rank ({sdlora['rank']}), got {larger}"
        )
    if gated_kd:
        problems.append(
            "sdlora.knowledge_distillation: SD-LoRA-KD is defined for plain SD-LoRA (gate off), "
            f"but {gated_kd} run with the gate on; use sdlora_kd, or set sdlora.gate false"
        )
    if joint:
        problems.append(
            f"sdlora.growth: 'phase1' decides at the end of phase 1, which {joint} (one joint "
            "phase) do not have; use gain or always"
        )
    if RANDOM_CONTROL in methods and "sdlora" not in methods:
        problems.append(
            f"experiment.compare: {RANDOM_CONTROL} prunes as many adapters as the sdlora run of "
            "the same seed, so sdlora must run too (as experiment.strategy or in compare)"
        )
    for key in ("seeds", "baseline_seeds"):
        if config["experiment"][key] == []:
            problems.append(f"experiment.{key}: must name at least one seed, got []")
    device = config["experiment"]["device"]
    if device != "cpu" and not (
        device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit())
    ):
        problems.append(f"experiment.device: expected cpu, cuda or cuda:N, got {device!r}")
    return problems


def describe_schema(schema: Mapping[str, Any] = SCHEMA, path: str = "") -> list[str]:
    """One line per setting: dotted path, default and meaning (for ``--help`` and the docs)."""
    lines = []
    for key, node in schema.items():
        if isinstance(node, Mapping):
            lines.extend(describe_schema(node, f"{path}{key}."))
        else:
            lines.append(f"{path}{key} = {json.dumps(node.default)}: {node.help}")
    return lines


def methods_of(config: Mapping[str, Any]) -> list[str]:
    """The main strategy, then the compared ones, each once."""
    experiment = config["experiment"]
    return list(dict.fromkeys([experiment["strategy"], *experiment["compare"]]))


def seeds_of(config: Mapping[str, Any], method: str) -> list[int]:
    """The seeds a method runs with: ``baseline_seeds`` (if set) for the baselines."""
    experiment = config["experiment"]
    if method in SDLORA_VARIANTS or experiment["baseline_seeds"] is None:
        return experiment["seeds"]
    return experiment["baseline_seeds"]
