"""Pretrained timm ViT backbones: by name from the hub, or from a local weights file (offline)."""

from __future__ import annotations

import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
from huggingface_hub import try_to_load_from_cache
from safetensors import SafetensorError
from torch import nn

__all__ = ["WEIGHT_SUFFIXES", "BackboneError", "build_backbone", "check_backbone"]

WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".npz")


class BackboneError(ValueError):
    """The backbone cannot be built as configured (unknown name, missing weights file)."""


def check_backbone(settings: Mapping[str, Any]) -> None:
    """Fast checks before any work: a known timm name, and an existing weights file of a known kind."""
    name = settings["name"]
    if not timm.is_model(name.split(".")[0]):
        raise BackboneError(f"backbone.name: timm has no model {name!r}")
    weights = settings["pretrained_file"]
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


def build_backbone(settings: Mapping[str, Any]) -> nn.Module:
    """The timm model of ``settings`` (a ``backbone`` config section), with its pretrained weights
    and without its classifier.

    ``pretrained_file`` loads local weights through timm's own pretrained path (``.npz`` with the
    model's custom loader), so its checkpoint filters apply (position-embedding resize, head removal).
    ``pretrained_cfg`` overrides timm's pretrained config, which the data transforms follow.
    """
    check_backbone(settings)
    name, weights = settings["name"], settings["pretrained_file"]
    overlay = dict(settings["pretrained_cfg"])
    kwargs = {"num_classes": 0, **settings["kwargs"]}
    if weights is not None:
        overlay.update(file=str(weights), custom_load=str(weights).endswith(".npz"))
    pretrained = weights is not None or settings["pretrained"]
    try:
        return timm.create_model(
            name, pretrained=pretrained, pretrained_cfg_overlay=overlay, **kwargs
        )
    except TypeError as error:  # timm passes unknown kwargs on to the model class
        raise BackboneError(
            f"backbone.kwargs: {name!r} does not take {sorted(settings['kwargs'])}: {error}"
        ) from error
    except (OSError, RuntimeError, SafetensorError) as error:  # the hub, or a bad or unfit file
        source = weights or "the timm hub"
        raise BackboneError(
            f"backbone: could not load {name!r} weights from {source} "
            f"({type(error).__name__}: {str(error)[:300]}); offline, set backbone.pretrained_file "
            "to a local .pth/.safetensors/.npz file matching backbone.name and backbone.kwargs"
        ) from error
