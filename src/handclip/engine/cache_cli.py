"""``handclip cache build``: decode the images of a splits folder once, before training and evaluation.

``train`` and ``evaluate`` build the cache on demand, so this command only moves the decoding
(minutes for the 11k photos on a laptop) to a moment of the user's choosing, e.g. before a
multi-GPU run. A cache holds one ordered image list at one size, so this builds, per aspect,
the lists the other commands read:

- train + val at ``size``: what ``handclip train`` on that aspect reads with a model input of
  ``size × 7/8`` (the trainer stores images at 8/7 of the input: 256 for 224);
- train + val at that model input size: what its validation reads (the pixels evaluation sees);
- the test images (every query_i and gallery_i, then the gallery_i_all ones where present) at
  that model input size: what ``handclip evaluate --aspect A`` (``--gallery-all``) reads.
"""
from __future__ import annotations

import time
from pathlib import Path

from handclip.data.cache import ImageCache, cache_key, default_cache_dir
from handclip.data.manifests import aspects_with_splits
from handclip.data.training import load_training_data
from handclip.engine.evaluation import same_aspect_protocol
from handclip.engine.state import input_size_of_stored
from handclip.errors import UserError
from handclip.hand_datasets import ALL_ASPECTS


def build_cache_for_splits(data_root, splits, aspects: list[str] | None = None, size: int = 256,
                           quiet: bool = False) -> list[dict]:
    """Build (or find) every cache of ``aspects`` (default: each aspect of ``splits``); prints
    and returns one row per image list."""
    if size < 8:
        raise UserError(f"--size {size}: must be at least 8 pixels")
    aspects = aspects or aspects_with_splits(splits)
    if not aspects:
        raise UserError(f"{splits}: no aspect has splits here (run `handclip prepare` first)")
    unknown = [a for a in aspects if a not in ALL_ASPECTS]
    if unknown:
        raise UserError(f"--aspect {unknown[0]}: unknown aspect (known: {', '.join(ALL_ASPECTS)})")
    rows = []
    for aspect in aspects:
        for name, paths, side in image_lists(data_root, splits, aspect, size):
            rows.append({"aspect": aspect, "images": name, **_build(paths, side, quiet)})
    print(format_rows(rows))
    return rows


def image_lists(data_root, splits, aspect: str, size: int) -> list[tuple[str, list[Path], int]]:
    """(name, ordered image paths, stored side) of each cache that train and evaluate read."""
    image_size = input_size_of_stored(size)
    training = [s.path for s in load_training_data(data_root, splits, [aspect]).samples]
    lists = [("train+val", training, size), ("train+val, validation", training, image_size),
             ("test", _paths(same_aspect_protocol(data_root, splits, aspect, None, gallery_all=False)), image_size)]
    try:
        gallery_all = same_aspect_protocol(data_root, splits, aspect, None, gallery_all=True)
    except UserError:  # HD and older folder trees have no gallery_i_all
        return lists
    return lists + [("test, gallery-all", _paths(gallery_all), image_size)]


def _paths(protocol) -> list[Path]:
    return [s.path for s in protocol.images()]


def _build(paths: list[Path], size: int, quiet: bool) -> dict:
    existed = (default_cache_dir() / f"{cache_key(paths, size)}.json").exists()
    started = time.perf_counter()
    cache = ImageCache.open_or_build(paths, size, progress=not quiet)
    return {"count": len(paths), "size": size, "status": "found" if existed else "built",
            "seconds": time.perf_counter() - started, "file": str(cache.file)}


def format_rows(rows: list[dict]) -> str:
    lines = [f"{'aspect':<10}{'images':<20}{'count':>7}{'size':>6}  {'status':<7}{'seconds':>8}"]
    lines += [f"{r['aspect']:<10}{r['images']:<20}{r['count']:>7}{r['size']:>6}  {r['status']:<7}{r['seconds']:>8.1f}"
              for r in rows]
    lines.append(f"cache folder: {default_cache_dir()}")
    return "\n".join(lines)
