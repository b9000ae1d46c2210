"""Drawing a relevance map over its image."""
from __future__ import annotations

import numpy as np
from matplotlib import colormaps
from PIL import Image

COLORMAP = "jet"


def overlay(image: Image.Image, heatmap: np.ndarray, alpha: float = 0.6) -> Image.Image:
    """``image`` with ``heatmap`` (values in [0, 1], any (h, w): resized to the image) drawn over it.

    Each pixel is tinted in proportion to its heat, so regions that do not raise the similarity
    keep their own colours and stay recognisable."""
    base = image.convert("RGB")
    heat = np.clip(np.asarray(heatmap, dtype=np.float32), 0.0, 1.0)
    if heat.shape != (base.height, base.width):
        heat = np.asarray(Image.fromarray(heat, mode="F").resize(base.size, Image.Resampling.BILINEAR))
        heat = np.clip(heat, 0.0, 1.0)
    colours = colormaps[COLORMAP](heat)[..., :3]
    weight = alpha * heat[..., None]
    blended = (1 - weight) * (np.asarray(base, dtype=np.float32) / 255) + weight * colours
    return Image.fromarray(np.round(blended * 255).astype(np.uint8), mode="RGB")
