"""Searching a gallery: its model, its features in memory and an optional calibrator, behind one
object that ``handclip search`` and ``handclip serve`` share, so both give the same results."""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from handclip.errors import UserError
from handclip.fileio import sha256_file
from handclip.gallery.enrol import check_image, collect_images
from handclip.gallery.store import Gallery
from handclip.search.calibration import add_likelihood_ratios, load_calibration
from handclip.search.index import FeatureIndex


@dataclass(frozen=True)
class Query:
    """A questioned image: a name to report, its sha256, and a file path or decoded pixels
    (a ``(S, S, 3)`` uint8 array in the gallery's stored form)."""

    name: str
    sha256: str
    image: Path | np.ndarray


def queries_from_paths(paths) -> list[Query]:
    """Image files and folders' images, each checked to be an image and hashed (nothing is searched
    or written before all are known to be good)."""
    queries = []
    for item in collect_images(paths):
        check_image(item.path)
        queries.append(Query(str(item.path), sha256_file(item.path), item.path))
    return queries


def gallery_index(gallery: Gallery, backend: str = "auto") -> tuple[list[str], FeatureIndex]:
    """The features of ``gallery`` in an index (and each row's sha256); a compact index rescores its
    candidates from the float32 features in the gallery file."""
    sha256s: list[str] = []
    exact_rows = lambda rows: gallery.features_of([sha256s[i] for i in rows])  # noqa: E731
    loaded, index = FeatureIndex.from_chunks(gallery.feature_chunks(), gallery.model.feature_dim, backend, exact_rows)
    sha256s += loaded
    return sha256s, index


class Searcher:
    """A gallery opened for searching. ``checkpoint`` overrides where the gallery's model is read
    from (it must be the same file by sha256); ``calibration`` is a calibration folder. Both paths
    are kept (``.checkpoint``, ``.calibration``) for comparison reports of the same model."""

    def __init__(self, db: str | os.PathLike, checkpoint: str | os.PathLike | None = None,
                 calibration: str | os.PathLike | None = None, device: str = "cpu", backend: str = "auto"):
        self.gallery = Gallery.open(db)
        try:
            self.encoder = self._load_model(checkpoint, device)
            self.calibrator = load_calibration(calibration, self.gallery.model.checkpoint_sha256)
            self.calibration = Path(calibration) if calibration is not None else None
        except BaseException:
            self.gallery.close()
            raise
        self.backend = backend
        self.lock = threading.Lock()  # the server calls from several threads; sqlite and torch state are shared
        self._generation = None
        self.refresh()

    def close(self) -> None:
        self.gallery.close()

    def _load_model(self, checkpoint, device: str):
        from handclip.engine.checkpoint import load_model

        own = self.gallery.model
        path = Path(checkpoint or own.checkpoint)
        if not path.is_file():
            raise UserError(f"{self.gallery.path}: its model {path} is not found; pass --checkpoint with that "
                            f"file (sha256 {own.checkpoint_sha256[:16]}…)")
        self.gallery.require_checkpoint(sha256_file(path))
        self.checkpoint = path
        return load_model(path, device=device)

    @property
    def calibrated(self) -> bool:
        return self.calibrator is not None

    def refresh(self) -> None:
        """Reload the features if images were added or removed since they were loaded."""
        generation = self.gallery.generation
        if generation == self._generation:
            return
        self.sha256s, self.index = gallery_index(self.gallery, self.backend)
        self._generation = generation

    def search(self, queries: list[Query], top: int = 20) -> list[dict]:
        """One entry per query: ``{"query", "sha256", "results": [{"rank", "sha256", "image", "identity",
        "score", "log10_lr"?}]}``, best first; each search is appended to the gallery's audit table."""
        if top < 1:
            raise UserError(f"--top {top}: must be at least 1")
        with self.lock:
            self.refresh()
            if not self.sha256s:
                raise UserError(f"{self.gallery.path}: the gallery is empty (enrol images with `handclip gallery add`)")
            features = self.encoder.encode([q.image for q in queries]).numpy()
            indices, scores = self.index.search(features, top)
            entries = [{"query": q.name, "sha256": q.sha256, "results": self._results(rows, row_scores)}
                       for q, rows, row_scores in zip(queries, indices, scores)]
            for entry in entries:
                self.gallery.append_audit(entry["sha256"], entry["results"])
        return entries

    def _results(self, rows: np.ndarray, scores: np.ndarray) -> list[dict]:
        sha256s = [self.sha256s[i] for i in rows]
        records = self.gallery.records(sha256s)
        if len(records) < len(set(sha256s)):
            raise UserError(f"{self.gallery.path}: images were removed during the search; search again")
        results = [{"rank": rank, "sha256": sha, "image": records[sha]["path"], "identity": records[sha]["identity"],
                    "score": float(score)} for rank, (sha, score) in enumerate(zip(sha256s, scores), start=1)]
        return add_likelihood_ratios(results, self.calibrator)
