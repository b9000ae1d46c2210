"""ImageDataset items and batches, with and without the cache, and make_loader."""

import numpy as np
import pytest
import torch

from handclip.data.datasets import ImageDataset, make_loader
from handclip.data.images import load_resized

SIZE = 12


@pytest.fixture
def samples(make_photos):
    return make_photos(7)


@pytest.fixture
def cached(samples, tmp_path):
    return ImageDataset(samples, list(range(10, 17)), SIZE, cache_dir=tmp_path / "cache")


def test_items_are_the_stored_images_with_label_and_index(cached, samples):
    image, label, index = cached[3]
    assert image.dtype == torch.uint8 and image.shape == (3, SIZE, SIZE)
    assert np.array_equal(image.permute(1, 2, 0).numpy(), load_resized(samples[3].path, SIZE))
    assert (label, index) == (13, 3)


def test_batch_agrees_with_items_and_with_the_uncached_dataset(cached, samples):
    order = [5, 0, 5, 2]
    expected = torch.stack([cached[i][0] for i in order])
    assert torch.equal(cached.batch(order), expected)
    uncached = ImageDataset([s.path for s in samples], None, SIZE, cache=False)
    assert uncached.cache is None
    assert torch.equal(uncached.batch(order), expected)
    assert uncached[4][1:] == (-1, 4)


def test_labels_must_match_the_samples(samples):
    with pytest.raises(ValueError, match="3 labels for 7 samples"):
        ImageDataset(samples, [0, 1, 2], SIZE, cache=False)


def test_loader_with_batch_size_yields_every_item_once(cached):
    loader = make_loader(cached, batch_size=3)
    assert loader.pin_memory == torch.cuda.is_available() and not loader.persistent_workers
    images, labels, indices = zip(*loader)
    assert torch.equal(torch.cat(indices), torch.arange(7))
    assert torch.equal(torch.cat(labels), torch.arange(10, 17))
    assert torch.equal(torch.cat(images), cached.batch(range(7)))


def test_loader_with_a_batch_sampler_in_a_worker_process(cached):
    loader = make_loader(cached, batch_sampler=[[6, 1], [3]], num_workers=1)
    assert loader.persistent_workers
    batches = [(images, indices.tolist()) for images, _, indices in loader]
    assert [indices for _, indices in batches] == [[6, 1], [3]]
    assert torch.equal(batches[0][0], cached.batch([6, 1]))


def test_loader_needs_exactly_one_way_of_batching(cached):
    with pytest.raises(ValueError):
        make_loader(cached)
    with pytest.raises(ValueError):
        make_loader(cached, batch_sampler=[[0]], batch_size=2)
