"""Reading hand photos: RGB decoding with JPEG draft mode, and the stored square geometry.

Geometry: an image is stored as a ``size × size`` square made by resizing the whole photo, so the
4:3 11k photos (1600×1200) are squeezed horizontally rather than cropped. The hands fill the frame
and a centre crop would cut fingers off; the published CLIP-HandID and MBA-Net pipelines resize to
a square the same way, so their recipes carry over unchanged.
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image, UnidentifiedImageError

from handclip.errors import UserError

# CLIP's own preprocessing resizes with bicubic interpolation.
RESAMPLE = Image.Resampling.BICUBIC


def read_image(path: str | os.PathLike, draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode ``path`` to an RGB image.

    With ``draft_size`` (w, h) a JPEG is decoded at the smallest DCT scale (1/2, 1/4, 1/8) that is
    still at least that large, which makes decoding a 1600×1200 photo about 1.6× faster.
    Raises :class:`UserError` naming the file if it is missing, truncated or not an image.
    """
    try:
        with Image.open(path) as image:
            if draft_size is not None:
                image.draft("RGB", tuple(draft_size))  # a no-op for formats other than JPEG
            return image.convert("RGB")
    except UnidentifiedImageError:
        reason = "not an image in a format Pillow reads"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
    raise UserError(f"cannot read image {path}: {reason}")


def load_resized(path: str | os.PathLike, size: int) -> np.ndarray:
    """The stored form of an image: the whole photo resized to a ``(size, size, 3)`` uint8 square."""
    image = read_image(path, draft_size=(size, size))
    return np.array(image.resize((size, size), RESAMPLE), dtype=np.uint8)  # writable, unlike np.asarray

