"""ImageDataset items and batches, with and without the cache, and BatchLoader."""

import numpy as np
import pytest
import torch

from handclip.data.datasets import BatchLoader, ImageDataset
from handclip.data.images import load_resized

SIZE = 12


@pytest.fixture
def samples(make_photos):
    return make_photos(7)


@pytest.fixture
def cached(samples, tmp_path):
    return ImageDataset(samples, SIZE, cache_dir=tmp_path / "cache")


def test_items_are_the_stored_images_with_their_index(cached, samples):
    image, index = cached[3]
    assert image.dtype == torch.uint8 and image.shape == (3, SIZE, SIZE)
    assert np.array_equal(image.permute(1, 2, 0).numpy(), load_resized(samples[3].path, SIZE))
    assert index == 3


def test_batch_agrees_with_items_and_with_the_uncached_dataset(cached, samples):
    order = [5, 0, 5, 2]
    expected = torch.stack([cached[i][0] for i in order])
    assert torch.equal(cached.batch(order), expected)
    uncached = ImageDataset([s.path for s in samples], SIZE, cache=False)
    assert uncached.cache is None
    assert torch.equal(uncached.batch(order), expected)
    assert uncached[4][1] == 4


@pytest.mark.parametrize("num_workers", [0, 1])
def test_batch_loader_yields_the_sampler_batches_cached_or_decoded(cached, samples, num_workers):
    batches = [[6, 1], [3], [0, 2, 4]]
    expected = [(indices, cached.batch(indices)) for indices in batches]
    uncached = ImageDataset(samples, SIZE, cache=False)
    for dataset in (cached, uncached):
        read = [(indices.tolist(), images) for indices, images in BatchLoader(dataset, batches, num_workers)]
        assert [i for i, _ in read] == batches
        assert all(torch.equal(images, want) for (_, images), (_, want) in zip(read, expected))
    assert BatchLoader(uncached, batches, num_workers).loader.persistent_workers == (num_workers > 0)
