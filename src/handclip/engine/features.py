"""Feature extraction over datasets: each image is decoded (or read from the cache) and encoded once."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from handclip.data.datasets import BatchLoader
from handclip.engine.encoder import Encoder
from handclip.progress import progress as progress_bar


def extract_features(encoder: Encoder, dataset, indices: Sequence[int] | None = None, batch_size: int = 128,
                     flip: bool = False, progress: bool = False, desc: str = "encode") -> torch.Tensor:
    """Features (N, D) of ``dataset`` items ``indices`` (default: all), in that order."""
    indices = np.arange(len(dataset)) if indices is None else np.asarray(indices)
    batches = [indices[start:start + batch_size] for start in range(0, len(indices), batch_size)]
    # read ahead in a thread (pinned memory on a GPU) while the model encodes the current batch
    loader = BatchLoader(dataset, batches, pin_memory=encoder.device.type == "cuda")
    chunks = []
    for _, batch in progress_bar(loader, desc=desc, total=len(batches), enabled=progress, nested=True, unit="batch"):
        chunks.append(encoder.embed_uint8(batch, flip=flip))
    if not chunks:
        return torch.empty(0, encoder.dim)
    return torch.cat(chunks)
