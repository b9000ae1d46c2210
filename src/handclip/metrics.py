"""Re-ID retrieval metrics (CMC, mAP, mINP), pairwise distances and k-reciprocal re-ranking.

No camera ids: hand photos have none, so every gallery image of the query's identity is a true
match (general re-ID toolkits drop same-camera matches and break on hand data). Ids may be any
hashable values (ints, strings such as ``"0000123|dorsal_r"``); only their equality matters.
"""
from __future__ import annotations

from typing import Hashable, Sequence

import numpy as np
import torch


def pairwise_distance(query_feats, gallery_feats, metric: str = "cosine") -> np.ndarray:
    """(Q, G) float32 distances, smaller = closer; numpy arrays or torch tensors (any device) in.

    ``cosine``: 1 - cosine similarity of the L2-normalised features (in [0, 2]).
    ``euclidean``: plain (not squared) L2 distance of the features as given.
    """
    return distance_matrix(query_feats, gallery_feats, metric).cpu().numpy()


def distance_matrix(query_feats, gallery_feats, metric: str = "cosine") -> torch.Tensor:
    """``pairwise_distance`` as a float32 tensor on the query features' device."""
    query = torch.as_tensor(query_feats).float()
    gallery = torch.as_tensor(gallery_feats).float().to(query.device)
    if metric == "cosine":
        query = torch.nn.functional.normalize(query, dim=1)
        gallery = torch.nn.functional.normalize(gallery, dim=1)
        return 1.0 - query @ gallery.T
    if metric == "euclidean":
        return torch.cdist(query, gallery)
    raise ValueError(f"unknown distance metric '{metric}' (expected 'cosine' or 'euclidean')")


def evaluate_ranking(dist, query_ids: Sequence[Hashable], gallery_ids: Sequence[Hashable],
                     max_rank: int = 10) -> dict:
    """CMC, mAP and mINP of ranking the gallery by ``dist`` (Q, G), smaller = closer.

    Returns ``{"cmc": float array (max_rank,), "rank1", "rank5", "rank10", "mAP", "mAP_trapezoid",
    "mINP": fractions in [0, 1], "num_queries": int}``. A query whose identity is absent from the
    gallery is left out of every average and of ``num_queries``; if that leaves no query at all,
    a ``ValueError`` is raised (the caller knows which files to blame). Rank-k for a gallery
    smaller than k is 1. Ties in ``dist`` keep gallery order (stable sort).

    AP is the mean precision at the ranks of the true matches; INP is
    (number of true matches) / (rank of the last true match).

    ``mAP_trapezoid`` is the AP the published hand re-ID numbers use (MBA-Net and CLIP-HandID,
    ``compute_mAP`` in nathanlem1/MBA-Net evaluation_metrics.py and nathanlem1/CLIP-HandID
    utils/evaluation_metrics.py, from the old Market-1501 code): for n true matches at 0-based
    ranks r_0 < r_1 < ..., AP = sum_i (p_old_i + p_i) / (2 n) with p_i = (i+1)/(r_i+1) and
    p_old_i = i/r_i (1 when r_i = 0). One true match at rank r > 0 scores 1/(2(r+1)), half the
    standard AP. Their code also divides by every query, matched or not; every query of the
    published protocol has a match, so leaving unmatched queries out, as for ``mAP``, agrees there.
    """
    _, matches = ranked_matches(dist, query_ids, gallery_ids)
    matches = matches[matches.any(axis=1)]
    if len(matches) == 0:
        raise ValueError("no query has its identity in the gallery")

    # Work on the true matches only: (row, 0-based rank) pairs in row-major order.
    rows, ranks = np.nonzero(matches)
    num_matches = np.bincount(rows, minlength=len(matches))
    row_start = np.cumsum(num_matches) - num_matches
    first_hit = ranks[row_start]
    last_hit = ranks[row_start + num_matches - 1]
    hits_so_far = np.arange(len(rows)) - row_start[rows] + 1
    precision = hits_so_far / (ranks + 1)
    average_precision = np.bincount(rows, precision, minlength=len(matches)) / num_matches
    # Precision just before each hit; rank 0 can only be the first hit, whose "before" counts as 1.
    precision_before = np.where(ranks > 0, (hits_so_far - 1) / np.maximum(ranks, 1), 1.0)
    trapezoid_ap = np.bincount(rows, (precision_before + precision) / 2, minlength=len(matches)) / num_matches
    inverse_negative_penalty = num_matches / (last_hit + 1)

    cmc = (first_hit[:, None] < np.arange(1, max_rank + 1)).mean(axis=0)
    return {
        "cmc": cmc,
        "rank1": float(np.mean(first_hit < 1)),
        "rank5": float(np.mean(first_hit < 5)),
        "rank10": float(np.mean(first_hit < 10)),
        "mAP": float(average_precision.mean()),
        "mAP_trapezoid": float(trapezoid_ap.mean()),
        "mINP": float(inverse_negative_penalty.mean()),
        "num_queries": int(len(matches)),
    }


def ranking_metrics(dist: torch.Tensor, query_ids: Sequence[Hashable], gallery_ids: Sequence[Hashable],
                    max_rank: int = 10) -> dict:
    """``evaluate_ranking`` computed where ``dist`` lives (a GPU: one sort of the whole (Q, G) matrix,
    the rest elementwise), with the same keys, definitions and values (float64 sums). One read of
    the device at the end."""
    if dist.shape != (len(query_ids), len(gallery_ids)):
        raise ValueError(f"dist has shape {tuple(dist.shape)}, expected ({len(query_ids)}, {len(gallery_ids)})")
    query_codes, gallery_codes = (torch.from_numpy(c).to(dist.device) for c in encode_ids(query_ids, gallery_ids))
    order = torch.sort(dist, dim=1, stable=True).indices
    matches = gallery_codes[order] == query_codes[:, None]
    num_matches = matches.sum(dim=1)
    matched = num_matches > 0
    count = matched.sum()
    ranks = torch.arange(dist.shape[1], device=dist.device, dtype=torch.float64)  # 0-based
    hits = matches.cumsum(dim=1, dtype=torch.float64)  # true matches up to and including each rank
    precision = hits / (ranks + 1)
    precision_before = torch.where(ranks > 0, (hits - 1) / ranks.clamp(min=1), 1.0)
    per_match = num_matches.clamp(min=1).double()
    average_precision = torch.where(matches, precision, 0.0).sum(dim=1) / per_match
    trapezoid_ap = torch.where(matches, (precision_before + precision) / 2, 0.0).sum(dim=1) / per_match
    first_hit = matches.int().argmax(dim=1)  # the first True (argmax returns the first maximum)
    last_hit = dist.shape[1] - 1 - matches.flip(1).int().argmax(dim=1)
    inverse_negative_penalty = num_matches / (last_hit + 1).double()
    cmc = first_hit[:, None] < torch.arange(1, max_rank + 1, device=dist.device)

    def mean(values: torch.Tensor) -> torch.Tensor:  # over the queries with a true match
        return torch.where(matched[:, None] if values.dim() == 2 else matched, values.double(), 0.0).sum(0) / count

    ranks_k = torch.tensor([1, 5, 10], device=dist.device)
    summary = torch.cat([mean(cmc), mean(first_hit[:, None] < ranks_k), mean(average_precision)[None],
                         mean(trapezoid_ap)[None], mean(inverse_negative_penalty)[None], count[None].double()])
    values = summary.tolist()
    if values[-1] == 0:
        raise ValueError("no query has its identity in the gallery")
    rank1, rank5, rank10, m_ap, m_ap_trapezoid, m_inp = values[max_rank:max_rank + 6]
    return {"cmc": np.array(values[:max_rank]), "rank1": rank1, "rank5": rank5, "rank10": rank10, "mAP": m_ap,
            "mAP_trapezoid": m_ap_trapezoid, "mINP": m_inp, "num_queries": int(values[-1])}


def ranked_matches(dist, query_ids: Sequence[Hashable],
                   gallery_ids: Sequence[Hashable]) -> tuple[np.ndarray, np.ndarray]:
    """Each query's gallery order, nearest first (stable argsort of ``dist``), and (Q, G) booleans
    saying which of those ranked gallery images share the query's id."""
    dist = np.asarray(dist)
    if dist.shape != (len(query_ids), len(gallery_ids)):
        raise ValueError(f"dist has shape {dist.shape}, expected ({len(query_ids)}, {len(gallery_ids)})")
    query_codes, gallery_codes = encode_ids(query_ids, gallery_ids)
    order = np.argsort(dist, axis=1, kind="stable")
    return order, gallery_codes[order] == query_codes[:, None]


def encode_ids(query_ids, gallery_ids) -> tuple[np.ndarray, np.ndarray]:
    """Both id lists as integer codes of one shared table (exact equality, no dtype coercion)."""
    table: dict = {}
    query = np.array([table.setdefault(i, len(table)) for i in query_ids], dtype=np.int64)
    gallery = np.array([table.setdefault(i, len(table)) for i in gallery_ids], dtype=np.int64)
    return query, gallery


# The re-ranking defaults of Zhong et al. (CVPR 2017), which evaluate and its CLI flags use too.
RERANK_K1, RERANK_K2, RERANK_LAMBDA = 20, 6, 0.3


def k_reciprocal_rerank(q_g, q_q, g_g, k1: int = RERANK_K1, k2: int = RERANK_K2,
                        lambda_value: float = RERANK_LAMBDA) -> np.ndarray:
    """k-reciprocal re-ranking (Zhong et al., CVPR 2017); returns the new (Q, G) distance.

    ``q_g``, ``q_q``, ``g_g``: query–gallery, query–query and gallery–gallery distances.
    As in the authors' code, the joint (Q+G)² distance is squared and each image's row divided
    by its largest value, so ``lambda_value=1`` returns ``q_g**2 / max(q_q[i]**2, q_g[i]**2)``
    per query row i (symmetric ``q_q``): the original ranking, rescaled. The result is
    ``(1 - lambda) * jaccard + lambda * that``.
    """
    q_g, q_q, g_g = (np.asarray(d, dtype=np.float32) for d in (q_g, q_q, g_g))
    num_query = q_g.shape[0]
    joint = np.block([[q_q, q_g], [q_g.T, g_g]]) ** 2
    joint = (joint / np.maximum(joint.max(axis=0), np.finfo(np.float32).tiny)).T
    rank = _nearest_first(joint, max(k1 + 1, k2))

    encoding = _k_reciprocal_encoding(joint, rank, k1)
    if k2 > 1:  # local query expansion: average over each image's k2 nearest neighbours
        neighbours = rank[:, :k2]
        encoding = sum(encoding[neighbours[:, t]] for t in range(neighbours.shape[1])) / neighbours.shape[1]

    jaccard = _jaccard_distance(encoding[:num_query], encoding[num_query:])
    return (1 - lambda_value) * jaccard + lambda_value * joint[:num_query, num_query:]


def _nearest_first(dist: np.ndarray, count: int) -> np.ndarray:
    """Column indices of each row's ``count`` smallest values, nearest first (a full sort of
    the (Q+G)² matrix would cost more than the rest of the re-ranking)."""
    if count >= dist.shape[1]:
        return np.argsort(dist, axis=1, kind="stable")
    nearest = np.sort(np.argpartition(dist, count - 1, axis=1)[:, :count], axis=1)
    by_distance = np.argsort(np.take_along_axis(dist, nearest, axis=1), axis=1, kind="stable")
    return np.take_along_axis(nearest, by_distance, axis=1)


def _reciprocal_neighbours(rank: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each image's k+1 nearest (itself included) and which of them also hold it among theirs."""
    forward = rank[:, :k + 1]
    backward = rank[forward, :k + 1]
    is_reciprocal = (backward == np.arange(len(rank))[:, None, None]).any(axis=2)
    return forward, is_reciprocal


def _k_reciprocal_encoding(dist: np.ndarray, rank: np.ndarray, k1: int) -> np.ndarray:
    """V of the paper: weights exp(-d) on each image's expanded k-reciprocal set, rows sum to 1."""
    num = len(rank)
    rows = np.arange(num)
    forward, reciprocal = _reciprocal_neighbours(rank, k1)
    in_set = np.zeros((num, num), dtype=bool)
    in_set[rows[:, None], forward] = reciprocal

    # A neighbour's own k1/2-reciprocal set joins when over 2/3 of it is already in the set.
    half_forward, half_reciprocal = _reciprocal_neighbours(rank, int(np.around(k1 / 2)))
    candidate_set = half_forward[forward]              # (N, k1+1, k1/2+1)
    candidate_valid = half_reciprocal[forward]
    overlap = (in_set[rows[:, None, None], candidate_set] & candidate_valid).sum(axis=2)
    accepted = reciprocal & (overlap > 2 / 3 * candidate_valid.sum(axis=2))
    joins = accepted[:, :, None] & candidate_valid
    expanded = in_set.copy()
    expanded[np.broadcast_to(rows[:, None, None], joins.shape)[joins], candidate_set[joins]] = True

    weights = np.where(expanded, np.exp(-dist), 0.0).astype(np.float32)
    return weights / weights.sum(axis=1, keepdims=True)


def _jaccard_distance(query_codes: np.ndarray, gallery_codes: np.ndarray) -> np.ndarray:
    """1 - sum(min) / sum(max) of the encodings; rows sum to 1, so sum(max) = 2 - sum(min).
    The encodings are sparse: only each query's non-zero columns are compared."""
    jaccard = np.empty((len(query_codes), len(gallery_codes)), dtype=np.float32)
    gallery_by_column = np.ascontiguousarray(gallery_codes.T)  # row gathers are cheap copies
    for i, code in enumerate(query_codes):
        support = np.flatnonzero(code)
        shared = np.minimum(code[support, None], gallery_by_column[support]).sum(axis=0)
        jaccard[i] = 1 - shared / (2 - shared)
    return jaccard
