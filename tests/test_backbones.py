import socket

import pytest
import torch
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

from avalanche_sdlora.runner.backbones import BackboneError, build_backbone, check_backbone

KWARGS = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}


def settings(**overrides):
    base = {
        "name": "vit_tiny_patch16_224",
        "pretrained": False,
        "pretrained_file": None,
        "kwargs": dict(KWARGS),
        "pretrained_cfg": {},
    }
    return {**base, **overrides}


def test_local_weights_file_loads_through_timm_with_its_head_removed(tmp_path):
    source = VisionTransformer(**KWARGS, num_classes=7)
    path = tmp_path / "weights.safetensors"
    save_file({k: v.half() for k, v in source.state_dict().items()}, str(path))
    overlay = {"mean": [0.1, 0.2, 0.3], "crop_pct": 1.0}
    backbone = build_backbone(
        settings(pretrained=True, pretrained_file=str(path), pretrained_cfg=overlay)
    )
    assert backbone.num_classes == 0
    torch.testing.assert_close(backbone.pos_embed, source.pos_embed.half().float())
    assert tuple(backbone.pretrained_cfg["mean"]) == (0.1, 0.2, 0.3)


def test_weights_that_do_not_fit_the_model_are_a_clear_error(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file(VisionTransformer(**{**KWARGS, "embed_dim": 64}).state_dict(), str(path))
    shapes = (
        r"30 tensor shapes differ, such as cls_token: weights \[1, 1, 64\], model \[1, 1, 32\];"
    )
    with pytest.raises(BackboneError, match=rf"backbone\.kwargs: the weights in .*{shapes}"):
        build_backbone(settings(pretrained=True, pretrained_file=str(path)))


@pytest.mark.parametrize(
    "model, message",
    [
        ({"depth": 3}, r"hold 2 blocks, .* has 3 \(the model's blocks \[2\] would keep random"),
        ({"depth": 1}, r"hold 2 blocks, .* has 1 \(the weights' blocks \[1\] would be dropped"),
        ({"init_values": 1e-5}, None),  # an adaptation: new layer scales, every block loaded
    ],
)
def test_weights_of_another_depth_are_refused(tmp_path, model, message):
    """timm loads what fits and leaves the rest random; whole blocks left out are refused."""
    path = tmp_path / "weights.safetensors"
    source = VisionTransformer(**KWARGS)
    save_file(source.state_dict(), str(path))
    chosen = settings(pretrained=True, pretrained_file=str(path), kwargs={**KWARGS, **model})
    if message is None:
        loaded = build_backbone(chosen).blocks[1].attn.qkv.weight
        torch.testing.assert_close(loaded, source.blocks[1].attn.qkv.weight)
        return
    with pytest.raises(BackboneError, match=rf"backbone\.kwargs: .*{message}"):
        build_backbone(chosen)


def test_offline_hub_without_a_file_names_pretrained_file(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", offline)
    with pytest.raises(BackboneError, match=r"set backbone\.pretrained_file"):
        check_backbone(settings(name="vit_small_patch16_224.augreg_in21k", pretrained=True))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"name": "not_a_vit"}, "timm has no model 'not_a_vit'"),
        ({"pretrained": True, "pretrained_file": "/x.pth"}, "/x.pth does not exist"),
        ({"pretrained_file": "/x.pth"}, "backbone.pretrained: false means random initial weights"),
    ],
)
def test_bad_backbone_settings(overrides, message, tmp_path):
    with pytest.raises(BackboneError, match=message):
        check_backbone(settings(**overrides))


def test_unknown_weight_format(tmp_path):
    path = tmp_path / "weights.ckpt"
    path.write_bytes(b"")
    with pytest.raises(BackboneError, match="must be one of"):
        check_backbone(settings(pretrained=True, pretrained_file=str(path)))
