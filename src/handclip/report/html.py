"""``report.html``: one self-contained offline page (inline style, relative links to the PNGs
beside it) with the results table, the published results measured the same way, the pictures,
the most-missed identities and the history."""
from __future__ import annotations

import html
import os
from pathlib import Path, PurePosixPath
from typing import Hashable, Sequence
from urllib.parse import quote

from handclip.fileio import atomic_write_text
from handclip.published import PROTOCOLS, comparable, for_aspect

METRIC_COLUMNS = (("rank1", "Rank-1"), ("rank5", "Rank-5"), ("rank10", "Rank-10"), ("mAP", "mAP"),
                  ("mAP_trapezoid", "mAP (trapezoid)"), ("mINP", "mINP"))
VERIFICATION_COLUMNS = (("eer", "EER"), ("fnmr_at_fmr_1e-2", "FNMR at FMR 1%"),
                        ("fnmr_at_fmr_1e-3", "FNMR at FMR 0.1%"), ("auc", "ROC AUC"))

STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.7em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
figure { margin: 1em 0 2em; }
img { max-width: 100%; border: 1px solid #ddd; }
figcaption { color: #555; margin-top: 0.3em; }
"""


def write_report(out_dir, title: str, results: dict | Sequence[dict],
                 images: Sequence[tuple[str, str | os.PathLike]] = (),
                 missed: Sequence[tuple[Hashable, int]] = (),
                 history_pngs: Sequence[str | os.PathLike] = (), row_header: str = "aspect") -> Path:
    """Write ``out_dir/report.html`` atomically and return its path.

    ``results``: a results.json object ``{"aspect", "protocol", "num_splits", "splits": [...],
    "mean": {...}, "std": {...}}``, a list of them, or ``{"aspects": [...]}`` (several aspects);
    an entry may also hold the metrics at its top level (means only, no ± std). The table
    shows percent, mean ± std over splits, as the papers print them.
    ``images``: ``(caption, path)`` pairs and ``history_pngs``: paths, both relative to
    ``out_dir`` and existing (``ValueError`` otherwise: the page must not have broken links).
    ``missed``: ``(identity, count)`` of the identities most often missed at rank 1.
    Published results (:mod:`handclip.published`) appear only beside a result on the same aspect
    under the same protocol, each in the column of its own AP definition.
    ``row_header``: the table's first column, which shows each result's ``aspect``.
    """
    out_dir = Path(out_dir)
    if isinstance(results, dict):
        results = results.get("aspects", [results])
    parts = [f"<h1>{_text(title)}</h1>", "<h2>Results</h2>", _results_table(results, row_header), _published_section(results)]
    parts.append(_verification_table(results, row_header))
    parts += [_split_details(result) for result in results if result.get("splits")]
    if images:
        parts.append("<h2>Pictures</h2>")
        parts += [_figure(out_dir, caption, path) for caption, path in images]
    if missed:
        parts += ["<h2>Identities most often missed at rank 1</h2>", _missed_table(missed)]
    if history_pngs:
        parts.append("<h2>Training history</h2>")
        parts += [_figure(out_dir, Path(path).stem, path) for path in history_pngs]
    page = ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{_text(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
            + "\n".join(parts) + "\n</body>\n</html>\n")
    target = out_dir / "report.html"
    atomic_write_text(target, page)
    return target


def _text(value) -> str:
    return html.escape(str(value), quote=True)


def _results_table(results: Sequence[dict], row_header: str) -> str:
    header = [row_header, "protocol", "splits", "queries"] + [name for _, name in METRIC_COLUMNS]
    rows = []
    for result in results:
        mean, std = result.get("mean", result), result.get("std")
        cells = [result.get("aspect", ""), result.get("protocol", ""), result.get("num_splits", ""),
                 f"{mean['num_queries']:.0f}" if "num_queries" in mean else ""]
        cells += [_percent(mean.get(key), std.get(key) if std else None) for key, _ in METRIC_COLUMNS]
        rows.append(cells)
    return _table(header, rows)


def _published_section(results: Sequence[dict]) -> str:
    """The papers' numbers comparable with ``results`` (same aspect, same protocol), and which
    protocol the others used."""
    shown, hidden = [], []
    for result in results:
        aspect, protocol = str(result.get("aspect", "")), str(result.get("protocol", ""))
        same = comparable(aspect, protocol)
        shown += [row for row in same if row not in shown]
        hidden += [row for row in for_aspect(aspect) if row not in same and row not in hidden]
    parts = []
    if shown:
        header = ["method", "backbone", "aspect", "protocol"] + [name for _, name in METRIC_COLUMNS] + ["source"]
        rows = [[row.method, row.backbone, row.aspect, row.protocol]
                + [_percent({"rank1": row.rank1, row.map_metric: row.mAP}.get(key), None) for key, _ in METRIC_COLUMNS]
                + [row.source] for row in shown]
        notes = "".join(f"<li><b>{_text(name)}</b>: {_text(PROTOCOLS[name].description)}</li>"
                        for name in sorted({row.protocol for row in shown}))
        parts += ["<h2>Published results under the same protocol</h2>",
                  "<p>Each paper's mAP stands in the column of its own AP definition: MBA-Net and GPA-Net report "
                  "the trapezoid AP of the old Market-1501 code, the CLIP-FH thesis the standard AP. "
                  "Blank: not reported.</p>", f"<ul>{notes}</ul>", _table(header, rows)]
    if hidden:
        listed = "; ".join(f"{row.method} ({row.backbone}): {row.protocol}" for row in hidden)
        parts.append(f"<p>Not shown, measured under another protocol: {_text(listed)}. "
                     f"<code>handclip evaluate --protocol NAME</code> measures the way they did.</p>")
    return "\n".join(parts)


def _verification_table(results: Sequence[dict], row_header: str) -> str:
    """Results' ``"verification"`` (every query x gallery pair as same or different source), when present."""
    rows = [[result.get("aspect", ""), result.get("protocol", "")]
            + [_percent(summary["mean"][key], summary["std"][key]) for key, _ in VERIFICATION_COLUMNS]
            for result in results if (summary := result.get("verification") or {}).get("mean")]
    if not rows:
        return ""
    return ("<h2>Verification</h2>\n<p>Every query x gallery pair scored as same or different source (%, mean ± std "
            "over splits).</p>\n" + _table([row_header, "protocol"] + [name for _, name in VERIFICATION_COLUMNS], rows))


def _percent(mean: float | None, std: float | None) -> str:
    if mean is None:
        return ""
    return f"{100 * mean:.2f} ± {100 * std:.2f}" if std is not None else f"{100 * mean:.2f}"


def _split_details(result: dict) -> str:
    header = ["split", "queries"] + [name for _, name in METRIC_COLUMNS]
    rows = [[i, split.get("num_queries", "")] + [_percent(split.get(key), None) for key, _ in METRIC_COLUMNS]
            for i, split in enumerate(result["splits"])]
    label = result.get("aspect", "results") + (f" ({result['protocol']})" if result.get("protocol") else "")
    return (f"<details><summary>{_text(label)}: every split (%)</summary>\n"
            f"{_table(header, rows)}</details>")


def _missed_table(missed: Sequence[tuple[Hashable, int]]) -> str:
    return _table(["identity", "queries missed at rank 1"], [[identity, count] for identity, count in missed])


def _table(header: Sequence, rows: Sequence[Sequence]) -> str:
    head = "".join(f"<th>{_text(cell)}</th>" for cell in header)
    body = "\n".join("<tr>" + "".join(f"<td>{_text(cell)}</td>" for cell in row) + "</tr>" for row in rows)
    return f"<table>\n<tr>{head}</tr>\n{body}\n</table>"


def _figure(out_dir: Path, caption: str, path: str | os.PathLike) -> str:
    relative = PurePosixPath(Path(path).as_posix())
    if relative.is_absolute() or not (out_dir / relative).is_file():
        raise ValueError(f"report image '{path}' is not an existing file relative to {out_dir}")
    return (f'<figure><img src="{_text(quote(str(relative)))}" alt="{_text(caption)}">'
            f"<figcaption>{_text(caption)}</figcaption></figure>")
