"""Datasets of stored uint8 images, and a DataLoader with sensible defaults.

With the cache (the default) a whole batch is one fancy-index read of the memory-mapped array:
``dataset.batch(indices)`` needs no DataLoader workers and keeps a GPU fed. Without it every image
is decoded (JPEG draft mode) each time it is read.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from handclip.data.cache import ImageCache
from handclip.data.images import load_resized


class ImageDataset(Dataset):
    """Items ``(uint8 tensor (3, size, size), label, index)``; label is -1 without ``labels``.

    ``samples``: manifest samples (anything with ``.path``) or plain image paths.
    """

    def __init__(self, samples: Sequence, labels: Sequence[int] | None, size: int, cache: bool = True,
                 cache_dir: str | os.PathLike | None = None, progress: bool = False):
        self.paths = [Path(getattr(s, "path", s)) for s in samples]
        if labels is not None and len(labels) != len(self.paths):
            raise ValueError(f"{len(labels)} labels for {len(self.paths)} samples")
        self.labels = list(labels) if labels is not None else [-1] * len(self.paths)
        self.size = size
        self.cache = ImageCache.open_or_build(self.paths, size, cache_dir, progress) if cache else None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        return self.batch([index])[0], self.labels[index], index

    def batch(self, indices: Sequence[int]) -> torch.Tensor:
        """uint8 (B, 3, size, size) of ``indices`` in that order (channels-last in memory)."""
        indices = np.asarray(indices, dtype=np.int64)
        if self.cache is not None:
            pixels = self.cache.array[indices]
        else:
            pixels = np.stack([load_resized(self.paths[i], self.size) for i in indices])
        return torch.from_numpy(pixels).permute(0, 3, 1, 2)


def make_loader(dataset: Dataset, batch_sampler=None, batch_size: int | None = None, shuffle: bool = False,
                num_workers: int = 0, pin_memory: bool | None = None,
                persistent_workers: bool | None = None) -> DataLoader:
    """A DataLoader over ``dataset`` with either a ``batch_sampler`` or a ``batch_size``.

    Defaults: pinned memory when CUDA is available (faster, asynchronous host-to-GPU copies);
    workers kept alive between epochs when there are any (no restart cost each epoch).
    """
    if (batch_sampler is None) == (batch_size is None):
        raise ValueError("give exactly one of batch_sampler and batch_size")
    batching = {"batch_sampler": batch_sampler} if batch_sampler is not None else \
        {"batch_size": batch_size, "shuffle": shuffle}
    return DataLoader(
        dataset, num_workers=num_workers,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        persistent_workers=num_workers > 0 if persistent_workers is None else persistent_workers,
        **batching,
    )
