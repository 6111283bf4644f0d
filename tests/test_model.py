import copy
from types import SimpleNamespace

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import make_small_vit

from avalanche_sdlora import SDLoRAViT
from avalanche_sdlora.adapters import LoRAQKV


def FakeExperience(classes: list[int]) -> SimpleNamespace:
    """What the model's adaptation reads from an Avalanche experience."""
    return SimpleNamespace(classes_in_this_experience=classes)


def randomise_adapter(model: SDLoRAViT, index: int, std: float = 0.05) -> None:
    with torch.no_grad():
        for module in model.qkv_modules:
            module.lora_B[index].normal_(std=std)


def model_with_adapters(count: int, backbone=None, gate: bool = True) -> SDLoRAViT:
    """``count`` trained-looking adapters; all but the last consolidated."""
    model = SDLoRAViT(backbone or make_small_vit(), rank=3, gate=gate, initial_classes=5)
    model.head.active_units.fill_(1)  # as after training on classes 0..4
    for index in range(count):
        model.add_adapter()
        randomise_adapter(model, index)
        with torch.no_grad():
            model.gate.alphas[index].fill_(0.5 + index)
            model.gate.logits[index].fill_(0.3 * index)
    return model


@pytest.mark.parametrize(
    "make_backbone, size",
    [
        (lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False), 224),
        (lambda: make_small_vit(embed_dim=48, depth=3, img_size=32), 32),
    ],
)
def test_adding_an_adapter_keeps_the_output(make_backbone, size):
    # Gate off: with the gate on, the new adapter's logit joins the sparsemax and takes a share of
    # beta from the old adapters even though its own update B A is zero.
    model = model_with_adapters(2, make_backbone(), gate=False).eval()
    model.consolidate()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        before = model(x)
        model.add_adapter()
        after = model(x)
    assert model.num_adapters == 3
    torch.testing.assert_close(after, before, rtol=0, atol=1e-6)
    # the adapters really act: zeroing them changes the output
    with torch.no_grad():
        for module in model.qkv_modules:
            for b in module.lora_B:
                b.zero_()
        assert (model(x) - before).abs().max() > 1e-3


def loop_forward(self: LoRAQKV, x: torch.Tensor) -> torch.Tensor:
    """Reference: one adapter and one projection at a time (absorbed slices skipped)."""
    weight = self.weight.clone()
    for k, index in enumerate(self.active):
        for p, letter in enumerate(self.targets):
            if self.absorbed[index, p]:
                continue
            update = self.lora_B[index][p] @ self.lora_A[index][p]
            if self.normalised[k]:
                update = update / torch.linalg.matrix_norm(update)
            rows = slice(
                "qkv".index(letter) * self.slice_features,
                ("qkv".index(letter) + 1) * self.slice_features,
            )
            scale = self.coefficients[k] + self.corrections[index, p]
            weight[rows] = weight[rows] + scale * update
    return F.linear(x, weight, self.bias)


def assert_product_equals_loop(model: SDLoRAViT, x: torch.Tensor, monkeypatch) -> set[str]:
    """The model's outputs and gradients equal those of the per-adapter reference; returns the
    names of the parameters that got gradients."""

    def run():
        model.zero_grad()
        model.generator = torch.Generator().manual_seed(3)
        out = model(x)
        out.square().sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out.detach(), grads

    out_stacked, grads_stacked = run()
    with monkeypatch.context() as patch:
        patch.setattr(LoRAQKV, "forward", loop_forward)
        out_loop, grads_loop = run()
    torch.testing.assert_close(out_stacked, out_loop, rtol=1e-5, atol=1e-6)
    assert grads_stacked.keys() == grads_loop.keys()
    for name in grads_stacked:
        torch.testing.assert_close(grads_stacked[name], grads_loop[name], rtol=1e-4, atol=1e-6)
    return set(grads_stacked)


def test_stacked_product_equals_a_per_adapter_loop(monkeypatch):
    model = model_with_adapters(4).train()
    model.prune([1])
    model.gate.tau = 2.0
    trained = assert_product_equals_loop(model, torch.randn(4, 3, 16, 16), monkeypatch)
    assert any("lora_A.3" in n for n in trained) and any("logits" in n for n in trained)


def test_gate_off_uses_every_active_adapter_with_beta_one():
    model = model_with_adapters(3, gate=False).train()
    model(torch.randn(1, 3, 16, 16))
    assert model.last_beta.tolist() == [1.0, 1.0, 1.0]
    coefficients = model.qkv_modules[0].coefficients
    torch.testing.assert_close(coefficients, model.gate.alpha_vector().detach())


def test_merged_eval_equals_unmerged_and_is_dropped_after_training():
    model = model_with_adapters(3)
    x = torch.randn(5, 3, 16, 16)
    model.eval()
    with torch.enable_grad():
        unmerged = model(x).detach()
    assert all(m.merged_weight is None for m in model.qkv_modules)
    with torch.no_grad():
        merged = model(x)
    assert all(m.merged_weight is not None for m in model.qkv_modules)
    torch.testing.assert_close(merged, unmerged, rtol=0, atol=1e-5)

    model.train()
    assert all(m.merged_weight is None for m in model.qkv_modules)
    optimizer = torch.optim.SGD([p for g in model.parameter_groups().values() for p in g], lr=0.5)
    model(x).sum().backward()
    optimizer.step()
    model.eval()
    with torch.no_grad():
        after_step = model(x)
    with torch.enable_grad():
        reference = model(x).detach()
    torch.testing.assert_close(after_step, reference, rtol=0, atol=1e-5)
    assert (after_step - merged).abs().max() > 1e-4


def test_merge_is_dropped_when_an_adapter_parameter_changes_in_eval():
    model = model_with_adapters(2).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        first = model(x)
        model.gate.alphas[0].mul_(3.0)
        second = model(x)
    assert (first - second).abs().max() > 1e-4
    with torch.enable_grad():
        torch.testing.assert_close(second, model(x).detach(), rtol=0, atol=1e-5)


def test_consolidation_normalises_directions_and_keeps_equal_norm_outputs():
    model = model_with_adapters(1, gate=False)
    with torch.no_grad():
        # give every projection of the adapter the same ||BA||_F = 2
        for module in model.qkv_modules:
            for p in range(module.num_projections):
                ba = module.lora_B[0][p] @ module.lora_A[0][p]
                module.lora_B[0][p].mul_(2.0 / torch.linalg.matrix_norm(ba))
    x = torch.randn(3, 3, 16, 16)
    model.eval()
    with torch.no_grad():
        before = model(x)
        assert model.consolidate() == [0]
        after = model(x)
    torch.testing.assert_close(after, before, rtol=0, atol=1e-5)
    assert model.gate.alphas[0].item() == pytest.approx(0.5 * 2.0, rel=1e-5)
    assert not model.qkv_modules[0].lora_A[0].requires_grad
    for module in model.qkv_modules:
        a, b = module.stacked([0])
        for p in range(module.num_projections):
            direction = b[0, p] @ a[0, p] / torch.linalg.matrix_norm(b[0, p] @ a[0, p])
            assert torch.linalg.matrix_norm(direction).item() == pytest.approx(1.0, abs=1e-5)


def test_consolidation_uses_the_least_squares_magnitude():
    model = model_with_adapters(1, gate=False)
    norms = model.adapter_norms(0)
    assert norms.numel() == 2 * 2  # 2 blocks x (q, v)
    alpha = model.gate.alphas[0].item()
    model.consolidate()
    assert model.gate.alphas[0].item() == pytest.approx(alpha * norms.mean().item(), rel=1e-5)


def test_a_pruned_adapter_no_longer_influences_the_output():
    model = model_with_adapters(3).eval()
    x = torch.randn(2, 3, 16, 16)
    model.prune([1])
    assert model.num_active_adapters == 2 and model.gate.active_indices == [0, 2]
    with torch.no_grad():
        before = model(x)
        for module in model.qkv_modules:
            module.lora_B[1].normal_(std=10.0)
        model.gate.alphas[1].fill_(100.0)
        model.gate.logits[1].fill_(100.0)
        after = model(x)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    assert not any(p.requires_grad for p in model.qkv_modules[0].lora_A[1:2])


def test_trainable_parameter_count_follows_pruning():
    model = model_with_adapters(3)
    # blocks x (q, v) x rank x (d_in + d_out), plus alpha and logit
    per_adapter = 2 * 2 * 3 * (32 + 32) + 2
    head = 5 * 32 + 5
    assert model.trainable_parameter_count() == 3 * per_adapter + head
    model.prune([0])
    assert model.trainable_parameter_count() == 2 * per_adapter + head
    assert sum(len(g) for g in model.parameter_groups().values()) > 0


def test_state_dict_round_trip_into_a_fresh_model():
    backbone = make_small_vit()
    pristine = copy.deepcopy(backbone)
    model = model_with_adapters(3, backbone)
    model.head.adaptation(FakeExperience([0, 1, 2, 3, 4, 5, 6]))
    model.prune([1])
    model.consolidate()
    x = torch.randn(3, 3, 16, 16)
    model.eval()
    with torch.no_grad():
        expected = model(x)
    fresh = SDLoRAViT(pristine, rank=3, initial_classes=2)
    fresh.load_state_dict(model.state_dict())
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), expected, rtol=0, atol=0)
    assert fresh.gate.active_indices == [0, 2]
    assert fresh.consolidated.tolist() == [True, True, True]
    groups = fresh.parameter_groups()
    assert groups["adapters"] == []  # every adapter consolidated: frozen after loading too
    assert len(groups["alphas"]) == 2 and len(groups["logits"]) == 2


def test_avalanche_adaptation_adds_adapters_only_in_training_and_grows_the_head():
    model = SDLoRAViT(make_small_vit(), rank=2)
    model.train()
    model.adaptation(FakeExperience([0, 1, 2]))
    assert model.num_adapters == 1 and model.head.classifier.out_features == 3
    model.eval()
    model.adaptation(FakeExperience([3, 4]))
    assert model.num_adapters == 1 and model.head.classifier.out_features == 5
    assert model.head.active_units.tolist() == [1, 1, 1, 0, 0]
    model.train()
    model.adaptation(FakeExperience([3, 4]))
    assert model.num_adapters == 2 and model.pending_adapters == [1]
    assert model.consolidated.tolist() == [True, False]


class NoQKV(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.Sequential(torch.nn.Linear(4, 4))


@pytest.mark.parametrize(
    "make, error, message",
    [
        (lambda: SDLoRAViT(torch.nn.Linear(3, 3)), TypeError, "no ViT blocks"),
        (lambda: SDLoRAViT(NoQKV()), TypeError, "no fused attn.qkv"),
        (lambda: SDLoRAViT(make_small_vit(), rank=0), ValueError, "rank must be >= 1"),
        (lambda: SDLoRAViT(make_small_vit(), rank=2.5), TypeError, "rank must be an int"),
        (lambda: SDLoRAViT(make_small_vit(), targets="qx"), ValueError, "letters from"),
        (lambda: SDLoRAViT(make_small_vit(), targets="qq"), ValueError, "distinct letters"),
        (lambda: SDLoRAViT(make_small_vit(), blocks=[0, 5]), ValueError, "out of range 0..1"),
        (lambda: SDLoRAViT(make_small_vit(), blocks=[]), ValueError, "at least one block"),
    ],
)
def test_bad_construction_raises_a_clear_error(make, error, message):
    with pytest.raises(error, match=message):
        make()


def test_bad_construction_leaves_the_backbone_untouched():
    backbone = make_small_vit()
    with pytest.raises(ValueError):
        SDLoRAViT(backbone, targets="qz")
    assert isinstance(backbone.blocks[0].attn.qkv, torch.nn.Linear)
    assert all(p.requires_grad for p in backbone.parameters())
    SDLoRAViT(backbone)
    with pytest.raises(TypeError, match="already has adapters"):
        SDLoRAViT(backbone)


def test_bad_adapter_indices_raise_without_side_effects():
    model = model_with_adapters(3)
    with pytest.raises(ValueError, match="out of range"):
        model.prune([0, 9])
    assert model.gate.active_indices == [0, 1, 2]
    model.prune([0])
    with pytest.raises(ValueError, match="adapter 0 is pruned"):
        model.set_adapter_trainable(0, True)
    with pytest.raises(ValueError, match="consolidated"):
        model.set_adapter_trainable(1, True)
    with pytest.raises(ValueError, match="no active adapter"):
        model.prune([1, 2])
    assert model.gate.active_indices == [1, 2]
