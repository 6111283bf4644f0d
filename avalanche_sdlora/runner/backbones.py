"""Pretrained timm ViT backbones: by name from the hub, or from a local weights file (offline)."""

from __future__ import annotations

import logging
import re
import socket
import traceback
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import timm
from huggingface_hub import try_to_load_from_cache
from safetensors import SafetensorError
from torch import nn

__all__ = ["WEIGHT_SUFFIXES", "BackboneError", "build_backbone", "check_backbone"]

WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".npz")


_SIZE_MISMATCH = re.compile(
    r"size mismatch for (\S+): copying a param with shape torch\.Size\((\[.*?\])\) from "
    r"checkpoint, the shape in current model is torch\.Size\((\[.*?\])\)"
)
"""PyTorch's ``load_state_dict`` message for one tensor of the wrong shape."""
_UNMATCHED = re.compile(r"(Missing|Unexpected) keys \((.*)\) (?:discovered|found) while loading")
"""timm's log line for the keys a non-strict load left out."""


class BackboneError(ValueError):
    """The backbone cannot be built as configured (unknown name, missing weights file)."""


def check_backbone(settings: Mapping[str, Any]) -> None:
    """Fast checks before any work: a known timm name, and an existing weights file of a known kind."""
    name = settings["name"]
    if not timm.is_model(name.split(".")[0]):
        raise BackboneError(f"backbone.name: timm has no model {name!r}")
    weights = settings["pretrained_file"]
    if weights is not None and not settings["pretrained"]:
        raise BackboneError(
            f"backbone.pretrained: false means random initial weights, yet "
            f"backbone.pretrained_file is {weights!r}; set backbone.pretrained to true to load "
            "the file, or backbone.pretrained_file to null"
        )
    if weights is None:
        if settings["pretrained"] and not _hub_weights_available(name):
            raise BackboneError(
                f"backbone.pretrained: the weights of {name!r} are not cached and the timm hub "
                "(huggingface.co) cannot be reached; download them elsewhere and set "
                "backbone.pretrained_file to the local .pth/.safetensors/.npz file"
            )
        return
    path = Path(weights)
    if not path.is_file():
        raise BackboneError(f"backbone.pretrained_file: {path} does not exist")
    if path.suffix not in WEIGHT_SUFFIXES:
        raise BackboneError(
            f"backbone.pretrained_file: {path} must be one of {list(WEIGHT_SUFFIXES)} files"
        )


def _hub_weights_available(name: str) -> bool:
    """Cached locally, or the hub's host resolves (a DNS lookup: fails in seconds when offline)."""
    config = timm.models.get_pretrained_cfg(name, allow_unregistered=True)
    repo = getattr(config, "hf_hub_id", None)
    if repo is None:
        return True  # not a hub model: let timm report what it needs
    cached = (try_to_load_from_cache(repo, f) for f in ("model.safetensors", "pytorch_model.bin"))
    if any(isinstance(path, str) for path in cached):
        return True
    try:
        socket.getaddrinfo("huggingface.co", 443)
    except OSError:
        return False
    return True


@contextmanager
def _unmatched_keys() -> Iterator[dict[str, list[str]]]:
    """The keys timm's pretrained loader left out, by kind (``Missing``: the model's, not in the
    weights; ``Unexpected``: the weights', not in the model). timm loads without ``strict`` once it
    drops the classifier and only logs them, at info level, which is let through here just to be
    read: what the log shows is unchanged."""
    logger = logging.getLogger("timm.models._builder")
    shown, level = logger.getEffectiveLevel(), logger.level
    keys: dict[str, list[str]] = {"Missing": [], "Unexpected": []}

    def read(record: logging.LogRecord) -> bool:
        if match := _UNMATCHED.match(record.getMessage()):
            keys[match[1]] += match[2].split(", ")
        return record.levelno >= shown

    logger.addFilter(read)
    logger.setLevel(logging.INFO)
    try:
        yield keys
    finally:
        logger.removeFilter(read)
        logger.setLevel(level)


def _depth_problem(model: nn.Module, unmatched: Mapping[str, list[str]], source: str) -> str | None:
    """What is wrong when the weights hold another number of ViT blocks than the model: blocks the
    weights lack would keep their random weights, blocks the model lacks would be dropped."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        return None
    depth, missing = len(blocks), set(unmatched["Missing"])
    names = model.state_dict().keys()
    absent = [
        i for i in range(depth) if {n for n in names if n.startswith(f"blocks.{i}.")} <= missing
    ]
    extra = {int(m[1]) for k in unmatched["Unexpected"] if (m := re.match(r"blocks\.(\d+)\.", k))}
    extra -= set(range(depth))
    if not absent and not extra:
        return None
    held = max(extra) + 1 if extra else depth - len(absent)
    fate = (
        f"the model's blocks {absent} would keep random weights"
        if absent
        else f"the weights' blocks {sorted(extra)} would be dropped"
    )
    return (
        f"backbone.kwargs: the weights in {source} hold {held} blocks, the model these kwargs "
        f"build has {depth} ({fate}); set backbone.kwargs.depth to {held}"
    )


def build_backbone(settings: Mapping[str, Any]) -> nn.Module:
    """The timm model of ``settings`` (a ``backbone`` config section), with its pretrained weights
    and without its classifier.

    ``pretrained_file`` loads local weights through timm's own pretrained path (``.npz`` with the
    model's custom loader), so its checkpoint filters apply (position-embedding resize, head removal).
    ``pretrained_cfg`` overrides timm's pretrained config, which the data transforms follow. Weights
    of another shape or depth than the model are refused, naming the tensors that differ (timm
    would load the others and leave the rest random).
    """
    check_backbone(settings)
    name, weights = settings["name"], settings["pretrained_file"]
    overlay = dict(settings["pretrained_cfg"])
    kwargs = {"num_classes": 0, **settings["kwargs"]}
    if weights is not None:
        overlay.update(file=str(weights), custom_load=str(weights).endswith(".npz"))
    source = weights or "the timm hub"
    try:
        with _unmatched_keys() as unmatched:
            model = timm.create_model(
                name, pretrained=settings["pretrained"], pretrained_cfg_overlay=overlay, **kwargs
            )
    except TypeError as error:  # timm passes unknown kwargs on to the model class
        raise BackboneError(
            f"backbone.kwargs: {name!r} does not take {sorted(settings['kwargs'])}: {error}"
        ) from error
    except AssertionError as error:  # the model class's own checks of its arguments
        check = str(error) or traceback.extract_tb(error.__traceback__)[-1].line
        raise BackboneError(
            f"backbone.kwargs: timm cannot build {name!r} with {settings['kwargs']}: {check}"
        ) from error
    except (OSError, RuntimeError, SafetensorError) as error:  # the hub, or a bad or unfit file
        shapes = [f"{k}: weights {a}, model {b}" for k, a, b in _SIZE_MISMATCH.findall(str(error))]
        if shapes:
            raise BackboneError(
                f"backbone.kwargs: the weights in {source} do not fit the model these kwargs "
                f"build: {len(shapes)} tensor shapes differ, such as {'; '.join(shapes[:2])}; "
                "set backbone.kwargs to the weights' architecture (embed_dim, depth, ...)"
            ) from error
        raise BackboneError(
            f"backbone: could not load {name!r} weights from {source} "
            f"({type(error).__name__}: {str(error)[:300]}); offline, set backbone.pretrained_file "
            "to a local .pth/.safetensors/.npz file matching backbone.name and backbone.kwargs"
        ) from error
    if (problem := _depth_problem(model, unmatched, source)) is not None:
        raise BackboneError(problem)
    return model
