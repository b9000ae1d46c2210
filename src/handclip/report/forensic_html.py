"""The calibration's ``validation.html`` and a case's ``report.html``: offline pages in the style
of ``report.html``. validation.html shows plots as PNG files beside the page; report.html is one
self-contained file to hand on (the case's photos and its Tippett plot embedded as data URIs; the
plot is also left beside it as a PNG)."""
from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np

from handclip.data.images import read_image
from handclip.fileio import atomic_write_text
from handclip.report.forensic_plots import plot_ece, plot_pav, plot_tippett
from handclip.report.html import STYLE, _figure, _table, _text

FORENSIC_STYLE = STYLE + """
.pair { display: flex; gap: 1.5em; flex-wrap: wrap; }
.pair figure { margin: 0; }
.pair img { max-height: 320px; }
.note { color: #555; max-width: 60em; }
"""
THUMBNAIL_SIDE = 480

MEANINGS = (
    ("Cllr", "the cost of the LRs in bits: 0 = perfect, 1 = uninformative (always LR 1), above 1 = misleading"),
    ("Cllr_min", "Cllr after the best monotone recalibration (PAV): what discrimination alone allows"),
    ("Cllr_cal", "Cllr − Cllr_min: the loss due to calibration"),
    ("EER", "equal error rate of the scores: where false matches and false non-matches are equally frequent"),
)
LIMITS = (
    "The LR weighs the similarity of two images under two propositions; it is not the probability that "
    "the two images show the same person. That needs prior odds from the rest of the case.",
    "The LR is only as good as its calibration data: other people, other photos, other conditions give "
    "other LRs. The calibration set is named below.",
    "LRs are bounded (ELUB, Vergeer et al. 2016): a calibration set of n comparisons cannot support an LR "
    "far beyond n, so a result at a bound means “at least this strong”, not an exact value.",
    "It says nothing about how the questioned photo was taken, whether it was altered, or who took it.",
)


def write_validation_report(out_dir, calibrator: dict, validation: dict, llr, same) -> Path:
    """``out_dir/validation.html`` with Tippett, ECE and PAV plots of the held-out LRs."""
    out_dir = Path(out_dir)
    plots = [("Tippett plot of the held-out log10 LRs", plot_tippett(llr, same, out_dir / "tippett.png")),
             ("Empirical cross-entropy", plot_ece(llr, same, out_dir / "ece.png")),
             ("PAV: calibrated vs. reported log10 LR", plot_pav(llr, same, out_dir / "pav.png"))]
    counts = validation["counts"]
    figures = [
        ("method", f"{calibrator['method']} (validation: {validation['folds']} subject-disjoint folds)"),
        ("Cllr", f"{validation['cllr']:.4f}"), ("Cllr_min", f"{validation['cllr_min']:.4f}"),
        ("Cllr_cal", f"{validation['cllr_cal']:.4f}"), ("EER", f"{100 * validation['eer']:.2f} %"),
        ("same-source pairs with LR > 1", f"{100 * validation['same_source_lr_above_1']:.1f} % of "
                                          f"{counts['same_source']}"),
        ("different-source pairs with LR < 1", f"{100 * validation['different_source_lr_below_1']:.1f} % of "
                                               f"{counts['different_source']}"),
        ("subjects / images", f"{validation['subjects']} / {validation['images']}"),
        ("log10 LR bounds (ELUB)", _bounds(calibrator)),
    ]
    parts = [
        "<h1>handclip calibration: validation</h1>",
        "<p class=\"note\">Every LR below comes from a calibrator fit on other subjects' pairs (subject-disjoint "
        "folds); the calibrator saved for casework is fit on all pairs.</p>",
        "<h2>Figures</h2>", _table(["", "value"], figures),
        "<h2>What they mean</h2>", _table(["figure", "meaning"], MEANINGS),
        "<h2>Plots</h2>", *[_figure(out_dir, caption, path.relative_to(out_dir)) for caption, path in plots],
        "<h2>Calibration data</h2>", _provenance_table(calibrator),
    ]
    return _write_page(out_dir / "validation.html", "handclip calibration: validation", parts)


def write_case_report(out_dir, comparison: dict, held_out: tuple[np.ndarray, np.ndarray] | None) -> Path:
    """``out_dir/report.html``: propositions, photos side by side, score / LR / verbal equivalent per
    reference, the case on the validation Tippett plot, the validation figures and an audit block."""
    out_dir = Path(out_dir)
    rows = comparison["comparisons"]
    parts = [
        "<h1>handclip comparison report</h1>",
        "<h2>Propositions</h2>",
        f"<p>Hp: {_text(comparison['propositions']['same_source'])}.<br>"
        f"Hd: {_text(comparison['propositions']['different_source'])}.</p>",
        "<h2>Images</h2>", _photos(comparison),
        "<h2>Results</h2>",
        _table(["reference", "score (cosine similarity)", "log10 LR", "LR", "verbal equivalent"],
               [[Path(r["reference"]).name, f"{r['score']:.4f}", _llr_text(r), f"{r['lr']:.3g}", r["verbal"]]
                for r in rows]),
        f"<p class=\"note\">An LR of X means: the score is X times more probable if Hp is true than if Hd is "
        f"true. ≥ / ≤ marks an LR at the calibrator's ELUB bound. "
        f"Verbal scale: {_text(comparison['verbal_scale']['source'])}.</p>",
        _table(["LR (and 1/LR for Hd)", "verbal equivalent"],
               [[band["lr"], band["verbal"]] for band in comparison["verbal_scale"]["bands"]]),
    ]
    if held_out is not None:
        tippett = plot_tippett(*held_out, out_dir / "tippett_case.png", case_llrs=[r["log10_lr"] for r in rows],
                               title="This case on the validation Tippett plot")
        parts += ["<h2>This case among the validation comparisons</h2>",
                  _embedded_figure("dashed: this case's log10 LRs", tippett)]
    parts += ["<h2>Validation of the calibrator</h2>", _validation_table(comparison),
              "<h2>What the LR does not say</h2>", "<ul>" + "".join(f"<li>{_text(t)}</li>" for t in LIMITS) + "</ul>",
              "<h2>Audit</h2>", _audit_table(comparison)]
    return _write_page(out_dir / "report.html", "handclip comparison report", parts)


def _photos(comparison: dict) -> str:
    items = [("questioned", comparison["questioned"]["image"])]
    items += [(f"reference {i + 1}", row["reference"]) for i, row in enumerate(comparison["comparisons"])]
    figures = "".join(f'<figure><img src="{_data_uri(path)}" alt="{_text(label)}">'
                      f"<figcaption>{_text(label)}: {_text(Path(path).name)}</figcaption></figure>"
                      for label, path in items)
    note = '<p class="note">Display copies; the audit lists the sha256 of the original files.</p>'
    return f'<div class="pair">{figures}</div>{note}'


def _embedded_figure(caption: str, png: Path) -> str:
    uri = "data:image/png;base64," + base64.b64encode(png.read_bytes()).decode("ascii")
    return f'<figure><img src="{uri}" alt="{_text(caption)}"><figcaption>{_text(caption)}</figcaption></figure>'


def _data_uri(path) -> str:
    image = read_image(path)
    image.thumbnail((THUMBNAIL_SIDE, THUMBNAIL_SIDE))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _llr_text(row: dict) -> str:
    prefix = ("≥ " if row["log10_lr"] > 0 else "≤ ") if row.get("at_bound") else ""
    return f"{prefix}{row['log10_lr']:.2f}"


def _validation_table(comparison: dict) -> str:
    validation = comparison.get("validation")
    calibrator = comparison["calibrator"]
    counts = calibrator.get("counts") or {}
    lower, upper = calibrator["log10_lr_bounds"]
    rows = [("method", calibrator["method"]), ("log10 LR bounds (ELUB)", f"{lower:.2f} to {upper:.2f}"),
            ("calibration pairs (same / different source)",
             f"{counts.get('pairs')} ({counts.get('same_source')} / {counts.get('different_source')})"),
            ("calibration subjects", counts.get("subjects"))]
    if validation:
        rows += [("Cllr (held out)", f"{validation['cllr']:.4f}"), ("Cllr_min", f"{validation['cllr_min']:.4f}"),
                 ("EER", f"{100 * validation['eer']:.2f} %")]
    else:
        rows.append(("validation", "validation.json not found beside the calibrator"))
    provenance = calibrator.get("provenance") or {}
    rows += [(key, provenance.get(key)) for key in ("data_root", "aspect", "calibration_splits", "pairing")]
    return _table(["", "value"], rows)


def _audit_table(comparison: dict) -> str:
    rows = [("questioned image", comparison["questioned"]["image"], comparison["questioned"]["sha256"])]
    rows += [(f"reference {i + 1}", r["reference"], r["sha256"]) for i, r in enumerate(comparison["comparisons"])]
    rows += [("checkpoint", comparison["checkpoint"]["path"], comparison["checkpoint"]["sha256"]),
             ("calibrator", comparison["calibrator"]["path"], comparison["calibrator"]["sha256"])]
    rows += [("handclip version", "", comparison["handclip_version"]), ("date (UTC)", "", comparison["date"])]
    return _table(["item", "file", "sha256 / value"], rows)


def _provenance_table(calibrator: dict) -> str:
    provenance = calibrator.get("provenance", {})
    rows = [("checkpoint", calibrator["checkpoint"]["path"]), ("checkpoint sha256", calibrator["checkpoint"]["sha256"]),
            ("score", calibrator.get("score"))]
    rows += [(key, value) for key, value in provenance.items()]
    rows += [(f"{key} (count)", value) for key, value in calibrator.get("counts", {}).items()]
    return _table(["", "value"], rows)


def _bounds(calibrator: dict) -> str:
    bounds = calibrator["bounds"]
    return f"{bounds['log10_lr_lower']:.2f} to {bounds['log10_lr_upper']:.2f}"


def _write_page(path: Path, title: str, parts: list[str]) -> Path:
    page = ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{_text(title)}</title>\n<style>{FORENSIC_STYLE}</style>\n</head>\n<body>\n"
            + "\n".join(parts) + "\n</body>\n</html>\n")
    atomic_write_text(path, page)
    return path
