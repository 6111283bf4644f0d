"""The data transforms of a pretrained ViT on whole batches of uint8 images, on any device.

Training: a random resized crop (torchvision's ``RandomResizedCrop``: area and aspect ranges, ten
attempts, the same centre-crop fallback), fresh for every image and drawn from a
``torch.Generator``, a horizontal flip, a resize to the input size and normalisation. Evaluation:
Resize (shorter side to ``floor(size / crop_pct)``) + CenterCrop, as timm's eval transform.

Every resize is PIL's (``Image.resize``: its filters, their support widened when downscaling, taps
clipped to the crop and renormalised), computed in one of two ways:

- On the CPU, bilinear and bicubic go through torch's antialiased uint8 resize, which reimplements
  PIL's (its weights and its rounding to uint8 after each pass) with SIMD, one crop at a time:
  several times faster than PIL per image (``benchmarks/data_speed.py``).
- Elsewhere (a GPU) and for the other filters, each axis's resize is a matrix whose row ``u`` holds
  PIL's weights of output pixel ``u``, and a batch is two matrix products, ``rows @ image @
  cols^T``, the second one per image with all channels at once: a handful of kernels per batch,
  whatever its crops. Its results equal PIL's up to PIL's rounding to uint8 between its two passes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["INTERPOLATIONS", "BatchTransforms", "resample_weights"]


def _box(x: Tensor) -> Tensor:
    return ((x > -0.5) & (x <= 0.5)).to(x.dtype)


def _bilinear(x: Tensor) -> Tensor:
    return (1 - x.abs()).clamp(min=0)


def _hamming(x: Tensor) -> Tensor:
    inside = x.abs() < 1
    return torch.where(inside, torch.sinc(x) * (0.54 + 0.46 * torch.cos(math.pi * x)), 0.0)


def _bicubic(x: Tensor) -> Tensor:
    a, x = -0.5, x.abs()  # PIL's a (torch's bicubic uses -0.75)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1, near, torch.where(x < 2, far, 0.0))


def _lanczos(x: Tensor) -> Tensor:
    return torch.where(x.abs() < 3, torch.sinc(x) * torch.sinc(x / 3), 0.0)


_FILTERS: dict[str, tuple[Callable[[Tensor], Tensor], float]] = {
    "box": (_box, 0.5),
    "bilinear": (_bilinear, 1.0),
    "hamming": (_hamming, 1.0),
    "bicubic": (_bicubic, 2.0),
    "lanczos": (_lanczos, 3.0),
}
"""PIL's resampling filters and their supports (``libImaging/Resample.c``)."""
INTERPOLATIONS = ("nearest", *_FILTERS)
"""The interpolations of timm's data configs, each as PIL resamples."""
RESAMPLING = ("auto", "matrices")
ATTEMPTS = 10
"""torchvision's ``RandomResizedCrop`` tries ten crops before its centre-crop fallback."""


def _nearest_taps(scale: np.ndarray, out_size: int) -> Tensor:
    """The input pixel of each output pixel in PIL's nearest-neighbour resize: it adds ``scale``
    to the first centre ``scale / 2`` once per output pixel (``ImagingScaleAffine``), and these
    sums can fall just below an integer that ``(u + 0.5) * scale`` would reach."""
    steps = np.repeat(scale[:, None], out_size, axis=1)
    steps[:, 0] = scale * 0.5
    return torch.from_numpy(np.floor(np.add.accumulate(steps, axis=1)))


def resample_weights(
    start: Tensor, length: Tensor, in_size: int, out_size: int, interpolation: str
) -> Tensor:
    """``(n, out_size, in_size)``: for each of ``n`` segments ``[start, start + length)`` of an
    axis of ``in_size`` pixels, the weights PIL gives the input pixels of each output pixel when it
    resizes the segment (cropped first) to ``out_size`` pixels."""
    device = start.device
    scale = length.to(torch.float64)[:, None] / out_size
    centre = (torch.arange(out_size, device=device, dtype=torch.float64) + 0.5) * scale
    if interpolation == "nearest":
        taps = _nearest_taps(scale[:, 0].cpu().numpy(), out_size).to(device)[..., None]
        weights = torch.ones_like(taps)
    else:
        kernel, support = _FILTERS[interpolation]
        filterscale = scale.clamp(min=1.0)  # downscaling widens the filter: PIL's antialiasing
        reach = support * filterscale
        width = 2 * math.ceil(support * float(filterscale.max())) + 1
        first = (centre - reach + 0.5).floor().clamp(min=0)
        last = torch.minimum((centre + reach + 0.5).floor(), length[:, None].to(torch.float64))
        taps = first[..., None] + torch.arange(width, device=device, dtype=torch.float64)
        weights = kernel((taps + 0.5 - centre[..., None]) * (1.0 / filterscale[..., None]))
        weights = weights * (taps < last[..., None])
        weights = weights / weights.sum(-1, keepdim=True)
    index = (taps + start.to(torch.float64)[:, None, None]).long().clamp(max=in_size - 1)
    matrix = torch.zeros(len(start), out_size, in_size, device=device, dtype=torch.float32)
    return matrix.scatter_add_(2, index, weights.to(torch.float32))


def _resized_length(height: int, width: int, shorter: int) -> tuple[int, int]:
    """torchvision's ``Resize(shorter)``: the shorter side to ``shorter``, the other in proportion."""
    if width <= height:
        return int(shorter * height / width), shorter
    return shorter, int(shorter * width / height)


def _window(length: int, crop: int) -> tuple[slice, slice]:
    """``(kept, placed)`` on an axis: the pixels of a resized axis of ``length`` that torchvision's
    ``CenterCrop(crop)`` keeps, and where they land in the crop (the rest is black padding)."""
    offset = round((length - crop) / 2.0) if crop <= length else -((crop - length) // 2)
    start, end = max(offset, 0), min(offset + crop, length)
    return slice(start, end), slice(start - offset, end - offset)


@dataclass(frozen=True)
class BatchTransforms:
    """A pretrained ViT's training and evaluation transforms on batches of uint8 images
    ``(N, C, H, W)`` (0..255), returning normalised float32 batches ``(N, C, *size)`` on the
    images' device.

    ``train(images, generator)`` draws a crop of ``scale`` (area fraction) and ``ratio`` (aspect)
    and a horizontal flip for every image from ``generator`` (a CPU ``torch.Generator``, so the
    draws are the same on every device) and resizes the crops with ``interpolation``; without
    ``augment`` it is ``eval``. ``eval(images)`` resizes the shorter side to
    ``floor(size[0] / crop_pct)`` and takes the centre ``size``. ``resampling``: ``"auto"`` (see
    the module docstring) or ``"matrices"``, the matrix form on every device (what a GPU runs).
    """

    size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    scale: tuple[float, float] = (0.05, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    augment: bool = True
    resampling: str = "auto"

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"interpolation {self.interpolation!r} is not one of {list(INTERPOLATIONS)}"
            )
        if self.resampling not in RESAMPLING:
            raise ValueError(f"resampling {self.resampling!r} is not one of {list(RESAMPLING)}")
        if len(self.mean) != len(self.std):
            raise ValueError(f"mean {self.mean} and std {self.std} differ in length")

    def crop_boxes(
        self, n: int, height: int, width: int, generator: torch.Generator
    ) -> tuple[Tensor, Tensor]:
        """``(boxes, flips)``: ``n`` boxes ``(top, left, height, width)`` in pixels (int64), drawn
        as torchvision's ``RandomResizedCrop.get_params`` draws them, and ``n`` flip decisions."""
        area = torch.empty(n, ATTEMPTS).uniform_(*self.scale, generator=generator) * height * width
        low, high = math.log(self.ratio[0]), math.log(self.ratio[1])
        aspect = torch.empty(n, ATTEMPTS).uniform_(low, high, generator=generator).exp()
        w, h = (area * aspect).sqrt().round(), (area / aspect).sqrt().round()
        fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
        chosen = fits.to(torch.uint8).argmax(1, keepdim=True)  # the first attempt that fits
        w, h = w.gather(1, chosen)[:, 0], h.gather(1, chosen)[:, 0]
        place = torch.rand(n, 2, generator=generator)
        top = (place[:, 0] * (height - h + 1)).floor()
        left = (place[:, 1] * (width - w + 1)).floor()
        fallback = self._fallback(height, width)
        found = fits.any(1)
        boxes = torch.stack([top, left, h, w], 1).long()
        boxes[~found] = torch.tensor(fallback)
        flips = torch.rand(n, generator=generator) < 0.5
        return boxes, flips

    def _fallback(self, height: int, width: int) -> tuple[int, int, int, int]:
        """torchvision's box when no attempt fits: the centre crop of the nearest allowed aspect."""
        aspect = width / height
        if aspect < min(self.ratio):
            w, h = width, round(width / min(self.ratio))
        elif aspect > max(self.ratio):
            w, h = round(height * max(self.ratio)), height
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def resized_crops(self, images: Tensor, boxes: Tensor, flips: Tensor) -> Tensor:
        """Each image's box resized to ``size``, mirrored where ``flips``, normalised."""
        whole = [slice(0, length) for length in self.size]
        return self._resize(images, boxes, flips, self.size, (whole, whole))

    def train(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """The training transform of a batch; the crops and flips come from ``generator``."""
        if not self.augment:
            return self.eval(images)
        boxes, flips = self.crop_boxes(len(images), *images.shape[-2:], generator)
        return self.resized_crops(images, boxes, flips)

    def eval(self, images: Tensor) -> Tensor:
        """The evaluation transform of a batch: Resize + CenterCrop, normalised; where the crop is
        larger than the resized image (``crop_pct`` > 1), the rest is black, as torchvision pads."""
        n, _, height, width = images.shape
        resized = _resized_length(height, width, math.floor(self.size[0] / self.crop_pct))
        windows = [_window(length, crop) for length, crop in zip(resized, self.size, strict=True)]
        boxes = torch.tensor([[0, 0, height, width]]).expand(n, -1)
        return self._resize(images, boxes, torch.zeros(n, dtype=torch.bool), resized, windows)

    def _resize(
        self,
        images: Tensor,
        boxes: Tensor,
        flips: Tensor,
        resized: tuple[int, int],
        windows: list[tuple[slice, slice]],
    ) -> Tensor:
        """Each image's box resized to ``resized``, mirrored where ``flips``; of that, the rows and
        columns ``windows`` keep, placed where they say in a black image of ``size``;
        normalised."""
        (rows_kept, rows_to), (cols_kept, cols_to) = windows
        padded = (rows_to.stop - rows_to.start, cols_to.stop - cols_to.start) != self.size
        if not self._resized_by_torch(images):
            _, _, height, width = images.shape
            top, left, h, w = boxes.to(images.device).unbind(1)
            rows = resample_weights(top, h, height, resized[0], self.interpolation)
            cols = resample_weights(left, w, width, resized[1], self.interpolation)
            cols = torch.where(flips.to(images.device)[:, None, None], cols.flip(1), cols)
            kept = self._resample(images, rows[:, rows_kept], cols[:, cols_kept])
            if not padded:
                return kept
            black = torch.tensor([low for low, _ in self._ranges()], device=images.device)
            out = black.view(1, -1, 1, 1).expand(len(images), -1, *self.size).clone()
            out[:, :, rows_to, cols_to] = kept
            return out
        # one image at a time, each normalised while it is in the cache, into one fresh batch
        out = (torch.zeros if padded else torch.empty)(len(images), images.shape[1], *self.size)
        mean = 255 * torch.tensor(self.mean).view(-1, 1, 1)
        std = 255 * torch.tensor(self.std).view(-1, 1, 1)
        for index, ((top, left, h, w), flip) in enumerate(
            zip(boxes.tolist(), flips.tolist(), strict=True)
        ):
            crop = images[index : index + 1, :, top : top + h, left : left + w]
            crop = (crop.flip(-1) if flip else crop).contiguous(memory_format=torch.channels_last)
            image = F.interpolate(crop, size=resized, mode=self.interpolation, antialias=True)
            out[index, :, rows_to, cols_to] = image[0, :, rows_kept, cols_kept]
            out[index].sub_(mean).div_(std)
        return out

    def _resized_by_torch(self, images: Tensor) -> bool:
        """On the CPU, bilinear and bicubic resizes go through torch's uint8 resize, on the
        channels-last layout of its fast kernels (unless ``resampling`` asks for matrices)."""
        return (
            self.resampling == "auto"
            and images.device.type == "cpu"
            and self.interpolation in ("bilinear", "bicubic")
        )

    def _resample(self, images: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
        """``rows[i] @ image @ cols[i]^T`` for each image ``i`` and channel, on the normalised
        image, clipped to the range of a uint8 image as PIL's output is (``rows``: ``(N, h, H)``,
        ``cols``: ``(N, w, W)``). Every row of weights sums to 1, so resampling the normalised
        image is normalising the resampled one."""
        n, channels = images.shape[:2]
        mean = torch.tensor(self.mean, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, -1, 1, 1)
        normalised = images.to(torch.float32).sub_(255 * mean).div_(255 * std)
        vertical = torch.matmul(rows[:, None], normalised)
        stacked = vertical.view(n, channels * rows.shape[1], -1)
        out = torch.bmm(stacked, cols.transpose(1, 2))
        out = out.view(n, channels, rows.shape[1], -1)
        for channel, (low, high) in enumerate(self._ranges()):
            out[:, channel].clamp_(low, high)
        return out

    def _ranges(self) -> list[tuple[float, float]]:
        """Each channel's normalised black and white."""
        return [(-m / s, (1 - m) / s) for m, s in zip(self.mean, self.std, strict=True)]
