"""Adapter files: what an :class:`~avalanche_sdlora.model.SDLoRAViT` learned, without its backbone.

An adapter file is one safetensors file holding the model's state-dict entries that are not the
frozen backbone's: every adapter's ``A`` and ``B`` per adapted ``qkv`` (each at its own rank), the
corrections and absorbed flags of absorption, the gate's logits, alphas and pruned flags, the
``consolidated`` flags and the head (classifier and active units). Its string metadata says what the
tensors fit (targets, adapted blocks, backbone width and depth) and the settings they were trained
with. Loading reuses the state-dict machinery of the model, which grows adapters at their saved
ranks and the head to its saved size.

:func:`merge_and_unload` turns the model into a plain ViT whose ``qkv`` weights are the merged
weights of evaluation.
"""

from __future__ import annotations

import copy
import json
import os
from typing import TYPE_CHECKING, Any

import torch
from avalanche.models import IncrementalClassifier
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from avalanche_sdlora.adapters import LoRAQKV

if TYPE_CHECKING:
    from avalanche_sdlora.model import SDLoRAViT

__all__ = ["FORMAT", "FORMAT_VERSION", "load_adapters", "merge_and_unload", "save_adapters"]

FORMAT = "avalanche_sdlora.adapters"
"""The ``format`` entry of an adapter file's metadata."""
FORMAT_VERSION = 1
STRUCTURE = ("targets", "blocks", "embed_dim", "depth")
"""Metadata that must equal the model's for the file's tensors to fit it."""
SETTINGS = ("ranks", "gate", "tau_final", "tau", "rank", "rank_schedule", "adds_adapters")
"""Metadata that :func:`load_adapters` restores (``num_classes`` is informative only)."""


def _structure(model: SDLoRAViT) -> dict[str, Any]:
    return {
        "targets": model.targets,
        "blocks": model.adapted_blocks,
        "embed_dim": model.qkv_modules[0].in_features,
        "depth": len(list(model.backbone.blocks.children())),
    }


def _frozen_keys(model: SDLoRAViT) -> set[str]:
    """State-dict keys of the frozen backbone: everything under it but the adapters' own tensors."""
    adapter_owned = {
        f"backbone.{name}.{key}"
        for name, module in model.backbone.named_modules()
        if isinstance(module, LoRAQKV)
        for key in module.state_dict()
        if key not in ("weight", "bias")
    }
    backbone = {key for key in model.state_dict() if key.startswith("backbone.")}
    return backbone - adapter_owned


def save_adapters(model: SDLoRAViT, path: str | os.PathLike) -> None:
    """Write ``model``'s adapters, gate, ``consolidated`` flags and head to the safetensors file
    ``path``, with the metadata that :func:`load_adapters` checks and restores."""
    frozen = _frozen_keys(model)
    tensors = {
        key: value.cpu().contiguous()
        for key, value in model.state_dict().items()
        if key not in frozen and isinstance(value, Tensor)  # the gate's extra state: tau_final
    }
    module = model.qkv_modules[0]
    values = {
        "format_version": FORMAT_VERSION,
        **_structure(model),
        "ranks": [module.adapter_rank(i) for i in range(model.num_adapters)],
        "gate": model.gate_enabled,
        "tau_final": model.gate.tau_final,
        "tau": model.gate.tau,
        "rank": model.rank,
        "rank_schedule": model.rank_schedule,
        "adds_adapters": model.adds_adapters,
        "num_classes": model.head.classifier.out_features,
    }
    metadata = {"format": FORMAT, **{key: json.dumps(value) for key, value in values.items()}}
    save_file(tensors, os.fspath(path), metadata=metadata)


def _read_metadata(metadata: dict[str, str] | None, path: str | os.PathLike) -> dict[str, Any]:
    """The decoded metadata of an adapter file; ``ValueError`` for any other file."""
    expected = f"expected an adapter file written by SDLoRAViT.save_adapters (format {FORMAT!r})"
    metadata = metadata or {}
    if metadata.get("format") != FORMAT:
        found = metadata.get("format", "none")
        raise ValueError(f"{path} is not an SD-LoRA adapter file (format: {found}); {expected}")
    values = {}
    for key in ("format_version", *STRUCTURE, *SETTINGS):
        try:
            values[key] = json.loads(metadata[key])
        except (KeyError, json.JSONDecodeError) as error:
            problem = f"{path}: metadata {key!r} is missing or malformed; {expected}"
            raise ValueError(problem) from error
    if values["format_version"] != FORMAT_VERSION:
        raise ValueError(
            f"{path} has format version {values['format_version']!r}; this version of "
            f"avalanche_sdlora reads version {FORMAT_VERSION}"
        )
    return values


def load_adapters(model: SDLoRAViT, path: str | os.PathLike) -> None:
    """Load an adapter file into ``model``, which must have the same targets, adapted blocks and
    backbone shape, and no adapters the file does not begin with (a freshly built model has none).

    Adapters grow at their saved ranks and the head to its saved size; the saved settings (``rank``,
    ``rank_schedule``, gate on/off, ``tau_final``, the training ``tau``, ``adds_adapters``) replace
    the model's, so it computes what the saved model computed. Raises ``ValueError`` for a file that
    is not an adapter file or does not fit the model.
    """
    try:
        with safe_open(os.fspath(path), framework="pt", device="cpu") as file:
            values = _read_metadata(file.metadata(), path)
            tensors = {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118 (not iterable)
    except SafetensorError as error:
        raise ValueError(
            f"{path} is not a safetensors file ({error}); expected an adapter file written by "
            "SDLoRAViT.save_adapters"
        ) from error
    own = _structure(model)
    mismatches = [
        f"{key} is {values[key]!r} in the file but {own[key]!r} in the model"
        for key in STRUCTURE
        if values[key] != own[key]
    ]
    if mismatches:
        raise ValueError(
            f"{path} does not fit this model: {'; '.join(mismatches)}. Load it into a model built "
            "on the same backbone with the same targets and blocks"
        )
    module = model.qkv_modules[0]
    existing = [module.adapter_rank(i) for i in range(model.num_adapters)]
    if existing != values["ranks"][: len(existing)]:
        raise ValueError(
            f"this model already has adapters of ranks {existing}, which are not the first of the "
            f"file's (ranks {values['ranks']}); load {path} into a freshly built model"
        )
    state = {**tensors, "gate._extra_state": {"tau_final": values["tau_final"]}}
    result = model.load_state_dict(state, strict=False)
    missing = set(result.missing_keys) - _frozen_keys(model)
    if missing or result.unexpected_keys:
        raise ValueError(
            f"{path} is not a complete adapter file for this model: missing tensors "
            f"{sorted(missing)}, unknown tensors {sorted(result.unexpected_keys)}"
        )
    model.rank = values["rank"]
    model.rank_schedule = {int(start): rank for start, rank in values["rank_schedule"].items()}
    model.gate_enabled, model.adds_adapters = values["gate"], values["adds_adapters"]
    model.gate.tau = values["tau"]
    for qkv in model.qkv_modules:
        qkv.rank = values["rank"]


def _linear(weight: Tensor, bias: Tensor | None) -> nn.Linear:
    """A frozen ``nn.Linear`` holding copies of ``weight`` and ``bias`` (no random init drawn)."""
    layer = nn.utils.skip_init(
        nn.Linear,
        weight.shape[1],
        weight.shape[0],
        bias=bias is not None,
        device=weight.device,
        dtype=weight.dtype,
    )
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer.requires_grad_(False)


def _merged_head(head: IncrementalClassifier) -> nn.Linear:
    """The classifier's units up to the last trained class, the masking of inactive units built in."""
    classifier = head.classifier
    everything = classifier.bias.new_ones(classifier.out_features, dtype=torch.bool)
    seen = head.active_units.bool() if head.masking else everything
    if not seen.any():
        raise ValueError("the head has no trained class yet: train an experience before merging")
    count = int(seen.nonzero().max()) + 1
    unseen = ~seen[:count]
    weight = classifier.weight[:count].masked_fill(unseen[:, None], 0.0)
    return _linear(weight, classifier.bias[:count].masked_fill(unseen, head.mask_value))


@torch.no_grad()
def merge_and_unload(model: SDLoRAViT) -> nn.Module:
    """A copy of ``model``'s backbone with the adapters merged into plain ``qkv`` linears and the head
    as an ``nn.Linear``; see :meth:`SDLoRAViT.merge_and_unload`."""
    head = _merged_head(model.head)
    active, coefficients, normalised = model._adapter_terms(noise=False)
    merged = copy.deepcopy(model.backbone)
    blocks = list(merged.blocks.children())
    for index, module in zip(model.adapted_blocks, model.qkv_modules, strict=True):
        weight = module.effective_weight(active, coefficients, normalised)
        blocks[index].attn.qkv = _linear(weight, module.bias)
    merged.head, merged.num_classes = head, head.out_features
    return merged
