"""Cost of the adapters on the CPU: training step vs number of adapters, merged eval vs bare timm.

Prints medians over repeated, interleaved measurements made in one run, as ratios:

    python benchmarks/speed.py [--batch 64] [--repeats 15]

Targets (issue 2): 20 adapters cost at most 1.15x one adapter per training step; merged evaluation at
most 1.05x the bare timm ViT. A mixed-rank row (SD-LoRA-RR's ranks 10, 8 and 6 by LibContinual's
schedule) shows that adapters of several ranks share the one product.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
from timm.models.vision_transformer import VisionTransformer

from avalanche_sdlora import SDLoRAViT

ADAPTER_COUNTS = (1, 5, 10, 20)
RR_SCHEDULE = {4: 8, 8: 6}


def small_vit() -> VisionTransformer:
    return VisionTransformer(
        img_size=32, patch_size=4, embed_dim=192, depth=6, num_heads=3, num_classes=100
    )


def model_with_adapters(
    backbone: VisionTransformer,
    count: int,
    classes: int,
    rank_schedule: dict[int, int] | None = None,
) -> SDLoRAViT:
    """A model as it trains its ``count``-th experience: ``count - 1`` consolidated adapters."""
    model = SDLoRAViT(
        copy.deepcopy(backbone), rank=10, rank_schedule=rank_schedule, initial_classes=classes
    )
    for _ in range(count):
        model.add_adapter()
        with torch.no_grad():
            for module in model.qkv_modules:
                module.lora_B[-1].normal_(std=0.02)
    model.gate.freeze_logits(range(count))
    return model.train()


def training_step(model: SDLoRAViT, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    groups = model.parameter_groups()
    optimizer = torch.optim.SGD([p for params in groups.values() for p in params], lr=1e-3)

    def step() -> None:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()

    return step


def median_seconds(functions: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Interleave the candidates so drift on a shared machine hits them all alike."""
    for function in functions.values():
        function()
    samples: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.manual_seed(0)
    backbone = small_vit()
    x = torch.randn(args.batch, 3, 32, 32)
    y = torch.randint(0, 100, (args.batch,))

    steps = {
        f"{count} adapters": training_step(model_with_adapters(backbone, count, 100), x, y)
        for count in ADAPTER_COUNTS
    }
    mixed = model_with_adapters(backbone, ADAPTER_COUNTS[-1], 100, RR_SCHEDULE)
    steps[f"{ADAPTER_COUNTS[-1]}, ranks 10/8/6"] = training_step(mixed, x, y)
    train = median_seconds(steps, args.repeats)
    base = train[f"{ADAPTER_COUNTS[0]} adapters"]
    print(f"training step, ViT 6x192 on 32 px, batch {args.batch}, rank 10 on q and v:")
    for name, seconds in train.items():
        print(f"  {name:>18}: {seconds * 1e3:7.1f} ms  ({seconds / base:.3f}x one adapter)")

    merged = model_with_adapters(backbone, 20, 100).eval()
    bare = copy.deepcopy(backbone).eval()

    def run(model: torch.nn.Module) -> Callable[[], None]:
        def forward() -> None:
            with torch.no_grad():
                model(x)

        return forward

    evaluation = median_seconds({"bare timm": run(bare), "merged": run(merged)}, args.repeats)
    ratio = evaluation["merged"] / evaluation["bare timm"]
    print(f"eval forward, batch {args.batch}:")
    print(f"  bare timm ViT: {evaluation['bare timm'] * 1e3:7.1f} ms")
    print(f"  SD-LoRA, 20 adapters merged: {evaluation['merged'] * 1e3:7.1f} ms  ({ratio:.3f}x)")


if __name__ == "__main__":
    main()
