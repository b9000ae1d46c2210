"""Searching a gallery (``handclip search``): rank its images for each questioned image by cosine
similarity, with the same ranking ``evaluate`` gives on the same images and model."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

from handclip.fileio import atomic_write_json
from handclip.search.index import FeatureIndex
from handclip.search.searcher import Query, Searcher, queries_from_paths

__all__ = ["FeatureIndex", "Query", "Searcher", "queries_from_paths", "run_search"]


def run_search(db: str | os.PathLike, queries: Sequence[str | os.PathLike], out: str | os.PathLike, top: int = 20,
               calibration: str | os.PathLike | None = None, checkpoint: str | os.PathLike | None = None,
               device: str = "cpu") -> dict:
    """``handclip search``: writes ``out/results.json`` (``{"queries": [entry, ...]}``, see
    :meth:`Searcher.search`) and ``out/results.html``; returns the results object."""
    from handclip.search.report import write_results_html

    checked = queries_from_paths(queries)
    searcher = Searcher(db, checkpoint=checkpoint, calibration=calibration, device=device)
    try:
        results = {"queries": searcher.search(checked, top)}
    finally:
        searcher.close()
    out = Path(out)
    atomic_write_json(out / "results.json", results)
    write_results_html(out / "results.html", results["queries"])
    return results
