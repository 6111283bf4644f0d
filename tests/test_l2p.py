"""make_l2p: Avalanche's LearningToPrompt on a given timm ViT (timm 1.x), trained on CPU."""

import avalanche.models.vit as avalanche_vit
import pytest
import torch
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.training import LearningToPrompt
from avalanche.training.plugins import EvaluationPlugin
from streams import separable_benchmark
from timm.models.vision_transformer import VisionTransformer
from torch.utils.data import DataLoader

from avalanche_sdlora.runner.l2p import make_l2p

TINY = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}
LAYOUTS = {
    # ViT-B/16's layout (class token, [CLS] pooling, final LayerNorm) with Avalanche's L2P settings
    "cls-token": ({}, {}),
    # the project's CPU backbone's layout (no class token, average pooling into fc_norm)
    "avg-pool": (
        {"class_token": False, "global_pool": "avg"},
        {"pool_size": 6, "prompt_length": 3, "top_k": 2},
    ),
}


def tiny_vit(**kwargs) -> VisionTransformer:
    return VisionTransformer(**{**TINY, "num_classes": 0, **kwargs})


def pretrained_tiny_vit(steps: int = 60, **kwargs) -> VisionTransformer:
    """A tiny ViT briefly trained on 8 classes disjoint from the benchmark's (other prototypes).

    L2P needs a pretrained encoder: in a random-init ViT attention barely mixes tokens, so the prompt
    tokens' outputs (L2P's features) hardly depend on the image and collapse once the prompt selection
    settles.
    """
    vit = tiny_vit(**{**kwargs, "num_classes": 8})
    generator = torch.Generator().manual_seed(999)
    size = TINY["img_size"]
    prototypes = torch.randn(8, 3, size, size, generator=generator)
    optimizer = torch.optim.AdamW(vit.parameters(), lr=3e-3)
    for _ in range(steps):
        y = torch.randint(0, 8, (32,), generator=generator)
        x = prototypes[y] + 0.3 * torch.randn(32, 3, size, size, generator=generator)
        loss = torch.nn.functional.cross_entropy(vit(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    vit.reset_classifier(0)
    return vit.eval()


def quiet_evaluator() -> EvaluationPlugin:
    return EvaluationPlugin(accuracy_metrics(experience=True, stream=True), loggers=[])


def build(backbone: VisionTransformer, **l2p_kwargs) -> LearningToPrompt:
    return make_l2p(
        backbone=backbone,
        num_classes=4,
        device="cpu",
        train_mb_size=8,
        train_epochs=2,
        eval_mb_size=8,
        evaluator=quiet_evaluator(),
        **l2p_kwargs,
    )


def frozen_state(strategy: LearningToPrompt) -> dict[str, torch.Tensor]:
    """Every parameter and buffer L2P must not train: the prompt ViT's but prompts and head, the query's."""
    prompt_vit = {
        f"model.{k}": v.clone()
        for k, v in strategy.model.state_dict().items()
        if not k.startswith(("prompt.", "head."))
    }
    query = {f"query.{k}": v.clone() for k, v in strategy.original_vit.state_dict().items()}
    return {**prompt_vit, **query}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_l2p_runs_on_the_given_backbone(layout: str) -> None:
    vit_kwargs, l2p_kwargs = LAYOUTS[layout]
    backbone = pretrained_tiny_vit(**vit_kwargs)
    original = {k: v.clone() for k, v in backbone.state_dict().items()}
    strategy = build(backbone, **l2p_kwargs)
    model = strategy.model
    assert isinstance(strategy, LearningToPrompt)
    assert not [name for name in vars(avalanche_vit) if name.startswith("_avalanche_sdlora")]

    # L2P's own settings pass through, with Avalanche's defaults
    expected = {"pool_size": 20, "prompt_length": 5, "top_k": 5, **l2p_kwargs}
    prompt = model.prompt
    assert (prompt.pool_size, prompt.length, prompt.top_k) == (
        expected["pool_size"],
        expected["prompt_length"],
        expected["top_k"],
    )
    assert model.head.in_features == TINY["embed_dim"] and model.head.out_features == 4

    # the prompt ViT and the query model hold the backbone's weights (copies, not the same tensors)
    copied = model.state_dict()
    prefix = backbone.num_prefix_tokens
    prompt_tokens = expected["prompt_length"] * expected["top_k"]
    for key, value in original.items():
        if key == "pos_embed":
            pos = copied[key]
            assert pos.shape[1] == value.shape[1] + prompt_tokens
            assert torch.equal(pos[:, :prefix], value[:, :prefix])
            assert torch.equal(pos[:, prefix + prompt_tokens :], value[:, prefix:])
            fill = value[:, :1] if prefix else torch.zeros_like(value[:, :1])
            assert torch.equal(
                pos[:, prefix : prefix + prompt_tokens], fill.expand_as(pos[:, :prompt_tokens])
            )
        else:
            assert torch.equal(copied[key], value), key
        assert torch.equal(strategy.original_vit.vit.state_dict()[key], value), key
    assert (
        copied["blocks.0.attn.qkv.weight"].data_ptr()
        != backbone.blocks[0].attn.qkv.weight.data_ptr()
    )

    # L2P trains the prompts and the head only
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"prompt.prompt", "prompt.prompt_key", "head.weight", "head.bias"}
    assert not any(p.requires_grad for p in strategy.original_vit.parameters())

    # the query is the backbone's own pre-logits feature
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        expected_query = backbone.eval().forward_head(backbone.forward_features(x), pre_logits=True)
        assert torch.allclose(strategy.original_vit(x)["pre_logits"], expected_query, atol=1e-6)

    frozen = frozen_state(strategy)
    prompts = model.prompt.prompt.detach().clone()
    benchmark = separable_benchmark(experiences=2, classes_per_experience=2, per_class=32)
    for experience in benchmark.train_stream:
        strategy.train(experience)
    metrics = strategy.eval(benchmark.test_stream)

    accuracy = {
        exp: metrics[f"Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp00{exp}"] for exp in (0, 1)
    }
    assert all(0.0 <= value <= 1.0 for value in accuracy.values())
    # L2P trains the current classes' logits against each other only (the others are masked), never
    # against the old classes'; at this scale the unmasked accuracy of the new classes is erratic
    # (0.0 to 1.0 over seeds). Among its own classes (chance 0.5), the current experience is learned.
    current = benchmark.test_stream[1]
    x, y, *_ = next(iter(DataLoader(current.dataset, batch_size=len(current.dataset))))
    classes = torch.tensor(current.classes_in_this_experience)
    model.eval()
    with torch.no_grad():
        logits = model(x=x, cls_features=strategy.original_vit(x)["pre_logits"])["logits"]
    masked_accuracy = (classes[logits[:, classes].argmax(1)] == y).float().mean().item()
    assert masked_accuracy > 0.6, masked_accuracy

    after = frozen_state(strategy)
    changed = [key for key, value in frozen.items() if not torch.equal(after[key], value)]
    assert not changed
    assert not torch.equal(model.prompt.prompt, prompts)  # the prompts did train
    assert all(torch.equal(backbone.state_dict()[k], v) for k, v in original.items())


@pytest.mark.parametrize(
    "vit_kwargs",
    [{"reg_tokens": 1}, {"pre_norm": True}, {"global_pool": "map"}, {"qk_norm": True}],
    ids=["register-tokens", "pre-norm", "attention-pool", "qk-norm"],
)
def test_unsupported_backbones_are_rejected(vit_kwargs: dict) -> None:
    with pytest.raises(ValueError, match="make_l2p"):
        build(tiny_vit(depth=1, **vit_kwargs))


def test_weights_settings_belong_to_the_backbone() -> None:
    with pytest.raises(TypeError, match="pretrained"):
        build(tiny_vit(depth=1), pretrained=True)
