"""Batched transforms: torchvision's crop statistics, seeded draws, and PIL's pixels within rounding."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import functional as F

from avalanche_sdlora.batch_transforms import BatchTransforms

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
RESAMPLING = ("auto", "matrices")  # torch's uint8 resize on the CPU; the matrices a GPU runs


def smooth_images(count: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """``(count, height, width, 3)`` uint8 images: coarse noise upsampled, as photos are smooth
    where PIL's rounding and clipping between its two passes barely matter."""
    rng = np.random.RandomState(seed)
    coarse = rng.randint(0, 256, (count, height // 4 + 1, width // 4 + 1, 3)).astype(np.uint8)
    return np.stack(
        [np.asarray(Image.fromarray(c).resize((width, height), Image.BICUBIC)) for c in coarse]
    )


def as_batch(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def pixel_error(batched: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Absolute differences in uint8 grey levels (the normalisation undone)."""
    return ((batched - reference) * torch.tensor(STD).view(1, 3, 1, 1) * 255).abs()


def test_crop_boxes_have_torchvisions_scale_and_aspect_statistics():
    transform = BatchTransforms((224, 224), MEAN, STD, scale=(0.05, 1.0))
    draws, height, width = 20000, 32, 32
    boxes, flips = transform.crop_boxes(draws, height, width, torch.Generator().manual_seed(0))
    top, left, h, w = boxes.double().unbind(1)
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + h <= height).all() and (left + w <= width).all() and (h >= 1).all()
    area = h * w / (height * width)
    aspect = w / h
    # rounding to whole pixels widens the ranges a little, as in torchvision
    assert area.min() >= 0.04 and area.max() <= 1.0
    assert aspect.min() >= 0.75 * 0.85 and aspect.max() <= 4 / 3 / 0.85
    torch.manual_seed(0)
    reference = torch.tensor(
        [
            transforms.RandomResizedCrop.get_params(
                torch.empty(3, height, width), [0.05, 1.0], [3 / 4, 4 / 3]
            )
            for _ in range(draws)
        ],
        dtype=torch.float64,
    )
    reference_area = reference[:, 2] * reference[:, 3] / (height * width)
    quantiles = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=torch.float64)
    torch.testing.assert_close(
        area.quantile(quantiles), reference_area.quantile(quantiles), atol=0.02, rtol=0
    )
    reference_aspect = reference[:, 3] / reference[:, 2]
    torch.testing.assert_close(
        aspect.log().mean(), reference_aspect.log().mean(), atol=0.01, rtol=0
    )
    # the box lies anywhere it fits, uniformly
    slack = (height - h).clamp(min=1)
    assert abs(float((top / slack)[h < height].mean()) - 0.5) < 0.02
    assert abs(float(flips.double().mean()) - 0.5) < 0.02


def test_when_no_attempt_fits_the_crop_is_torchvisions_centre_fallback():
    transform = BatchTransforms((16, 16), MEAN, STD, scale=(0.9, 1.0))
    boxes, _ = transform.crop_boxes(50, 8, 64, torch.Generator().manual_seed(0))
    expected = transforms.RandomResizedCrop.get_params(
        torch.empty(3, 8, 64), [0.9, 1.0], [3 / 4, 4 / 3]
    )
    assert expected == (0, 26, 8, 11)
    assert boxes.tolist() == [list(expected)] * 50


@pytest.mark.parametrize("resampling", RESAMPLING)
def test_the_batched_crop_is_seeded(resampling):
    transform = BatchTransforms((24, 24), MEAN, STD, resampling=resampling)
    images = as_batch(smooth_images(6, 32, 32))

    def augmented(seed: int) -> torch.Tensor:
        return transform.train(images, torch.Generator().manual_seed(seed))

    first = augmented(7)
    assert first.shape == (6, 3, 24, 24) and first.dtype == torch.float32
    assert torch.equal(first, augmented(7))
    assert not torch.equal(first, augmented(8))
    boxes, _ = transform.crop_boxes(6, 32, 32, torch.Generator().manual_seed(7))
    assert len({tuple(box) for box in boxes.tolist()}) == 6  # fresh parameters per image
    # the draws come from the generator alone: the global RNG plays no part
    torch.manual_seed(123)
    assert torch.equal(first, augmented(7))


@pytest.mark.parametrize("resampling", RESAMPLING)
@pytest.mark.parametrize(
    "height, width, size, crop_pct, interpolation",
    [
        (32, 32, 224, 0.875, "bicubic"),  # the paper's CIFAR-100 protocol
        (40, 30, 24, 1.0, "bicubic"),  # not square: the shorter side is resized
        (64, 64, 64, 1.0, "bilinear"),  # the study's images: no resize at all
        (50, 70, 32, 1.25, "bicubic"),  # crop_pct > 1: CenterCrop pads with black
        (48, 48, 20, 0.9, "lanczos"),  # downscaling: PIL's filter widens (antialiasing)
        (33, 31, 16, 0.875, "nearest"),
    ],
)
def test_eval_equals_the_pil_path_within_interpolation(
    resampling, height, width, size, crop_pct, interpolation
):
    images = smooth_images(4, height, width)
    batched = BatchTransforms(
        (size, size), MEAN, STD, interpolation, crop_pct, resampling=resampling
    ).eval(as_batch(images))
    mode = transforms.InterpolationMode(interpolation)
    pil = transforms.Compose(
        [
            transforms.Resize(math.floor(size / crop_pct), interpolation=mode),
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            transforms.Normalize(MEAN, STD),
        ]
    )
    reference = torch.stack([pil(Image.fromarray(image)) for image in images])
    error = pixel_error(batched, reference)
    # PIL rounds to uint8 after each of its two passes; torch's uint8 resize (the CPU's for
    # bilinear and bicubic) does too, the matrices do not
    by_torch = resampling == "auto" and interpolation in ("bilinear", "bicubic")
    assert float(error.max()) <= (1.01 if by_torch else 3.01)
    assert float(error.mean()) <= 0.4


@pytest.mark.parametrize("resampling", RESAMPLING)
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear", "box"])
def test_train_crops_equal_pils_resized_crops(resampling, interpolation):
    images = smooth_images(8, 32, 32, seed=1)
    transform = BatchTransforms(
        (224, 224), MEAN, STD, interpolation, resampling=resampling, scale=(0.05, 1.0)
    )
    boxes, flips = transform.crop_boxes(8, 32, 32, torch.Generator().manual_seed(3))
    batched = transform.resized_crops(as_batch(images), boxes, flips)
    mode = transforms.InterpolationMode(interpolation)
    reference = []
    for image, box, flip in zip(images, boxes.tolist(), flips.tolist(), strict=True):
        crop = F.resized_crop(Image.fromarray(image), *box, [224, 224], interpolation=mode)
        crop = F.hflip(crop) if flip else crop
        reference.append(F.normalize(F.to_tensor(crop), MEAN, STD))
    error = pixel_error(batched, torch.stack(reference))
    assert float(error.max()) <= 4.0
    assert float(error.mean()) <= 0.4
    assert flips.any() and not flips.all()  # both orientations were compared


def test_without_augmentation_training_is_evaluation():
    transform = BatchTransforms((16, 16), MEAN, STD, augment=False)
    images = as_batch(smooth_images(3, 20, 20))
    assert torch.equal(transform.train(images, torch.Generator()), transform.eval(images))


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="interpolation 'cubic' is not one of"):
        BatchTransforms((16, 16), MEAN, STD, "cubic")
    with pytest.raises(ValueError, match="resampling 'gpu' is not one of"):
        BatchTransforms((16, 16), MEAN, STD, resampling="gpu")
