"""Avalanche's Learning to Prompt (L2P) on any pretrained timm ViT, with timm 1.x.

avalanche-lib 0.6.0's :class:`~avalanche.training.LearningToPrompt` cannot be built with timm 1.x, and
it could never be given a backbone: it creates its models by name (``model_name``) from
``avalanche.models.vit``, with their own (downloaded) weights. Failures, in the order they occur:

1. ``avalanche.models.timm_vit._create_vision_transformer`` reads ``pretrained_cfg["url"]``; timm 1.x's
   ``resolve_pretrained_cfg`` returns a ``PretrainedCfg`` dataclass: ``TypeError: 'PretrainedCfg'
   object is not subscriptable``.
2. Past that line, it passes ``pretrained_custom_load=`` to timm's ``build_model_with_cfg``, which timm
   1.x no longer knows and forwards to the model: ``TypeError: ViTWithPrompt.__init__() got an
   unexpected keyword argument 'pretrained_custom_load'``.
3. ``LearningToPrompt`` then replaces the head by ``nn.Linear(768, num_classes)`` whatever the width of
   the ViT: every ViT that is not 768 wide fails at its first forward (``mat1 and mat2 shapes cannot
   be multiplied``).
4. The frozen query model (``original_vit``: ``ViTWithPrompt`` with ``head_type="token"``) only works
   with a class token; a ViT without one (``class_token=False, global_pool="avg"``, as the project's
   CPU backbone) fails in ``forward_head``. Avalanche's ``checkpoint_filter_fn``, which gives the
   prompt tokens a position embedding, fails on such ViTs too.
5. Not an error but a silent departure from L2P: ``LearningToPrompt`` freezes the parameters whose
   names start with ``blocks``, ``patch_embed``, ``cls_token``, ``norm`` or ``pos_embed``, so the
   ``fc_norm`` of an average-pooled ViT (its final LayerNorm) would be trained with the prompts.

What this layer does, without changing Avalanche's code or its behaviour for anything else:

* It builds Avalanche's own prompt ViT (:class:`avalanche.models.timm_vit.ViTWithPrompt`) directly,
  bypassing the broken builder (1, 2), with the architecture read off the given backbone, and copies
  the backbone's weights into it; the prompt tokens get the class token's position embedding, as
  Avalanche's ``checkpoint_filter_fn`` / l2p-pytorch do (zeros without a class token: the embedding is
  frozen, so a constant offset only shifts the learnable prompts' initialisation).
* The query function is a frozen copy of the backbone itself, always in eval mode, returning the
  backbone's own pre-logits feature (the ``[CLS]`` output for a class-token ViT, exactly what
  ``original_vit`` computes; the pooled feature otherwise) (4).
* Everything else is Avalanche's ``LearningToPrompt``: its ``__init__`` (freezing, optimizer, plugins,
  evaluator), ``forward`` (prompt selection, masking of the classes of other experiences), loss and
  optimizer reset. Avalanche reaches the two models through its ``create_model(model_name)``; see
  :func:`registered_avalanche_vit_factory` for how the layer hands them over. Afterwards the head is
  made as wide as the ViT (3) and every parameter but the prompts' and the head's is frozen (5; the
  same set as Avalanche's for a class-token ViT).

Limits: the prompt ViT is Avalanche's ``ViTWithPrompt``, whose ``forward_features`` only knows the plain
ViT layout. Backbones with register tokens, ``pre_norm`` (CLIP), ``no_embed_class`` with a class token,
no position embedding, attention pooling (``global_pool="map"/"prr"``), non-square patch grids or
other blocks/attention/MLP/patch-embedding layers than timm's defaults are rejected with a
``ValueError`` (they would run with a wrong forward or not load); :func:`make_l2p` checks that every
module of the backbone has its twin, of the same type and settings, in the prompt ViT.
"""

from __future__ import annotations

import copy
import enum
import functools
import itertools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from avalanche.training import LearningToPrompt
from avalanche.training.plugins import EvaluationPlugin
from avalanche.training.plugins.evaluation import default_evaluator
from timm.layers import LayerScale
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

__all__ = ["make_l2p", "registered_avalanche_vit_factory"]

_SUPPORTED_POOLS = ("", "token", "avg", "avgmax", "max")
# Per-module attributes that differ between equivalent layers without changing their function.
_IGNORED_ATTRIBUTES = frozenset(
    {"training", "fused_attn", "dynamic_img_pad", "strict_img_size", "flatten", "output_fmt"}
)
# Settings that make_l2p owns: the weights come from the backbone.
_OWNED_SETTINGS = ("model_name", "pretrained")
_TRAINED = ("prompt.", "head.")  # all that L2P trains of the prompt ViT
_PLAIN = (bool, int, float, str, tuple, enum.Enum, type(None))
_names = itertools.count()


class _FrozenQuery(nn.Module):
    """L2P's query function ``q(x)``: a frozen copy of the backbone, always in eval mode.

    It has the interface ``LearningToPrompt`` uses on ``original_vit``: ``reset_classifier(0)`` and a
    forward returning ``{"pre_logits": features}``.
    """

    def __init__(self, backbone: VisionTransformer) -> None:
        super().__init__()
        self.vit = copy.deepcopy(backbone).eval()
        for parameter in self.vit.parameters():
            parameter.requires_grad_(False)

    def reset_classifier(self, num_classes: int) -> None:
        self.vit.reset_classifier(num_classes)

    def train(self, mode: bool = True) -> _FrozenQuery:
        super().train(mode)
        self.vit.eval()  # a frozen feature extractor: no dropout, drop path
        return self

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        features = self.vit.forward_head(self.vit.forward_features(x), pre_logits=True)
        return {"pre_logits": features}


def _check_supported(backbone: nn.Module) -> None:
    """Reject the ViT layouts that ``ViTWithPrompt.forward_features`` cannot reproduce."""
    problems = []
    if not isinstance(backbone, VisionTransformer):
        problems.append(f"not a timm VisionTransformer ({type(backbone).__name__})")
    else:
        if backbone.pos_embed is None:
            problems.append("no position embedding (pos_embed='none')")
        if backbone.num_reg_tokens:
            problems.append(f"{backbone.num_reg_tokens} register tokens")
        if backbone.no_embed_class and backbone.num_prefix_tokens:
            problems.append("no_embed_class=True with a class token")
        if not isinstance(backbone.norm_pre, nn.Identity):
            problems.append("pre_norm=True (a norm before the blocks)")
        if backbone.global_pool not in _SUPPORTED_POOLS or backbone.attn_pool is not None:
            problems.append(f"global_pool={backbone.global_pool!r} (attention pooling)")
        grid = getattr(backbone.patch_embed, "grid_size", None)
        if grid is None or grid[0] != grid[1]:
            problems.append(f"patch grid {grid} (must be square)")
    if problems:
        raise ValueError(
            "make_l2p: Avalanche's ViTWithPrompt cannot reproduce this backbone: "
            + "; ".join(problems)
        )


def _architecture(backbone: VisionTransformer) -> dict[str, Any]:
    """The ``ViTWithPrompt`` arguments that rebuild ``backbone``'s architecture."""
    block = backbone.blocks[0]
    act = block.mlp.act
    layer_scale = block.ls1
    return {
        "img_size": backbone.patch_embed.img_size,
        "patch_size": backbone.patch_embed.patch_size,
        "in_chans": backbone.patch_embed.proj.in_channels,
        "embed_dim": backbone.embed_dim,
        "depth": len(backbone.blocks),
        "num_heads": block.attn.num_heads,
        "mlp_ratio": block.mlp.fc1.out_features / backbone.embed_dim,
        "qkv_bias": block.attn.qkv.bias is not None,
        "init_values": layer_scale.init_values if isinstance(layer_scale, LayerScale) else None,
        "class_token": backbone.cls_token is not None,
        "no_embed_class": backbone.no_embed_class,
        "global_pool": backbone.global_pool,
        "fc_norm": not isinstance(backbone.fc_norm, nn.Identity),
        "norm_layer": functools.partial(type(block.norm1), eps=block.norm1.eps),
        "act_layer": (
            functools.partial(nn.GELU, approximate=act.approximate)
            if isinstance(act, nn.GELU)
            else type(act)
        ),
    }


def _settings(module: nn.Module) -> dict[str, Any]:
    """A module's type, ``extra_repr`` and plain settings (numbers, strings, tuples, enums...)."""
    attributes = {
        key: value
        for key, value in vars(module).items()
        if not key.startswith("_") and key not in _IGNORED_ATTRIBUTES and isinstance(value, _PLAIN)
    }
    return {"type": type(module), "repr": module.extra_repr(), **attributes}


def _compared_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every module but the root, the head, the prompts and dropouts (L2P sets its own rates)."""
    return {
        name: module
        for name, module in model.named_modules()
        if name
        and name.split(".")[0] not in ("head", "prompt")
        and "drop" not in name.rsplit(".", 1)[-1]
    }


def _check_same_structure(backbone: VisionTransformer, prompt_vit: nn.Module) -> None:
    ours, theirs = _compared_modules(backbone), _compared_modules(prompt_vit)
    differences = [
        name
        for name in sorted(ours.keys() | theirs.keys())
        if name not in ours
        or name not in theirs
        or _settings(ours[name]) != _settings(theirs[name])
    ]
    if differences:
        name = differences[0]
        raise ValueError(
            f"make_l2p: the backbone's layers differ from Avalanche's ViTWithPrompt at {differences}; "
            f"first: {name}: backbone {ours.get(name)!r} vs prompt ViT {theirs.get(name)!r}"
        )


def _prompt_pos_embed(pos_embed: Tensor, num_prefix: int, num_prompt_tokens: int) -> Tensor:
    """``[prefix, prompts, patches]``: the prompts take the class token's embedding (zeros without)."""
    prefix, patches = pos_embed[:, :num_prefix], pos_embed[:, num_prefix:]
    if num_prefix:
        prompts = prefix[:, :1].expand(-1, num_prompt_tokens, -1)
    else:
        prompts = pos_embed.new_zeros(1, num_prompt_tokens, pos_embed.shape[-1])
    return torch.cat([prefix, prompts, patches], dim=1)


@torch.no_grad()
def _prompt_vit(backbone: VisionTransformer, **l2p_model_kwargs: Any) -> nn.Module:
    """Avalanche's ``ViTWithPrompt`` with ``backbone``'s architecture and a copy of its weights."""
    from avalanche.models.timm_vit import ViTWithPrompt  # imports timm's deprecated module paths

    model = ViTWithPrompt(**_architecture(backbone), weight_init="skip", **l2p_model_kwargs)
    _check_same_structure(backbone, model)
    state = {k: v for k, v in backbone.state_dict().items() if not k.startswith("head.")}
    extra = model.pos_embed.shape[1] - backbone.pos_embed.shape[1]
    state["pos_embed"] = _prompt_pos_embed(state["pos_embed"], backbone.num_prefix_tokens, extra)
    missing, unexpected = model.load_state_dict(state, strict=False)
    leftover = [k for k in missing if not k.startswith(("head.", "prompt."))]
    if leftover or unexpected:
        raise ValueError(
            f"make_l2p: backbone weights do not map onto ViTWithPrompt: missing {leftover}, "
            f"unexpected {unexpected}"
        )
    return model


@contextmanager
def registered_avalanche_vit_factory(factory: Callable[..., nn.Module]) -> Iterator[str]:
    """Make ``factory`` reachable as ``avalanche.models.vit.create_model(<name>)``; yield the name.

    ``LearningToPrompt.__init__`` builds its models with ``avalanche.models.vit.create_model``, which
    looks ``model_name`` up in the globals of ``avalanche.models.vit``. This adds ``factory`` there under
    a fresh, unique name for the duration of the ``with`` block and removes it afterwards. Nothing of
    Avalanche is replaced, so other strategies and other L2P instances are unaffected.
    """
    import avalanche.models.vit as avalanche_vit

    name = f"_avalanche_sdlora_backbone_{next(_names)}"
    registry = vars(avalanche_vit)
    registry[name] = factory
    try:
        yield name
    finally:
        registry.pop(name, None)


def make_l2p(
    *,
    backbone: nn.Module,
    num_classes: int,
    device: str | torch.device,
    train_mb_size: int,
    train_epochs: int,
    eval_mb_size: int,
    lr: float = 0.03,
    evaluator: EvaluationPlugin | Callable[[], EvaluationPlugin] = default_evaluator,
    plugins: list[Any] | None = None,
    **l2p_kwargs: Any,
) -> LearningToPrompt:
    """Avalanche's ``LearningToPrompt`` strategy on ``backbone``, working with timm 1.x.

    Avalanche 0.6.0's L2P only builds its ViTs by name, through a builder that timm 1.x breaks
    (``'PretrainedCfg' object is not subscriptable``, then an unknown ``pretrained_custom_load``
    argument), replaces the head by a 768-wide linear whatever the ViT, and needs a class token for
    its query. This builds the same strategy on the given, already built (pretrained) timm
    ``VisionTransformer`` of any size instead: Avalanche's prompt ViT with the backbone's architecture
    and a copy of its weights (all frozen but the prompts and the head), a frozen copy of the
    backbone as the query function, and a head as wide as the backbone. The backbone is not modified.

    :param backbone: a timm ``VisionTransformer`` (plain layout, see the module docstring).
    :param num_classes: classes of the whole stream (L2P's head is fixed, classes of other
        experiences are masked in training).
    :param device: where the strategy trains.
    :param train_mb_size: training minibatch size.
    :param train_epochs: epochs per experience.
    :param eval_mb_size: evaluation minibatch size.
    :param lr: Adam's learning rate (Avalanche's default 0.03).
    :param evaluator: Avalanche evaluation plugin (or factory).
    :param plugins: further Avalanche plugins.
    :param l2p_kwargs: any other ``LearningToPrompt`` argument with Avalanche's defaults:
        ``pool_size=20``, ``prompt_length=5``, ``top_k=5``, ``sim_coefficient=0.1``,
        ``head_type="prompt"``, ``prompt_key``, ``embedding_key``, ``batchwise_prompt``,
        ``use_cls_features``, ``use_mask``, ``criterion``, ``eval_every``, ``drop_rate``, ... but not
        ``model_name`` or ``pretrained`` (the weights are the backbone's).
    :raises ValueError: if the backbone's layout is not one ``ViTWithPrompt`` reproduces.
    """
    owned = [key for key in _OWNED_SETTINGS if key in l2p_kwargs]
    if owned:
        raise TypeError(f"make_l2p: {owned} are set by make_l2p (the weights are the backbone's)")
    _check_supported(backbone)

    def factory(pretrained: bool = True, **kwargs: Any) -> nn.Module:
        # LearningToPrompt calls create_model twice: for the prompt ViT (with its prompt settings)
        # and, without them, for the frozen query model.
        del pretrained  # the weights are the backbone's
        if "prompt_pool" in kwargs:
            return _prompt_vit(backbone, **kwargs).to(device)
        return _FrozenQuery(backbone)

    with registered_avalanche_vit_factory(factory) as model_name:
        strategy = LearningToPrompt(
            model_name=model_name,
            num_classes=num_classes,
            device=device,
            train_mb_size=train_mb_size,
            train_epochs=train_epochs,
            eval_mb_size=eval_mb_size,
            lr=lr,
            evaluator=evaluator,
            plugins=plugins,
            **l2p_kwargs,
        )

    model = strategy.model
    if model.head.in_features != model.embed_dim:  # LearningToPrompt hard-codes 768 inputs
        model.head = nn.Linear(model.embed_dim, num_classes).to(device)
    for name, parameter in model.named_parameters():  # L2P trains the prompts and the head only
        if not name.startswith(_TRAINED):
            parameter.requires_grad_(False)
    # as LearningToPrompt.__init__ (and every _before_training_exp) builds it
    strategy.optimizer = torch.optim.Adam(model.parameters(), betas=(0.9, 0.999), lr=lr)
    return strategy
