"""Ranked-result grids: per row, the query and its top-k gallery thumbnails, each framed green
(true match) or red (wrong), with rank and score, label and file name underneath."""
from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Hashable, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from handclip.fileio import atomic_write_bytes

GREEN = (0, 160, 60)
RED = (215, 30, 30)
QUERY_FRAME = (40, 90, 200)
BORDER = 5            # frame width around each thumbnail
PAD = 8               # space between cells and around the picture
QUERY_GAP = 16        # extra space between the query and its gallery
LINE_HEIGHT = 14
CAPTION_LINES = 3
BACKGROUND = (255, 255, 255)
THUMB_BACKGROUND = (235, 235, 235)
TEXT = (20, 20, 20)


@dataclass
class RankedRow:
    """One query and its ranked gallery images, as drawn in one grid row."""

    query_path: str | os.PathLike
    query_label: str
    gallery_paths: Sequence[str | os.PathLike]
    gallery_labels: Sequence[str]
    scores: Sequence[float]
    is_match: Sequence[bool]


def ranked_row(dist, query_index: int, query_paths: Sequence, query_ids: Sequence[Hashable],
               gallery_paths: Sequence, gallery_ids: Sequence[Hashable], top_k: int = 10) -> RankedRow:
    """The row of query ``query_index``: its ``top_k`` nearest gallery images by ``dist`` (Q, G),
    nearest first (stable for ties), scored by their distance."""
    row = np.asarray(dist)[query_index]
    nearest = np.argsort(row, kind="stable")[:top_k]
    query_id = query_ids[query_index]
    return RankedRow(query_path=query_paths[query_index], query_label=str(query_id),
                     gallery_paths=[gallery_paths[j] for j in nearest],
                     gallery_labels=[str(gallery_ids[j]) for j in nearest],
                     scores=[float(row[j]) for j in nearest],
                     is_match=[gallery_ids[j] == query_id for j in nearest])


def draw_ranked_grids(rows: Sequence[RankedRow], path, thumb: int = 128) -> Path:
    """Rows of query + ranked gallery thumbnails as one PNG at ``path`` (written atomically).

    Every cell is a ``thumb``-pixel square thumbnail (letterboxed) in a ``BORDER``-pixel frame:
    blue for the query, ``GREEN`` for a true match, ``RED`` otherwise; under it ``#rank score``,
    the label and the file name. Width = PAD + QUERY_GAP + (1 + k) × (thumb + 2·BORDER + PAD)
    for the longest row's k; an image that cannot be read is drawn as a grey "unreadable" tile.
    """
    if not rows:
        raise ValueError("draw_ranked_grids needs at least one row")
    for row in rows:
        if not len(row.gallery_paths) == len(row.gallery_labels) == len(row.scores) == len(row.is_match):
            raise ValueError(f"row of {row.query_path}: gallery paths, labels, scores and is_match differ in length")
    font = ImageFont.load_default(size=11)
    cell_w, cell_h = thumb + 2 * BORDER, thumb + 2 * BORDER + CAPTION_LINES * LINE_HEIGHT
    columns = 1 + max(len(row.gallery_paths) for row in rows)
    canvas = Image.new("RGB", (PAD + QUERY_GAP + columns * (cell_w + PAD), PAD + len(rows) * (cell_h + PAD)),
                       BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for r, row in enumerate(rows):
        top = PAD + r * (cell_h + PAD)
        _draw_cell(canvas, draw, font, (PAD, top), thumb, row.query_path, QUERY_FRAME,
                   ["query", row.query_label, Path(row.query_path).name])
        for c, (image, label, score, match) in enumerate(
                zip(row.gallery_paths, row.gallery_labels, row.scores, row.is_match), start=1):
            left = PAD + QUERY_GAP + c * (cell_w + PAD)
            _draw_cell(canvas, draw, font, (left, top), thumb, image, GREEN if match else RED,
                       [f"#{c}  {score:.3f}", label, Path(image).name])
    buffer = io.BytesIO()
    canvas.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def _draw_cell(canvas: Image.Image, draw: ImageDraw.ImageDraw, font, origin: tuple[int, int], thumb: int,
               image_path, frame: tuple[int, int, int], captions: list[str]) -> None:
    left, top = origin
    size = thumb + 2 * BORDER
    draw.rectangle((left, top, left + size - 1, top + size - 1), fill=frame)
    canvas.paste(_thumbnail(image_path, thumb, font), (left + BORDER, top + BORDER))
    for line, text in enumerate(captions):
        draw.text((left, top + size + line * LINE_HEIGHT + 1), _fit(text, font, size), fill=TEXT, font=font)


def _thumbnail(image_path, thumb: int, font) -> Image.Image:
    tile = Image.new("RGB", (thumb, thumb), THUMB_BACKGROUND)
    try:
        with Image.open(image_path) as image:
            image.draft("RGB", (thumb, thumb))  # JPEG: decode at reduced size, much faster
            picture = ImageOps.contain(image.convert("RGB"), (thumb, thumb))
    except OSError:
        ImageDraw.Draw(tile).text((4, thumb // 2 - 6), "unreadable", fill=TEXT, font=font)
        return tile
    tile.paste(picture, ((thumb - picture.width) // 2, (thumb - picture.height) // 2))
    return tile


def _fit(text: str, font, width: int) -> str:
    """``text`` cut from the left (the end of a file name says most) to fit ``width`` pixels."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength("…" + text) > width:
        text = text[1:]
    return "…" + text
