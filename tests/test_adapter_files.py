"""Adapter files (save_adapters / load_adapters) and merge_and_unload."""

import copy
import json
import re

import pytest
import torch
from conftest import make_small_vit
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_cli import DEMO, SHRINK
from test_model import FakeExperience, model_with_adapters
from test_variants import make_exact_combination, mixed_rank_model
from timm.models.vision_transformer import VisionTransformer

from avalanche_sdlora import SDLoRAViT
from avalanche_sdlora.adapters import LoRAQKV
from avalanche_sdlora.runner.backbones import build_backbone
from avalanche_sdlora.runner.cli import main

X = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(11))
ADAPTER_KEY = re.compile(r"backbone\.blocks\.\d+\.attn\.qkv\.(lora_[AB]\.\d+|corrections|absorbed)")


def plain(backbone) -> SDLoRAViT:
    """Gate off, two consolidated adapters and a third still training (raw direction)."""
    model = model_with_adapters(3, backbone, gate=False)
    model.consolidate()
    model.add_adapter()
    return model


def gated_and_pruned(backbone) -> SDLoRAViT:
    """The gate on with its own temperatures, a pruned adapter and a head with inactive units."""
    model = model_with_adapters(3, backbone)
    model.consolidate()
    model.prune([1])
    model.gate.tau_final, model.gate.tau = 1.5, 4.0  # soft gates: beta (0.3, 0, 0.7) in eval
    model.eval()
    model.head.adaptation(FakeExperience([5, 6]))  # evaluation: grows units 5, 6, inactive
    return model


def mixed_ranks(backbone) -> SDLoRAViT:
    """Ranks 4, 3, 2 from a rank schedule."""
    return mixed_rank_model(backbone=backbone)


def absorbed(backbone) -> SDLoRAViT:
    """Mixed ranks, plus an adapter absorbed on block 0 (corrections) that still acts on block 1."""
    model = mixed_rank_model(backbone=backbone)
    new = make_exact_combination(model, {0: (1.0, -0.5)})
    assert model.absorb(new, threshold=9e-4) == [(0, "q"), (0, "v")]
    return model


def head_only(backbone) -> SDLoRAViT:
    """No adapter at all (the head-only control): the file holds the gate's empty state and the head."""
    model = SDLoRAViT(backbone, adapters=False, gate=False, initial_classes=5)
    model.head.adaptation(FakeExperience([0, 1, 2, 3, 4]))
    return model


def outputs(model: SDLoRAViT) -> tuple[torch.Tensor, torch.Tensor]:
    """The evaluation output (merged weights) and a training output under a fixed generator."""
    model.eval()
    with torch.no_grad():
        evaluation = model(X)
    model.train()
    model.generator = torch.Generator().manual_seed(5)
    training = model(X).detach()
    return evaluation, training


@pytest.mark.parametrize("make", [plain, gated_and_pruned, mixed_ranks, absorbed, head_only])
def test_a_saved_file_loads_into_a_fresh_model_with_identical_outputs(tmp_path, make):
    backbone = make_small_vit()
    pristine = copy.deepcopy(backbone)
    model = make(backbone)
    path = tmp_path / "adapters.safetensors"
    model.save_adapters(path)

    fresh = SDLoRAViT(pristine, rank=7, initial_classes=2)  # other rank, gate on, no schedule
    fresh.load_adapters(path)
    for got, expected in zip(outputs(fresh), outputs(model), strict=True):
        assert torch.equal(got, expected)
    assert fresh.adapter_summary() == model.adapter_summary()
    assert torch.equal(fresh.consolidated, model.consolidated)
    assert torch.equal(fresh.head.active_units, model.head.active_units)
    for loaded, saved in zip(fresh.qkv_modules, model.qkv_modules, strict=True):
        assert torch.equal(loaded.absorbed, saved.absorbed)
        assert torch.equal(loaded.corrections, saved.corrections)
    settings = ("rank", "rank_schedule", "gate_enabled", "adds_adapters")
    assert [getattr(fresh, s) for s in settings] == [getattr(model, s) for s in settings]
    assert (fresh.gate.tau_final, fresh.gate.tau) == (model.gate.tau_final, model.gate.tau)
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    assert {name: p.requires_grad for name, p in fresh.named_parameters()} == trainable

    # only the adapters, gate and head: no backbone weight, a fraction of the backbone's bytes
    keys = set(load_file(path))
    assert all(ADAPTER_KEY.fullmatch(k) for k in keys if k.startswith("backbone."))
    assert not keys & set(pristine.state_dict()) and not any("qkv.weight" in k for k in keys)
    backbone_bytes = sum(t.numel() * t.element_size() for t in pristine.state_dict().values())
    assert path.stat().st_size < backbone_bytes / 4


def test_the_metadata_describes_the_adapters(tmp_path):
    model = absorbed(make_small_vit())
    path = tmp_path / "adapters.safetensors"
    model.save_adapters(path)
    with safe_open(path, framework="pt") as file:
        metadata = {k: v if k == "format" else json.loads(v) for k, v in file.metadata().items()}
    assert metadata == {
        "format": "avalanche_sdlora.adapters",
        "format_version": 1,
        "targets": "qv",
        "blocks": [0, 1],
        "embed_dim": 32,
        "depth": 2,
        "ranks": [4, 3, 2, 7],
        "gate": False,
        "tau_final": 0.5,
        "tau": 0.5,
        "rank": 4,
        "rank_schedule": {"1": 3, "2": 2},
        "adds_adapters": True,
        "num_classes": 5,
    }


@pytest.fixture
def saved_qv(tmp_path):
    """An adapter file of a small ViT (width 32, 2 blocks) with adapters on q and v."""
    path = tmp_path / "adapters.safetensors"
    mixed_ranks(make_small_vit()).save_adapters(path)
    return path


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda: SDLoRAViT(make_small_vit(), targets="qkv"),
            "targets is 'qv' in the file but 'qkv' in the model",
        ),
        (lambda: SDLoRAViT(make_small_vit(), blocks=[1]), "blocks is [0, 1] in the file but [1]"),
        (lambda: SDLoRAViT(make_small_vit(embed_dim=48)), "embed_dim is 32 in the file but 48"),
        (lambda: SDLoRAViT(make_small_vit(depth=3), blocks=[0, 1]), "depth is 2 in the file but 3"),
    ],
)
def test_loading_into_a_model_it_does_not_fit_raises(saved_qv, make, message):
    model = make()
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        model.load_adapters(saved_qv)
    assert "same backbone with the same targets and blocks" in str(error.value)
    assert model.num_adapters == 0


def test_loading_into_a_model_with_other_adapters_raises(saved_qv):
    model = SDLoRAViT(make_small_vit(), rank=2)
    model.add_adapter()
    with pytest.raises(ValueError, match=r"adapters of ranks \[2\].*ranks \[4, 3, 2\].*freshly"):
        model.load_adapters(saved_qv)


def test_loading_a_file_that_is_not_an_adapter_file_raises(tmp_path, saved_qv):
    model = SDLoRAViT(make_small_vit())
    weights = tmp_path / "backbone.safetensors"
    save_file(make_small_vit().state_dict(), weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"not an SD-LoRA adapter file \(format: pt\); expected"):
        model.load_adapters(weights)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match=r"not a safetensors file .*expected an adapter file"):
        model.load_adapters(garbage)

    with safe_open(saved_qv, framework="pt") as file:
        metadata = file.metadata()
    tensors = load_file(saved_qv)
    newer = tmp_path / "newer.safetensors"
    save_file(tensors, newer, metadata={**metadata, "format_version": "2"})
    with pytest.raises(ValueError, match=r"format version 2; .* reads version 1"):
        model.load_adapters(newer)
    del metadata["ranks"]
    save_file(tensors, newer, metadata=metadata)
    with pytest.raises(ValueError, match="metadata 'ranks' is missing or malformed"):
        model.load_adapters(newer)
    assert model.num_adapters == 0


def with_gapped_head(model: SDLoRAViT) -> SDLoRAViT:
    """Classes 0, 1, 3, 4 trained; 2 never (a gap) and 5, 6 grown by an evaluation."""
    model.eval()
    model.head.adaptation(FakeExperience([5, 6]))
    model.head.active_units[2] = 0
    return model


@pytest.mark.parametrize("make", [gated_and_pruned, absorbed])
def test_merge_and_unload_gives_a_plain_vit_with_the_models_evaluation_output(make):
    model = with_gapped_head(make(make_small_vit()))
    with torch.no_grad():
        expected = model(X)
    state = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    rng = torch.get_rng_state()

    merged = model.merge_and_unload()
    assert type(merged) is VisionTransformer
    assert not any(isinstance(m, LoRAQKV) for m in merged.modules())
    assert all(type(block.attn.qkv) is torch.nn.Linear for block in merged.blocks)
    assert type(merged.head) is torch.nn.Linear
    assert merged.num_classes == merged.head.out_features == 5  # up to the last trained class
    merged.eval()
    with torch.no_grad():
        got = merged(X)
    assert got.shape == (3, 5)
    torch.testing.assert_close(got, expected[:, :5], rtol=0, atol=1e-5)
    assert (got[:, 2] == model.head.mask_value).all()  # never trained: masked, as in the model

    # the model is untouched: same tensors, still adapted, same output; no random init was drawn
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items() if k in state)
    assert isinstance(model.backbone.blocks[0].attn.qkv, LoRAQKV)
    with torch.no_grad():
        assert torch.equal(model(X), expected)
    assert merged.blocks[0].attn.proj.weight is not model.backbone.blocks[0].attn.proj.weight


def test_merge_and_unload_needs_a_trained_class():
    with pytest.raises(ValueError, match="no trained class yet"):
        SDLoRAViT(make_small_vit()).merge_and_unload()


def test_the_runner_writes_adapters_that_load_back(tmp_path, monkeypatch):
    trained = []
    save = SDLoRAViT.save_adapters

    def keep_model(self, path):
        trained.append(self)
        save(self, path)

    monkeypatch.setattr(SDLoRAViT, "save_adapters", keep_model)
    out = tmp_path / "run"
    args = ["--config", DEMO, "--output", str(out), *SHRINK, "--set", "experiment.compare=[]"]
    args += ["--set", "benchmark.num_classes=2", "--set", "experiment.checkpoint=false"]
    assert main(args) == 0
    path = out / "sdlora" / "seed0" / "adapters.safetensors"
    assert len(trained) == 1 and path.stat().st_size > 0
    assert not list(path.parent.glob(".adapters.safetensors.*"))  # no temporary file left

    config = json.loads((out / "config.json").read_text())
    model = SDLoRAViT(build_backbone(config["backbone"]), rank=1)
    model.load_adapters(path)
    assert model.num_adapters == 2 and model.head.active_units.tolist() == [1, 1]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), trained[0].eval()(x))
