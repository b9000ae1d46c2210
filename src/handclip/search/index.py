"""Exact cosine ranking of a gallery's features held in memory.

Up to :data:`FLOAT16_ABOVE` rows the features are one float32 matrix and the ranking is evaluate's
own: distance ``1 - q·g`` of the L2-normalised features (as :func:`handclip.metrics.pairwise_distance`
computes it), stable sort, so ties keep enrolment order. Above that the matrix is float16 (half the
memory and memory traffic; a 1M × 512 gallery is 1 GB): a float16 pass picks the candidates, which
are then scored in float32 from the same rows, so rounding never reorders them. Beyond
:data:`FAISS_ABOVE` rows, faiss-cpu (where installed) holds the float16 codes and scores them
exhaustively in float32 with its SIMD kernels.
"""
from __future__ import annotations

import contextlib
import sys

import numpy as np
import torch

FLOAT16_ABOVE = 100_000
FAISS_ABOVE = 1_000_000
BACKENDS = ("auto", "float32", "float16", "faiss")
# Bound on |float16 score - float32 score| for unit vectors: the query's and the scores' rounding to
# float16 (2^-11 relative each) plus float16 accumulation; candidates within it of the k-th are rescored.
FLOAT16_MARGIN = 8e-3


def faiss_available() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


def choose_backend(rows: int, backend: str = "auto") -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown search backend {backend!r} (expected one of {', '.join(BACKENDS)})")
    if backend != "auto":
        return backend
    if rows > FAISS_ABOVE and faiss_available():
        return "faiss"
    return "float16" if rows > FLOAT16_ABOVE else "float32"


class FeatureIndex:
    """Gallery features (N, D) that answer ``search(queries, top)`` with exact cosine rankings.

    Build with :meth:`allocate` and :meth:`fill` (chunk by chunk, as the gallery streams them) or
    :meth:`from_matrix`."""

    def __init__(self, rows: int, dim: int, backend: str = "auto"):
        self.backend = choose_backend(rows, backend)
        self.rows, self.dim = rows, dim
        self._filled = 0
        if self.backend == "faiss":
            import faiss

            self._faiss = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_fp16, faiss.METRIC_INNER_PRODUCT)
        else:
            dtype = torch.float16 if self.backend == "float16" else torch.float32
            self._matrix = torch.empty((rows, dim), dtype=dtype)

    @classmethod
    def from_chunks(cls, chunks, dim: int, backend: str = "auto") -> tuple[list[str], "FeatureIndex"]:
        """The index of ``(total, sha256s, features)`` chunks as :meth:`Gallery.feature_chunks` yields
        them, and the sha256 of each row."""
        sha256s, index = [], cls(0, dim, backend)
        for total, chunk_sha256s, block in chunks:
            if not sha256s:
                index = cls(total, dim, backend)
            index.fill(block)
            sha256s += chunk_sha256s
        return sha256s, index

    @classmethod
    def from_matrix(cls, features: np.ndarray, backend: str = "auto") -> "FeatureIndex":
        index = cls(len(features), features.shape[1], backend)
        index.fill(features)
        return index

    def fill(self, block: np.ndarray) -> None:
        """Append the next rows (float32, any norm: they are L2-normalised here as evaluate does)."""
        block = torch.nn.functional.normalize(torch.tensor(block, dtype=torch.float32), dim=1)
        start, self._filled = self._filled, self._filled + len(block)
        if self.backend == "faiss":
            self._faiss.add(block.numpy())
        else:
            self._matrix[start:self._filled] = block

    @property
    def nbytes(self) -> int:
        if self.backend == "faiss":
            return self.rows * self.dim * 2
        return self._matrix.numel() * self._matrix.element_size()

    def search(self, queries: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
        """For each query row: the gallery rows of the ``top`` best matches, best first, and their
        cosine similarities, as ``(indices (Q, k), scores (Q, k))`` with k = min(top, N)."""
        top = min(int(top), self._filled)
        queries = torch.nn.functional.normalize(torch.tensor(queries, dtype=torch.float32), dim=1)
        if top == 0:
            return np.empty((len(queries), 0), dtype=np.int64), np.empty((len(queries), 0), dtype=np.float32)
        with _one_thread():
            if self.backend == "faiss":
                scores, indices = self._faiss.search(queries.numpy(), top)
                return indices.astype(np.int64), scores
            ranked = [self._rank_one(query, top) for query in queries]
        return np.stack([r[0] for r in ranked]), np.stack([r[1] for r in ranked])

    def _rank_one(self, query: torch.Tensor, top: int) -> tuple[np.ndarray, np.ndarray]:
        matrix = self._matrix[:self._filled]
        if self.backend == "float32":
            candidates, dist = None, (1.0 - matrix @ query).numpy()  # evaluate's distance, see pairwise_distance
        else:
            coarse = torch.mv(matrix, query.half()).float()
            kth = torch.topk(coarse, top).values[-1]
            candidates = torch.nonzero(coarse >= kth - FLOAT16_MARGIN).flatten()
            dist = (1.0 - matrix[candidates].float() @ query).numpy()
        order = _smallest_stable(dist, top)
        rows = order if candidates is None else candidates.numpy()[order]
        return rows, (1.0 - dist[order]).astype(np.float32)


@contextlib.contextmanager
def _one_thread():
    """A query's scan is memory-bound: a second OpenMP thread gains little and its synchronisation
    costs much when the cores are busy (top-k over 200k scores took 22 ms on 2 threads, 0.5 ms on one,
    on the loaded 2-core development machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    faiss = sys.modules.get("faiss")
    if faiss is not None:
        faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        if faiss is not None:
            faiss.omp_set_num_threads(threads)


def _smallest_stable(dist: np.ndarray, k: int) -> np.ndarray:
    """The first ``k`` of ``np.argsort(dist, kind="stable")`` without sorting everything: ties at the
    k-th value are all kept, then ordered by distance and position."""
    if k >= len(dist):
        return np.argsort(dist, kind="stable")
    kth = np.partition(dist, k - 1)[k - 1]
    candidates = np.flatnonzero(dist <= kth)
    return candidates[np.argsort(dist[candidates], kind="stable")][:k]
