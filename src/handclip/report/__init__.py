"""Pictures and the HTML report, made from arrays, result files and history CSVs only.

- ``report.plots``: ``plot_cmc`` and ``plot_history`` (matplotlib, Agg canvas, no display).
- ``report.grids``: ranked-result grids (query + top-k gallery thumbnails, green/red frames).
- ``report.html``: ``write_report`` → ``DIR/report.html``, one offline page.
- here: which queries and identities to show, from a (Q, G) distance matrix and the ids.
"""
from __future__ import annotations

from collections import Counter
from typing import Hashable, Sequence

import numpy as np

from handclip.metrics import ranked_matches


def first_match_ranks(dist, query_ids: Sequence[Hashable], gallery_ids: Sequence[Hashable]) -> np.ndarray:
    """0-based rank of each query's first true match (stable sort by distance); -1 where the
    query's identity is not in the gallery."""
    _, matches = ranked_matches(dist, query_ids, gallery_ids)
    return np.where(matches.any(axis=1), matches.argmax(axis=1), -1)


def missed_identities(dist, query_ids: Sequence[Hashable], gallery_ids: Sequence[Hashable],
                      top: int | None = 20) -> list[tuple[Hashable, int]]:
    """Identities whose queries most often have a wrong rank-1, as ``(identity, count)``,
    most missed first (ties: first seen first); at most ``top``. Queries whose identity is not
    in the gallery do not count (the metrics leave them out too)."""
    ranks = first_match_ranks(dist, query_ids, gallery_ids)
    counts = Counter(identity for identity, rank in zip(query_ids, ranks) if rank > 0)
    return counts.most_common(top)


def worst_queries(dist, query_ids: Sequence[Hashable], gallery_ids: Sequence[Hashable],
                  count: int = 8) -> list[int]:
    """Indices of the ``count`` queries whose first true match ranks lowest; among equal ranks,
    the one whose match is farthest behind the top-1 distance first. Unmatched queries are left out."""
    dist = np.asarray(dist)
    ranks = first_match_ranks(dist, query_ids, gallery_ids)
    matched = np.flatnonzero(ranks >= 0)
    sorted_dist = np.sort(dist[matched], axis=1)
    gap = sorted_dist[np.arange(len(matched)), ranks[matched]] - sorted_dist[:, 0]
    worst_first = np.lexsort((-gap, -ranks[matched]))
    return [int(i) for i in matched[worst_first[:count]]]
