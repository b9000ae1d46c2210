"""An evaluation's pictures and report.html, from its distances, ids and image paths."""
from __future__ import annotations

from pathlib import Path

from handclip.errors import UserError
from handclip.forensic.verification import pair_labels
from handclip.report import missed_identities, worst_queries
from handclip.report.forensic_plots import plot_det, plot_score_histogram
from handclip.report.grids import draw_ranked_grids, ranked_row
from handclip.report.html import write_report
from handclip.report.plots import plot_cmc, plot_history

WORST_COUNT = 8
TOP_K = 8


def write_evaluation_report(out: Path, protocol, ranking, result: dict, history_csvs: list[Path] = (),
                            show_queries: list[str] = ()) -> Path:
    """CMC curve, worst-query and chosen-query grids, most-missed identities, history curves,
    and ``out/report.html`` linking them (relative paths). Split 0 supplies the rankings."""
    out = Path(out)
    query_keys = [protocol.key(s) for s in ranking.queries]
    gallery_keys = [protocol.key(s) for s in ranking.gallery]
    query_paths = [s.path for s in ranking.queries]
    gallery_paths = [s.path for s in ranking.gallery]

    def rows(indices):
        return [ranked_row(ranking.dist, i, query_paths, query_keys, gallery_paths, gallery_keys, top_k=TOP_K)
                for i in indices]

    images = [("CMC (mean over splits)", plot_cmc({protocol.aspect: ranking.cmc_mean}, out / "cmc.png"))]
    worst = worst_queries(ranking.dist, query_keys, gallery_keys, count=WORST_COUNT)
    if worst:
        images.append(("Worst queries of split 0", draw_ranked_grids(rows(worst), out / "worst_queries.png")))
    images += _verification_pictures(out, 1.0 - ranking.dist, pair_labels(query_keys, gallery_keys))
    chosen = _chosen_queries(ranking.queries, show_queries)
    if chosen:
        images.append(("Chosen queries", draw_ranked_grids(rows(chosen), out / "chosen_queries.png")))
    history_pngs = []
    for index, csv_path in enumerate(history_csvs):
        history_pngs += plot_history(csv_path, out / f"history_{index}")
    return write_report(out, title=f"handclip evaluation: {protocol.aspect} ({result['protocol']})",
                        results=result,
                        images=[(caption, path.relative_to(out)) for caption, path in images],
                        missed=missed_identities(ranking.dist, query_keys, gallery_keys),
                        history_pngs=[p.relative_to(out) for p in history_pngs])


def _verification_pictures(out: Path, scores, same) -> list[tuple[str, Path]]:
    """DET curve and score histogram of split 0's query x gallery pairs (both classes needed)."""
    if same.all() or not same.any():
        return []
    return [("DET curve of split 0 (every query x gallery pair)", plot_det(scores, same, out / "det.png")),
            ("Scores of split 0: same vs. different source", plot_score_histogram(scores, same, out / "scores.png"))]


def _chosen_queries(queries, wanted: list[str]) -> list[int]:
    """Indices of the queries named by --show-query (CSV image path or file name)."""
    indices = []
    for name in wanted:
        found = [i for i, s in enumerate(queries) if name in (s.image, Path(s.image).name, str(s.path))]
        if not found:
            raise UserError(f"--show-query {name}: not a query image of split 0")
        indices.append(found[0])
    return indices
