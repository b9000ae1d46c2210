"""Exact cosine ranking of a gallery's features held in memory.

Up to :data:`FLOAT16_ABOVE` rows the features are one float32 matrix and the ranking is evaluate's
own: distance ``1 - q·g`` of the L2-normalised features (as :func:`handclip.metrics.pairwise_distance`
computes it), stable sort, so ties keep enrolment order. Above that the matrix held in memory is a
compact copy (a 1M × 512 float32 gallery would be 2 GB, and reading it all per query is the cost of a
search): int8 codes scanned by faiss-cpu's SIMD kernel where faiss is installed (``int8``: 0.5 GB at
1M × 512), else float16 scanned by torch (``float16``: 1 GB). The scan is a first stage whose error on
each row has a proven bound; every row whose score could still reach the top ``k`` is then rescored
from its stored float32 features (``exact_rows``, the gallery file for ``Searcher``), so the ranking
and scores are still evaluate's, exactly.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Callable

import numpy as np
import torch

FLOAT16_ABOVE = 100_000
BACKENDS = ("auto", "float32", "float16", "int8")
# |float16 scan score - exact score| for unit vectors: the gallery's and the query's rounding to
# float16 (2^-11 relative each) and the score's rounding to float16 (half an ulp, 2^-12, doubled);
# torch's float16 matrix-vector product accumulates in float32 (tests/test_search.py checks the bound).
FLOAT16_BOUND = 3 * 2.0 ** -11
# int8 codes use this much more than the first rows' range of each dimension, so later rows are
# rarely clipped (a clipped row is correct too, only rescored by every search).
INT8_HEADROOM = 1.25
INT8_SHORTLIST = 8192  # rows the int8 scan keeps per query (at least 4 × top); grown ×8 when too few


def float32_slack(dim: int) -> float:
    """Bound on float32 rounding in a ``dim``-term dot product of (near-)unit vectors (dim · 2^-24
    for a scan, 2^-24 for the exact score), with more than a factor two to spare."""
    return dim * 2.0 ** -22


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
    if rows <= FLOAT16_ABOVE:
        return "float32"
    return "int8" if faiss_available() else "float16"


class FeatureIndex:
    """Gallery features (N, D) that answer ``search(queries, top)`` with exact cosine rankings.

    Build with the constructor and :meth:`fill` (chunk by chunk, as the gallery streams them) or
    :meth:`from_chunks` / :meth:`from_matrix`. The ``float16`` and ``int8`` backends need
    ``exact_rows(rows) -> (len(rows), D) float32``: the features given to :meth:`fill` for those row
    numbers, read back to rescore the candidates of a search."""

    def __init__(self, rows: int, dim: int, backend: str = "auto",
                 exact_rows: Callable[[np.ndarray], np.ndarray] | None = None):
        self.backend = choose_backend(rows, backend)
        if self.backend != "float32" and exact_rows is None:
            raise ValueError(f"the {self.backend} search backend rescores from exact_rows; none given")
        self.rows, self.dim = rows, dim
        self._filled = 0
        self._exact_rows = exact_rows
        self._scan = {"float32": _Float32Matrix, "float16": _Float16Matrix, "int8": _Int8Codes}[self.backend](rows, dim)

    @classmethod
    def from_chunks(cls, chunks, dim: int, backend: str = "auto",
                    exact_rows: Callable[[np.ndarray], np.ndarray] | None = None) -> tuple[list[str], "FeatureIndex"]:
        """The index of ``(total, sha256s, features)`` chunks as :meth:`Gallery.feature_chunks` yields
        them, and the sha256 of each row."""
        sha256s, index = [], cls(0, dim, backend, exact_rows)
        for total, chunk_sha256s, block in chunks:
            if not sha256s:
                index = cls(total, dim, backend, exact_rows)
            index.fill(block)
            sha256s += chunk_sha256s
        return sha256s, index

    @classmethod
    def from_matrix(cls, features: np.ndarray, backend: str = "auto") -> "FeatureIndex":
        """An index of ``features`` (N, D); the compact backends rescore from a float32 copy of them."""
        exact = np.array(features, dtype=np.float32)
        index = cls(len(exact), exact.shape[1], backend, exact_rows=lambda rows: exact[rows])
        index.fill(exact)
        return index

    def fill(self, block: np.ndarray) -> None:
        """Append the next rows (float32, any norm: they are L2-normalised here as evaluate does)."""
        block = _normalized(block)
        start, self._filled = self._filled, self._filled + len(block)
        self._scan.fill(start, block)

    @property
    def nbytes(self) -> int:
        return self._scan.nbytes

    def search(self, queries: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
        """For each query row: the gallery rows of the ``top`` best matches, best first, and their
        cosine similarities, as ``(indices (Q, k), scores (Q, k))`` with k = min(top, N)."""
        top = min(int(top), self._filled)
        queries = _normalized(queries)
        if top == 0:
            return np.empty((len(queries), 0), dtype=np.int64), np.empty((len(queries), 0), dtype=np.float32)
        with _one_thread():
            ranked = [self._rank_one(query, top) for query in queries]
        return np.stack([r[0] for r in ranked]), np.stack([r[1] for r in ranked])

    def _rank_one(self, query: torch.Tensor, top: int) -> tuple[np.ndarray, np.ndarray]:
        candidates = self._scan.candidates(query, top, self._filled)
        scores = _exact_scores(self._candidate_rows(candidates), query)
        order = _smallest_stable((1.0 - scores).numpy(), top)  # evaluate's distance, see pairwise_distance
        return candidates[order], scores.numpy()[order]

    def _candidate_rows(self, candidates: np.ndarray) -> torch.Tensor:
        if self.backend == "float32":
            return self._scan.matrix[candidates]
        return _normalized(self._exact_rows(candidates))


def _exact_scores(rows: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """``rows · query`` rounded once to float32 (products and sum in float64), so a row's score does
    not depend on its position or on the other rows, as a float32 matrix product's last bit does:
    identical features score identically and so keep enrolment order."""
    return (rows.double() @ query.double()).float()


class _Float32Matrix:
    """The features themselves; its float32 scan is off from the exact score by rounding only."""

    dtype = torch.float32

    def __init__(self, rows: int, dim: int):
        self.matrix = torch.empty((rows, dim), dtype=self.dtype)
        self.bound = float32_slack(dim)

    def fill(self, start: int, block: torch.Tensor) -> None:
        self.matrix[start:start + len(block)] = block

    @property
    def nbytes(self) -> int:
        return self.matrix.numel() * self.matrix.element_size()

    def candidates(self, query: torch.Tensor, top: int, filled: int) -> np.ndarray:
        """Every row (ascending) whose exact score may reach the top: its scan score plus the bound is
        at least the top-th best scan score minus the bound."""
        coarse = torch.mv(self.matrix[:filled], query.to(self.dtype)).float()
        kth_lower = torch.topk(coarse, top).values[-1] - self.bound
        return torch.nonzero(coarse + self.bound >= kth_lower).flatten().numpy()


class _Float16Matrix(_Float32Matrix):
    dtype = torch.float16

    def __init__(self, rows: int, dim: int):
        super().__init__(rows, dim)
        self.bound = FLOAT16_BOUND + float32_slack(dim)


class _Int8Codes:
    """Codes ``c`` in [-127, 127] with one scale per dimension ``s`` (from the first rows), scanned by
    faiss's ``QT_8bit_direct_signed`` inner product, which multiplies int8 codes by an int8 query:

        q·g = Σ q_j (s_j c_j + e_j) = t Σ d_j c_j + Σ δ_j c_j + q·e,   with q_j s_j = t d_j + δ_j,

    ``d`` the query's own int8 codes (scale ``t`` per query). The scan computes ``t Σ d_j c_j``
    exactly (integers); the rest is bounded by Cauchy-Schwarz: ``|q·e| ≤ ‖e‖`` (kept per row, with a
    margin for its own rounding) and ``|Σ δ_j c_j| ≤ ‖δ/s‖ ‖s c‖ ≤ ‖δ/s‖ (1 + ‖e‖)``. An unclipped row has
    ``‖e‖ ≤ ‖s‖/2`` (``cap``); rows above that (clipped ones) are rescored by every search."""

    def __init__(self, rows: int, dim: int):
        import faiss

        self.index = faiss.IndexScalarQuantizer(dim, faiss.ScalarQuantizer.QT_8bit_direct_signed,
                                                faiss.METRIC_INNER_PRODUCT)
        self.error = np.empty(rows, dtype=np.float32)
        self.outliers = np.empty(0, dtype=np.int64)
        self.scale = None
        self.slack = float32_slack(dim)

    def fill(self, start: int, block: torch.Tensor) -> None:
        block = block.numpy()
        if self.scale is None:
            peak = np.abs(block).max(axis=0)
            peak = np.maximum(peak, peak.max() / 127 if peak.max() > 0 else 1.0)  # no zero scale
            self.scale = (INT8_HEADROOM * peak / 127).astype(np.float32)
            self.cap = 0.5 * float(np.linalg.norm(self.scale.astype(np.float64))) * (1 + 1e-4) + 2.0 ** -20
        codes = np.clip(np.rint(block / self.scale), -127, 127)
        # in float32: the residual's rounding adds at most 2^-24 |g_j| per element, 2^-24 to the norm
        # of a unit row, and the norm's own rounding less; 2^-20 covers both
        error = np.linalg.norm(block - codes * self.scale, axis=1) + np.float32(2.0 ** -20)
        self.error[start:start + len(block)] = error
        self.outliers = np.concatenate([self.outliers, start + np.flatnonzero(error > self.cap)])
        self.index.add_sa_codes((codes + 128).astype(np.uint8))

    @property
    def nbytes(self) -> int:
        return self.index.ntotal * self.index.code_size + self.error.nbytes + self.outliers.nbytes

    def candidates(self, query: torch.Tensor, top: int, filled: int) -> np.ndarray:
        """Every row (ascending) whose exact score may reach the top. The scan's best ``wanted`` rows
        give a lower bound on the top-th exact score (top-th best of scan score − bound); a row outside
        them scores at most the last one's scan score + the bound at ``cap``, so when that is below the
        lower bound only the rows kept, and the clipped ones, can be in the top."""
        scaled = query.numpy().astype(np.float64) * self.scale
        step = max(float(np.abs(scaled).max()) / 127, np.finfo(np.float32).tiny)
        codes = np.clip(np.rint(scaled / step), -127, 127)
        query_error = float(np.linalg.norm((scaled - step * codes) / self.scale)) * (1 + 1e-6) + self.slack
        wanted = min(filled, max(4 * top, INT8_SHORTLIST))
        while True:
            coarse, rows = (a[0] for a in self.index.search(codes[None].astype(np.float32), wanted))
            coarse = step * coarse.astype(np.float64)
            bound = self.error[rows] + query_error * (1 + self.error[rows])
            kth_lower = np.partition(coarse - bound, wanted - top)[wanted - top]
            if wanted == filled or coarse[-1] + self.cap + query_error * (1 + self.cap) < kth_lower:
                break
            wanted = min(filled, 8 * wanted)
        return np.union1d(rows[coarse + bound >= kth_lower], self.outliers)


def _normalized(features) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.tensor(features, dtype=torch.float32), dim=1)


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
