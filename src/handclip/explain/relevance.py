"""Which regions of two images raise their similarity: gradient × activation.

The score is the cosine similarity of the two images' final embeddings (the model's test feature,
after its head and necks, exactly what ``Encoder.encode`` returns). Its gradient is taken with
respect to one activation of each image and multiplied with it, channel by channel, then summed
over channels: a first-order estimate of how much each position contributes to the score. Positions
whose contribution is positive are kept; each map is scaled to a maximum of 1.

The activation is the last one that every head reads:
- ViT: the tokens entering the last transformer block. The class token (``proj``/``pre_proj``)
  gathers the patches only through that block's attention; the tokens after it (the backbone's
  ``map``) feed the PCB and attention heads but not the class token, so a gradient taken there
  would be zero for a global head.
- ResNet: the last stage's feature map (the backbone's ``map``), which the attention pool and
  every head read.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from handclip.engine.encoder import Encoder
from handclip.models.backbones import Backbone

# The class token precedes the patch tokens (open_clip ViTs have exactly one prefix token).
VIT_PREFIX_TOKENS = 1
# The hooks sit on the shared model while an explanation runs: one explanation at a time (a web
# server's threads), and encode() calls meanwhile pass untouched (they run without gradients).
_HOOK_LOCK = threading.Lock()


def explain_pair(encoder: Encoder, image_a, image_b) -> dict:
    """Similarity of two images (paths or PIL images) and where it comes from.

    Returns ``{"score": float, "heatmap_a": ndarray, "heatmap_b": ndarray}``: ``score`` is the cosine
    similarity of the two L2-normalised features exactly as ``encoder.encode`` computes them (bf16 on
    a GPU; the maps always come from float32 gradients); each heatmap is float32 ``(H, W)`` in [0, 1]
    at the pixel size of its own image (the model sees the whole photo squeezed to a square, so the
    map is stretched back over the whole photo).
    A path that is not a readable image raises :class:`~handclip.errors.UserError` naming it.
    """
    pixels = encoder.to_uint8([image_a, image_b])
    _, grids = relevance_grids(encoder, pixels)
    features = encoder.embed_uint8(pixels)
    score = float(features[0] @ features[1])
    heatmaps = [upsample(grid, _pixel_size(image)) for grid, image in zip(grids, (image_a, image_b))]
    return {"score": score, "heatmap_a": heatmaps[0], "heatmap_b": heatmaps[1]}


def relevance_grids(encoder: Encoder, pixels: torch.Tensor) -> tuple[float, torch.Tensor]:
    """uint8 pair ``(2, 3, H, W)`` → (cosine similarity, relevance ``(2, h, w)`` on the model's
    patch / feature-map grid, each map in [0, 1])."""
    model = encoder.model
    with _HOOK_LOCK, torch.enable_grad(), _explained_activation(model.backbone) as activations:
        embeddings = model(encoder.transform(pixels.to(encoder.device)))["embedding"].float()
        features = F.normalize(embeddings, dim=1)
        score = (features[0] * features[1]).sum()
        (activation,) = activations
        (gradient,) = torch.autograd.grad(score, activation)  # no .grad left on the model's parameters
    contribution = _to_grid(model.backbone, activation * gradient).clamp(min=0)
    peak = contribution.amax(dim=(1, 2), keepdim=True)
    grids = torch.where(peak > 0, contribution / peak.clamp(min=torch.finfo(peak.dtype).tiny), 0.0)
    return float(score.detach()), grids.detach().cpu()


@contextlib.contextmanager
def _explained_activation(backbone: Backbone) -> Iterator[list[torch.Tensor]]:
    """While open, the forward pass cuts its graph at the explained activation and replaces it by
    a leaf tensor that collects the gradient (so frozen layers or not, the gradient reaches it)."""
    captured: list[torch.Tensor] = []

    def leaf_of(tensor: torch.Tensor) -> torch.Tensor:
        if not torch.is_grad_enabled():  # another thread's encode(); grad mode is per thread
            return tensor
        leaf = tensor.detach().requires_grad_(True)
        captured.append(leaf)
        return leaf

    if backbone.kind == "vit":
        handle = backbone.visual.transformer.resblocks[-1].register_forward_pre_hook(
            lambda module, args: (leaf_of(args[0]), *args[1:]))
    else:
        handle = backbone.visual.layer4.register_forward_hook(lambda module, args, output: leaf_of(output))
    try:
        yield captured
    finally:
        handle.remove()


def _to_grid(backbone: Backbone, products: torch.Tensor) -> torch.Tensor:
    """Gradient × activation summed over channels, as ``(B, h, w)``."""
    if backbone.kind == "rn":
        return products.sum(dim=1)
    if not backbone.visual.transformer.batch_first:
        products = products.transpose(0, 1)  # (tokens, B, W) → (B, tokens, W)
    per_token = products.sum(dim=2)[:, VIT_PREFIX_TOKENS:]
    return per_token.reshape(len(per_token), *backbone.map_size)


def upsample(grid: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """A ``(h, w)`` map → float32 ``(height, width)`` for ``size`` = (width, height), bilinear."""
    width, height = size
    resized = F.interpolate(grid[None, None].float(), size=(height, width), mode="bilinear", align_corners=False)
    return resized[0, 0].clamp(0, 1).numpy()


def _pixel_size(image) -> tuple[int, int]:
    if isinstance(image, Image.Image):
        return image.size
    with Image.open(image) as opened:  # already decoded once by encoder.to_uint8, so readable
        return opened.size

