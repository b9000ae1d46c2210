"""Enrolment: image files, folders or a split manifest → features in a gallery, one transaction per
batch. Every input is checked (exists, is an image) and hashed before the model is loaded or the
gallery touched, so bad input writes nothing; a killed enrolment leaves whole batches, and running
the same command again adds only what is missing (images are keyed by sha256)."""
from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from PIL import Image, UnidentifiedImageError

from handclip.data.manifests import IMAGE_SUFFIXES
from handclip.errors import UserError
from handclip.fileio import sha256_file
from handclip.gallery.store import Gallery, GalleryRecord, ModelInfo
from handclip.progress import progress as progress_bar

MANIFEST_COLUMNS = ("image", "identity")  # required; `aspect` is read when present, others kept as metadata


@dataclass(frozen=True)
class EnrolItem:
    path: Path
    identity: str | None = None
    aspect: str | None = None
    metadata: dict = field(default_factory=dict)


def collect_images(paths: Sequence[str | os.PathLike]) -> list[EnrolItem]:
    """Files as given, and folders' image files (by suffix, recursively, sorted). A file given by
    name must be an image; a folder must hold at least one."""
    items = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            if not found:
                raise UserError(f"{path}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) in this folder")
            items += [EnrolItem(p) for p in found]
        elif path.is_file():
            items.append(EnrolItem(path))
        else:
            raise UserError(f"{path}: no such file or folder")
    return items


def read_manifest(csv_path: str | os.PathLike, data_root: str | os.PathLike) -> list[EnrolItem]:
    """A split manifest (``image,identity,aspect`` as ``handclip prepare`` writes, image paths relative
    to ``data_root``); any further columns are kept as each image's metadata."""
    csv_path, root = Path(csv_path), Path(data_root)
    try:
        with open(csv_path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
            header = rows and list(rows[0]) or []
    except FileNotFoundError:
        raise UserError(f"{csv_path}: manifest not found") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"{csv_path}: not a readable CSV ({exc})") from None
    if not rows:
        raise UserError(f"{csv_path}: the manifest has no rows")
    missing = [c for c in MANIFEST_COLUMNS if c not in header]
    if missing:
        raise UserError(f"{csv_path}: no column {missing[0]!r} (expected a header with image,identity[,aspect,...])")
    items = []
    for line, row in enumerate(rows, start=2):
        if None in row or not row["image"] or not row["identity"]:
            raise UserError(f"{csv_path}:{line}: expected an image and an identity, and as many fields as the header")
        metadata = {k: v for k, v in row.items() if k not in ("image", "identity", "aspect")}
        items.append(EnrolItem(root / row["image"], row["identity"], row.get("aspect") or None, metadata))
    absent = [item for item in items if not item.path.is_file()]
    if absent:
        raise UserError(f"{csv_path}: {len(absent)} of {len(items)} images not found under {root}, "
                        f"e.g. {absent[0].path} (is --data the dataset root?)")
    return items


def check_image(path: Path) -> None:
    """Pillow can identify the file as an image (reads the header only)."""
    try:
        with Image.open(path) as image:
            image.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        reason = "not an image in a format Pillow reads" if isinstance(exc, UnidentifiedImageError) else str(exc)
        raise UserError(f"cannot read image {path}: {reason}") from None


def model_info(checkpoint: str | os.PathLike, encoder) -> ModelInfo:
    """What a gallery records about the model that made its features."""
    checkpoint = Path(checkpoint).resolve()
    return ModelInfo(
        checkpoint_sha256=sha256_file(checkpoint),
        checkpoint=str(checkpoint),
        feature_dim=int(encoder.dim),
        preprocessing={"image_size": int(encoder.image_size), "mean": [float(v) for v in encoder.transform.mean],
                       "std": [float(v) for v in encoder.transform.std],
                       "resize": "whole photo to a square, bicubic (JPEG draft decoding)", "flip": False},
    )


def enrol(db: str | os.PathLike, checkpoint: str | os.PathLike, items: list[EnrolItem], batch_size: int = 64,
          device: str = "cpu", progress: bool = False) -> dict:
    """``handclip gallery add``: enrol ``items`` into the gallery ``db`` (created if new) with the model
    of ``checkpoint``. Returns ``{"added", "skipped", "images"}`` (skipped: already enrolled, or the
    same file twice in ``items``)."""
    from handclip.engine.checkpoint import load_model

    if not items:
        raise UserError("gallery add: no images given (PATH... or --manifest CSV --data ROOT)")
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: must be at least 1")
    unique: dict[str, EnrolItem] = {}
    for item in progress_bar(items, desc="check and hash", enabled=progress, unit="img"):
        check_image(item.path)
        unique.setdefault(sha256_file(item.path), item)
    encoder = load_model(checkpoint, device=device)
    with Gallery.open_or_create(db, model_info(checkpoint, encoder)) as gallery:
        enrolled = gallery.known(unique)
        todo = [(sha, item) for sha, item in unique.items() if sha not in enrolled]
        added = 0
        starts = range(0, len(todo), batch_size)
        for start in progress_bar(starts, desc=f"enrol {len(todo)} images", enabled=progress, unit="batch"):
            batch = todo[start:start + batch_size]
            features = encoder.encode([item.path for _, item in batch]).numpy()
            added += gallery.add([GalleryRecord(sha, str(item.path.resolve()), row, item.identity, item.aspect,
                                                item.metadata) for (sha, item), row in zip(batch, features)])
        total = gallery.info()["images"]
    return {"added": added, "skipped": len(items) - added, "images": total}
