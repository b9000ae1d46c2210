"""Batched transforms: shapes, normalisation, seeded randomness, and each augmentation's effect."""
import pytest
import torch
import torchvision.transforms.v2.functional as TF

from handclip.config import AugmentConfig
from handclip.data.transforms import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, EvalTransform, TrainTransform, color_jitter
from handclip.errors import UserError

S = 16
OFF = AugmentConfig(hflip=0.0, padding=0, color_jitter=0.0, random_erasing=0.0)
IDENTITY = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}  # output = pixels / 255


def batch(n=6, size=S, seed=0, low=0):
    return torch.randint(low, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def unit(images):
    """uint8 → float in [0, 1], exactly as the transforms convert."""
    return TF.to_dtype(images, torch.float32, scale=True)


def seeded(seed):
    return torch.Generator().manual_seed(seed)


def test_eval_normalises_with_the_clip_statistics():
    images = batch()
    out = EvalTransform(S)(images)
    expected = (images.float() / 255 - torch.tensor(CLIP_MEAN)[:, None, None]) / torch.tensor(CLIP_STD)[:, None, None]
    assert out.dtype == torch.float32 and out.shape == (6, 3, S, S)
    assert torch.allclose(out, expected, atol=1e-6)


def test_eval_resizes_and_is_deterministic_and_flips_on_request():
    flat = torch.full((2, 3, 40, 40), 128, dtype=torch.uint8)
    resized = EvalTransform(S, **IDENTITY)(flat)
    assert resized.shape == (2, 3, S, S) and torch.allclose(resized, torch.full_like(resized, 128 / 255))
    images = batch(size=24)
    transform = EvalTransform(S)
    assert torch.equal(transform(images), transform(images))
    assert torch.equal(transform(images, flip=True), transform(images).flip(-1))


def test_train_with_every_augmentation_off_equals_eval():
    images = batch(size=20)
    assert torch.equal(TrainTransform(S, OFF)(images, generator=seeded(0)), EvalTransform(S)(images))


def test_train_normalisation_uses_the_given_statistics():
    images = batch()
    out = TrainTransform(S, OFF, IMAGENET_MEAN, IMAGENET_STD)(images, generator=seeded(0))
    assert torch.allclose(out, TF.normalize(images.float() / 255, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
                          atol=1e-6)
    assert torch.allclose(TrainTransform(S, OFF, **IDENTITY)(images, generator=seeded(0)), images.float() / 255)


def test_train_output_and_seeded_determinism():
    images = batch(size=20)
    transform = TrainTransform(S, AugmentConfig(hflip=0.5, padding=3, color_jitter=0.4, random_erasing=0.5))
    out = transform(images, generator=seeded(1))
    assert out.dtype == torch.float32 and out.shape == (6, 3, S, S)
    assert torch.equal(out, transform(images, generator=seeded(1)))
    assert not torch.equal(out, transform(images, generator=seeded(2)))


def test_flip_probability_zero_never_flips_and_one_always_does():
    images = batch(n=32)
    never = TrainTransform(S, OFF)
    always = TrainTransform(S, AugmentConfig(hflip=1.0, padding=0, color_jitter=0.0, random_erasing=0.0))
    plain = EvalTransform(S)(images)
    for seed in range(5):
        assert torch.equal(never(images, generator=seeded(seed)), plain)
        assert torch.equal(always(images, generator=seeded(seed)), plain.flip(-1))


def test_pad_and_crop_shifts_each_sample_within_the_padding():
    images = batch(n=16, low=1)  # no zero pixels: only padding is zero
    padding = 2
    transform = TrainTransform(S, AugmentConfig(hflip=0.0, padding=padding, color_jitter=0.0, random_erasing=0.0),
                               **IDENTITY)
    out = transform(images, generator=seeded(3))
    padded = TF.pad(unit(images), [padding])
    offsets = []
    for sample, image in zip(out, padded):
        matches = [(y, x) for y in range(2 * padding + 1) for x in range(2 * padding + 1)
                   if torch.equal(sample, image[:, y:y + S, x:x + S])]
        assert len(matches) == 1
        offsets.append(matches[0])
    assert len(set(offsets)) > 1  # offsets are drawn per sample


def test_erasing_probability_one_erases_a_rectangle_in_every_sample():
    images = batch(n=16, size=32, low=1)
    transform = TrainTransform(32, AugmentConfig(hflip=0.0, padding=0, color_jitter=0.0, random_erasing=1.0),
                               **IDENTITY)
    out = transform(images, generator=seeded(4))
    for sample in out:
        erased = (sample == 0).all(dim=0)
        rows, cols = erased.any(dim=1).nonzero(), erased.any(dim=0).nonzero()
        box = erased[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        assert box.all() and erased.sum() == box.numel()  # exactly one filled rectangle
        assert 0.02 * 32 * 32 * 0.8 <= box.numel() <= 0.33 * 32 * 32 * 1.2  # torchvision's area range


def test_erased_samples_are_unchanged_outside_the_rectangle():
    images = batch(n=8, size=32, low=1)
    transform = TrainTransform(32, AugmentConfig(hflip=0.0, padding=0, color_jitter=0.0, random_erasing=1.0),
                               **IDENTITY)
    out = transform(images, generator=seeded(5))
    kept = out != 0
    assert torch.equal(out[kept], unit(images)[kept])


class FixedDraws:
    """Stands in for RandomDraws: hands out given per-sample factors in order."""

    def __init__(self, *factors):
        self.factors = list(factors)

    def uniform(self, low, high):
        return torch.tensor(self.factors.pop(0))


def test_color_jitter_matches_torchvision_per_sample():
    images = unit(batch(n=2))
    brightness, contrast, saturation = [0.7, 1.3], [1.2, 0.6], [0.5, 1.4]
    out = color_jitter(images, 0.5, FixedDraws(brightness, contrast, saturation))
    for i, image in enumerate(images):
        expected = TF.adjust_brightness(image, brightness[i])
        expected = TF.adjust_contrast(expected, contrast[i])
        expected = TF.adjust_saturation(expected, saturation[i])
        assert torch.allclose(out[i], expected, atol=1e-6)


def test_color_jitter_draws_different_factors_per_sample():
    same = batch(n=1, size=20).expand(8, -1, -1, -1)
    transform = TrainTransform(S, AugmentConfig(hflip=0.0, padding=0, color_jitter=0.5, random_erasing=0.0))
    out = transform(same, generator=seeded(6))
    assert len({tuple(o.mean(dim=(1, 2)).tolist()) for o in out}) == 8


def test_flip_and_erasing_probabilities_apply_per_sample():
    images = batch(n=64, low=1)
    half = AugmentConfig(hflip=0.5, padding=0, color_jitter=0.0, random_erasing=0.5)
    out = TrainTransform(S, half, **IDENTITY)(images, generator=seeded(7))
    plain = unit(images)
    kept = out != 0
    flipped = [torch.equal(o[k], p.flip(-1)[k]) for o, p, k in zip(out, plain, kept)]
    unflipped = [torch.equal(o[k], p[k]) for o, p, k in zip(out, plain, kept)]
    assert all(a != b for a, b in zip(flipped, unflipped))  # each sample is one or the other
    erased = (~kept).flatten(1).any(1)
    assert 16 < sum(flipped) < 48 and 16 < int(erased.sum()) < 48


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batches_with_a_cuda_generator_match_the_cpu_geometry():
    images = batch(n=8, size=20)
    config = AugmentConfig(hflip=0.5, padding=2, color_jitter=0.3, random_erasing=0.5)
    def augment():
        return TrainTransform(S, config)(images.cuda(), generator=torch.Generator(device="cuda").manual_seed(0))

    out = augment()
    assert out.device.type == "cuda" and out.shape == (8, 3, S, S)
    assert torch.equal(out, augment())
    # uint8 resizing rounds differently on the GPU: at most one grey level apart
    on_gpu, on_cpu = EvalTransform(S)(images.cuda()).cpu(), EvalTransform(S)(images)
    assert torch.allclose(on_gpu, on_cpu, atol=1.5 / 255 / min(CLIP_STD))


def test_resize_then_random_crop_reads_windows_of_the_resized_image():
    resized_side, images = 20, batch(n=24, size=28, low=1)
    augment = AugmentConfig(hflip=0.0, padding=0, color_jitter=0.0, random_erasing=0.0, resize=resized_side)
    out = TrainTransform(S, augment, **IDENTITY)(images, generator=seeded(6))
    assert out.shape == (24, 3, S, S)
    resized = unit(TF.resize(images, [resized_side, resized_side], antialias=True))  # no padding: no zeros
    span = resized_side - S
    offsets = []
    for sample, image in zip(out, resized):
        matches = [(y, x) for y in range(span + 1) for x in range(span + 1)
                   if torch.equal(sample, image[:, y:y + S, x:x + S])]
        assert len(matches) == 1
        offsets.append(matches[0])
    assert len(set(offsets)) > 4 and {0, span} & {y for y, _ in offsets}  # per sample, up to the border


def test_resize_smaller_than_the_input_is_a_user_error():
    with pytest.raises(UserError, match="data.augment.resize"):
        TrainTransform(S, AugmentConfig(resize=S - 1))


def test_noise_erasing_fills_the_rectangle_with_standard_normal_values():
    images = batch(n=16, size=32, low=1)
    augment = AugmentConfig(hflip=0.0, padding=0, color_jitter=0.0, random_erasing=1.0, erasing_fill="noise")
    transform = TrainTransform(32, augment, **IDENTITY)
    out = transform(images, generator=seeded(8))
    zero_fill = TrainTransform(32, AugmentConfig(hflip=0.0, padding=0, color_jitter=0.0, random_erasing=1.0),
                               **IDENTITY)(images, generator=seeded(8))
    erased = zero_fill == 0  # the same draws place the same rectangles
    assert erased.any(dim=(1, 2, 3)).all()
    assert torch.equal(out[~erased], unit(images)[~erased])
    noise = out[erased]
    assert (noise < 0).any() and abs(float(noise.mean())) < 0.1 and abs(float(noise.std()) - 1) < 0.1
    assert torch.equal(out, transform(images, generator=seeded(8)))
