"""Images/s of the two data paths on one CPU thread, at the paper's 32 -> 224 px.

Both paths start from the same uint8 CIFAR-sized images in memory and end with a normalised float
batch for the paper's ViT-B/16 (its timm data config with ``crop_pct`` 0.875, as exps/c100.json
sets it; the model itself is built on the meta device, without weights):

- PIL: the runner's ``backbone_transforms`` per image (RandomResizedCrop(scale=(0.05, 1)) + flip +
  ToTensor + Normalize; evaluation: Resize(256) + CenterCrop(224)), then the loader's collate
  (``torch.stack``);
- batched: ``batch_transforms(...).train`` / ``.eval`` on the uint8 batch, as
  ``BatchTransformPlugin`` runs them.

Avalanche's per-sample indexing, the same for both paths, is left out. The paths' batches are
timed in turn (interleaved), and the figures are medians, so drift on a shared machine hits both.

    python benchmarks/data_speed.py [--batch 128] [--repeats 15] [--device cuda]

Fresh batch memory: torch's CPU tensors over 32 MiB (a batch of 128 is 77 MB) are mapped afresh
from the kernel each time, and on a shared VM the page faults cost about as much as transforming
the images. By default the script sets ``THP_MEM_ALLOC_ENABLE=1``, torch's own switch for
transparent huge pages, before it imports torch: 512 times fewer faults, for both paths alike
(a GPU's caching allocator has none at all). ``--small-pages`` leaves it unset. With ``--device
cuda`` the batched path runs on the GPU (the PIL path stays on the CPU).

The last line reads ``data path: batched X img/s, PIL Y img/s per core (ratio R)`` (training).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

PAPER_BACKBONE = "vit_base_patch16_224.augreg2_in21k_ft_in1k"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--device", default="cpu", help="where the batched path runs")
    parser.add_argument("--small-pages", action="store_true", help="no THP_MEM_ALLOC_ENABLE")
    return parser.parse_args()


def measure(args: argparse.Namespace) -> tuple[dict[str, float], int]:
    """Median seconds per batch of each path and phase, and the threads used."""
    import numpy as np
    import timm
    import torch
    from PIL import Image

    sys.path.insert(0, str(Path(__file__).parent))
    from speed import median_seconds

    from avalanche_sdlora.runner.streams import backbone_transforms, batch_transforms

    torch.set_num_threads(1)
    with torch.device("meta"):  # the config only: no weights are allocated
        backbone = timm.create_model(PAPER_BACKBONE, pretrained_cfg_overlay={"crop_pct": 0.875})
    pil_train, pil_eval = backbone_transforms(backbone)
    batched = batch_transforms(backbone)
    pixels = np.random.default_rng(0).integers(0, 256, (args.batch, 32, 32, 3), dtype=np.uint8)
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous().to(args.device)
    generator = torch.Generator().manual_seed(0)

    def on_pil(transform):
        return lambda: torch.stack([transform(Image.fromarray(p)) for p in pixels])

    def on_device(run):
        def timed() -> None:
            run()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()

        return timed

    paths = {
        "PIL train": on_pil(pil_train),
        "batched train": on_device(lambda: batched.train(images, generator)),
        "PIL eval": on_pil(pil_eval),
        "batched eval": on_device(lambda: batched.eval(images)),
    }
    return median_seconds(paths, args.repeats), torch.get_num_threads()


def main() -> None:
    args = parse_args()
    if not args.small_pages:
        os.environ["THP_MEM_ALLOC_ENABLE"] = "1"  # read by torch's allocator on first use
    seconds, threads = measure(args)
    rate = {name: args.batch / s for name, s in seconds.items()}
    pages = "small pages" if args.small_pages else "huge pages"
    print(
        f"{threads} thread, batch {args.batch}, 32 -> 224 px (ViT-B/16, crop_pct 0.875), "
        f"batched on {args.device}, {pages}, medians of {args.repeats} interleaved batches:"
    )
    for phase in ("train", "eval"):
        pil, fast = rate[f"PIL {phase}"], rate[f"batched {phase}"]
        print(
            f"  {phase:>5}: PIL {pil:7.0f} img/s ({1e3 / pil:.3f} ms/img), batched {fast:7.0f} "
            f"img/s ({1e3 / fast:.3f} ms/img), ratio {fast / pil:.1f}"
        )
    pil, fast = rate["PIL train"], rate["batched train"]
    print(
        f"data path: batched {fast:.0f} img/s, PIL {pil:.0f} img/s per core "
        f"(ratio {fast / pil:.1f})"
    )


if __name__ == "__main__":
    main()
