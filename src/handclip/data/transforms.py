"""Batched tensor transforms, run on whichever device holds the batch (the GPU when training there).

Both transforms take the stored uint8 images ``(B, 3, H, W)`` and return normalised float32
``(B, 3, S, S)``. Training draws every random number from the ``generator`` passed in, one draw per
sample, so a seeded run repeats exactly and a resumed run continues the same stream.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torchvision.transforms.v2.functional as TF
from open_clip.constants import IMAGENET_MEAN, IMAGENET_STD
from open_clip.constants import OPENAI_DATASET_MEAN as CLIP_MEAN
from open_clip.constants import OPENAI_DATASET_STD as CLIP_STD

from handclip.config import AugmentConfig
from handclip.errors import UserError

# torchvision RandomErasing defaults: erased area fraction, and aspect ratio drawn log-uniformly.
ERASE_SCALE = (0.02, 0.33)
ERASE_LOG_RATIO = (math.log(0.3), math.log(3.3))
ERASING_FILLS = ("zero", "noise")


class EvalTransform:
    """Resize to ``image_size`` and normalise; ``flip=True`` returns the mirrored batch."""

    def __init__(self, image_size: int, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD):
        self.image_size = image_size
        self.mean, self.std = list(mean), list(std)

    def __call__(self, images: torch.Tensor, flip: bool = False) -> torch.Tensor:
        x = to_float(resize(images, self.image_size))
        if flip:
            x = x.flip(-1)
        return TF.normalize(x, self.mean, self.std, inplace=True)  # x is already a fresh tensor


class TrainTransform:
    """Resize (to ``augment.resize``, else ``image_size``), pad + random crop to ``image_size``,
    horizontal flip, colour jitter, normalise, random erasing.

    ``mean``/``std``: the model's own preprocessing statistics (CLIP's by default).
    """

    def __init__(self, image_size: int, augment: AugmentConfig, mean: Sequence[float] = CLIP_MEAN,
                 std: Sequence[float] = CLIP_STD):
        if augment.resize is not None and augment.resize < image_size:
            raise UserError(f"config key 'data.augment.resize': {augment.resize} is smaller than the model's "
                            f"input, {image_size} px")
        if augment.erasing_fill not in ERASING_FILLS:
            raise UserError(f"config key 'data.augment.erasing_fill': {augment.erasing_fill!r} is not zero or noise")
        self.image_size = image_size
        self.augment = augment
        self.mean = list(mean)
        self.std = list(std)

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        draw = RandomDraws(len(images), images.device, generator)
        augment = self.augment
        # geometry on uint8: a quarter of the memory traffic of float32
        x = resize(images, augment.resize or self.image_size)
        x = pad_crop_flip(x, self.image_size, augment.padding, augment.hflip, draw)
        x = to_float(x)
        if augment.color_jitter > 0:
            x = color_jitter(x, augment.color_jitter, draw)
        x = TF.normalize(x, self.mean, self.std, inplace=True)  # x is already a fresh tensor
        if augment.random_erasing > 0:
            x = random_erase(x, augment.random_erasing, draw, noise=augment.erasing_fill == "noise")
        return x


class RandomDraws:
    """Uniform random numbers from one generator, delivered on the batch's device."""

    def __init__(self, batch_size: int, device: torch.device, generator: torch.Generator | None):
        self.batch_size = batch_size
        self.device = device
        self.generator = generator

    def uniform(self, low: float = 0.0, high: float = 1.0) -> torch.Tensor:
        """(B,) floats in [low, high)."""
        source = self.generator.device if self.generator is not None else self.device
        u = torch.rand(self.batch_size, generator=self.generator, device=source).to(self.device)
        return low + (high - low) * u

    def integers(self, high: torch.Tensor | int) -> torch.Tensor:
        """(B,) integers in [0, high] (inclusive), ``high`` per sample or shared."""
        # a Python bound stays a Python number: a tensor made from it would be a host-to-device copy
        return (self.uniform() * (high + 1)).long()

    def chance(self, p: float) -> torch.Tensor:
        """(B,) booleans, each True with probability ``p``."""
        return self.uniform() < p

    def normal(self, shape: Sequence[int]) -> torch.Tensor:
        """Standard normal numbers of ``shape``."""
        source = self.generator.device if self.generator is not None else self.device
        return torch.randn(tuple(shape), generator=self.generator, device=source).to(self.device)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] → a new float32 tensor in [0, 1]."""
    if images.dtype != torch.uint8:
        raise TypeError(f"expected a uint8 image batch, got {images.dtype}")
    return TF.to_dtype(images, torch.float32, scale=True)


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """Antialiased bilinear resize to ``size × size`` (uint8 stays uint8: torchvision has a fast CPU path)."""
    if images.shape[-2:] == (size, size):
        return images
    return TF.resize(images, [size, size], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)


def pad_crop_flip(x: torch.Tensor, size: int, padding: int, hflip: float, draw: RandomDraws) -> torch.Tensor:
    """Zero-pad by ``padding``, crop a ``size × size`` square from each sample at its own random
    offset, mirror some.

    One gather crops and mirrors: each sample reads its own rows and (possibly reversed) columns.
    """
    batch, _, height, width = x.shape
    if padding > 0:
        x = TF.pad(x, [padding])
    top = draw.integers(height + 2 * padding - size)
    left = draw.integers(width + 2 * padding - size)
    flip = draw.chance(hflip)
    rows = top[:, None] + torch.arange(size, device=x.device)
    cols = left[:, None] + torch.arange(size, device=x.device)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    samples = torch.arange(batch, device=x.device)[:, None, None]
    # advanced indexing puts the indexed dims first: (B, H, W, C) → back to (B, C, H, W); the float
    # steps after this run faster on a contiguous batch than on this channels-last one
    crops = x.permute(0, 2, 3, 1)[samples, rows[:, :, None], cols[:, None, :]]
    return crops.permute(0, 3, 1, 2).contiguous()


def color_jitter(x: torch.Tensor, strength: float, draw: RandomDraws) -> torch.Tensor:
    """Brightness, contrast and saturation, each by a per-sample factor in [1 - s, 1 + s]
    (torchvision ColorJitter's formulas, with a factor per sample instead of per batch)."""
    low, high = max(0.0, 1 - strength), 1 + strength
    brightness, contrast, saturation = (draw.uniform(low, high)[:, None, None, None] for _ in range(3))
    x = (x * brightness).clamp_(0, 1)
    gray_mean = TF.rgb_to_grayscale(x).mean(dim=(-3, -2, -1), keepdim=True)
    x = blend(x, gray_mean, contrast)
    return blend(x, TF.rgb_to_grayscale(x), saturation)


def blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``factor * x + (1 - factor) * other`` in [0, 1], in one pass plus the clamp."""
    return torch.lerp(other, x, factor).clamp_(0, 1)


def random_erase(x: torch.Tensor, p: float, draw: RandomDraws, noise: bool = False) -> torch.Tensor:
    """Set one random rectangle per chosen sample (probability ``p``) to 0, the mean colour once
    normalised (in place), or with ``noise`` to standard normal values drawn per pixel and channel
    (timm's mode 'pixel'). Area and aspect ratio follow torchvision RandomErasing; a rectangle
    that would not fit is clipped to the image instead of redrawn."""
    height, width = x.shape[-2:]
    erase = draw.chance(p)
    area = draw.uniform(*ERASE_SCALE) * height * width
    ratio = torch.exp(draw.uniform(*ERASE_LOG_RATIO))
    h = torch.sqrt(area * ratio).round().long().clamp(1, height)
    w = torch.sqrt(area / ratio).round().long().clamp(1, width)
    top = draw.integers(height - h)
    left = draw.integers(width - w)
    rows = torch.arange(height, device=x.device)[None, :]
    cols = torch.arange(width, device=x.device)[None, :]
    in_rows = (rows >= top[:, None]) & (rows < (top + h)[:, None])
    in_cols = (cols >= left[:, None]) & (cols < (left + w)[:, None])
    mask = erase[:, None, None] & in_rows[:, :, None] & in_cols[:, None, :]
    if noise:
        return torch.where(mask[:, None], draw.normal(x.shape), x)
    return x.masked_fill_(mask[:, None], 0.0)
