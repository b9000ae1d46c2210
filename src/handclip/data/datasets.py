"""Datasets of stored uint8 images and the trainer's batch loader.

With the cache (the default) a whole batch is one fancy-index read of the memory-mapped array:
``dataset.batch(indices)`` needs no DataLoader workers and keeps a GPU fed. Without it every image
is decoded (JPEG draft mode) each time it is read.
"""
from __future__ import annotations

import collections
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from handclip.data.cache import ImageCache
from handclip.data.images import load_resized


class ImageDataset(Dataset):
    """Items ``(uint8 tensor (3, size, size), index)``.

    ``samples``: manifest samples (anything with ``.path``) or plain image paths.
    """

    def __init__(self, samples: Sequence, size: int, cache: bool = True,
                 cache_dir: str | os.PathLike | None = None, progress: bool = False):
        self.paths = [Path(getattr(s, "path", s)) for s in samples]
        self.size = size
        self.cache = ImageCache.open_or_build(self.paths, size, cache_dir, progress) if cache else None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.batch([index])[0], index

    def batch(self, indices: Sequence[int], pin_memory: bool = False) -> torch.Tensor:
        """uint8 (B, 3, size, size) of ``indices`` in that order (channels-last in memory).

        ``pin_memory``: in page-locked memory (CUDA only), which a non-blocking copy moves to
        the GPU while it computes; the cache is read straight into it, with no extra copy.
        """
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"batch indices must lie in [0, {len(self)})")
        pixels = torch.empty((len(indices), self.size, self.size, 3), dtype=torch.uint8, pin_memory=pin_memory)
        if self.cache is not None:
            # Straight into ``pixels`` without the GIL; mode "clip" skips the temporary copy that
            # numpy's default bounds checking makes (the indices were checked above).
            np.take(self.cache.array, indices, axis=0, out=pixels.numpy(), mode="clip")
        else:
            for row, i in enumerate(indices):
                pixels[row] = torch.from_numpy(load_resized(self.paths[i], self.size))
        return pixels.permute(0, 3, 1, 2)


class BatchLoader:
    """The uint8 batches of a batch sampler, read ahead of the consumer: iterating yields
    ``(indices, images)`` with images (B, 3, size, size) uint8 on the CPU.

    Cached dataset: a background thread reads the next ``depth`` batches (one memmap read each,
    into pinned memory with ``pin_memory``) while the caller trains on the current one.
    Without the cache: DataLoader worker processes (``num_workers``, kept alive between epochs)
    decode the JPEGs.
    ``batch_sampler`` is iterated afresh on each pass (call its ``set_epoch`` before).
    """

    def __init__(self, dataset: ImageDataset, batch_sampler: Iterable[Sequence[int]], num_workers: int = 0,
                 pin_memory: bool = False, depth: int = 2):
        self.dataset, self.batch_sampler = dataset, batch_sampler
        self.pin_memory, self.depth = pin_memory, depth
        self.loader = None if dataset.cache is not None else DataLoader(
            dataset, batch_sampler=batch_sampler, num_workers=num_workers, pin_memory=pin_memory,
            persistent_workers=num_workers > 0)

    def __iter__(self) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        if self.loader is not None:
            for images, indices in self.loader:
                yield indices.numpy(), images
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="handclip-batches") as reader:
            pending = collections.deque()
            for indices in self.batch_sampler:
                indices = np.asarray(indices, dtype=np.int64)
                pending.append((indices, reader.submit(self.dataset.batch, indices, self.pin_memory)))
                if len(pending) > self.depth:
                    indices, images = pending.popleft()
                    yield indices, images.result()
            while pending:
                indices, images = pending.popleft()
                yield indices, images.result()
