"""Turn images into L2-normalised re-ID features with a trained (or zero-shot) model.

    encoder = handclip.load_model("run/checkpoints/best.pt", device="cuda")
    features = encoder.encode(["a.jpg", "b.jpg"])          # (2, D) torch.Tensor, rows of norm 1
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from handclip.data.images import RESAMPLE, load_resized
from handclip.data.transforms import EvalTransform


def resolve_device(name: str = "auto") -> torch.device:
    if name in ("auto", None):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast(device: torch.device, amp: str = "auto"):
    """bf16 autocast on GPU (``amp`` auto or bf16); a no-op context on CPU or with amp off."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


class Encoder:
    """A model plus its evaluation preprocessing; ``encode`` embeds paths, PIL images or uint8 batches.

    ``trained_subjects``: dataset → subject ids the model was trained on ({} for a zero-shot
    model, None when unknown), for evaluation's overlap check."""

    def __init__(self, model: torch.nn.Module, device: str | torch.device = "cpu", amp: str = "auto",
                 trained_subjects: dict[str, list[str]] | None = None):
        self.device = resolve_device(str(device))
        self.model = model.to(self.device)  # its train/eval mode stays the caller's
        self.amp = amp
        self.trained_subjects = trained_subjects
        self.image_size = model.image_size
        self.transform = EvalTransform(model.image_size, model.mean, model.std)

    @property
    def dim(self) -> int:
        return self.model.embedding_dim

    @torch.no_grad()
    def embed_uint8(self, batch: torch.Tensor, flip: bool = False) -> torch.Tensor:
        """uint8 (B, 3, H, W) → L2-normalised float32 features (B, D) on CPU.

        With ``flip`` the features of the mirrored images are added before normalising
        (the MBA-Net test-time trick)."""
        batch = batch.to(self.device, non_blocking=True)
        with self.evaluating():
            features = self._forward(self.transform(batch))
            if flip:
                features = features + self._forward(self.transform(batch, flip=True))
        return F.normalize(features.float(), dim=1).cpu()

    @contextlib.contextmanager
    def evaluating(self):
        """The model in eval mode (BatchNorm statistics, no dropout) for the block, then back in
        the mode it was in: encoding mid-training leaves the training mode alone."""
        training = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(training)

    def _forward(self, images: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.amp):
            return self.model(images)["embedding"]

    def encode(self, images: Sequence | torch.Tensor, batch_size: int = 64, flip: bool = False) -> torch.Tensor:
        """Embed image paths, PIL images, HWC uint8 arrays, or a uint8 (N, 3, H, W) tensor."""
        if isinstance(images, torch.Tensor):
            chunks = [self.embed_uint8(images[i:i + batch_size], flip) for i in range(0, len(images), batch_size)]
        else:
            images = list(images)
            chunks = [self.embed_uint8(self.to_uint8(images[i:i + batch_size]), flip)
                      for i in range(0, len(images), batch_size)]
        if not chunks:
            return torch.empty(0, self.dim)
        return torch.cat(chunks)

    def to_uint8(self, items: Iterable) -> torch.Tensor:
        """Paths, PIL images or HWC uint8 arrays → one uint8 batch (N, 3, H, W) for ``embed_uint8``.

        Paths are decoded exactly as the image cache stores them, so ``encode(paths)`` matches
        the features of evaluation pixel for pixel."""
        size = (self.image_size, self.image_size)
        arrays = []
        for item in items:
            if isinstance(item, (str, Path)):
                item = load_resized(item, self.image_size)
            elif isinstance(item, Image.Image):
                item = np.asarray(item.convert("RGB").resize(size, RESAMPLE))
            arrays.append(torch.from_numpy(np.array(item, dtype=np.uint8)).permute(2, 0, 1))
        if len({tuple(a.shape) for a in arrays}) > 1:
            arrays = [F.interpolate(a[None].float(), size=size, mode="bilinear").round().byte()[0] for a in arrays]
        return torch.stack(arrays)
