"""Feature extraction over datasets: each image is decoded (or read from the cache) and encoded once."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

from handclip.engine.encoder import Encoder


def extract_features(encoder: Encoder, dataset, indices: Sequence[int] | None = None, batch_size: int = 128,
                     flip: bool = False, progress: bool = False, desc: str = "encode") -> torch.Tensor:
    """Features (N, D) of ``dataset`` items ``indices`` (default: all), in that order."""
    indices = np.arange(len(dataset)) if indices is None else np.asarray(indices)
    chunks = []
    starts = range(0, len(indices), batch_size)
    for start in tqdm(starts, desc=desc, disable=not progress, leave=False, unit="batch"):
        batch = dataset.batch(indices[start:start + batch_size])
        chunks.append(encoder.embed_uint8(batch, flip=flip))
    if not chunks:
        return torch.empty(0, encoder.dim)
    return torch.cat(chunks)
