"""``handclip compare``: the likelihood ratio of a questioned hand photo against each reference,
from a checkpoint and the calibrator made for it, as ``comparison.json`` and ``report.html``."""
from __future__ import annotations

import datetime
import json
from pathlib import Path

import numpy as np

from handclip import __version__
from handclip.data.images import read_image
from handclip.engine.calibrate import check_replaceable
from handclip.fileio import sha256_file
from handclip.engine.checkpoint import load_model
from handclip.errors import UserError
from handclip.fileio import atomic_directory, atomic_write_json
from handclip.forensic.calibration import load_calibrator
from handclip.forensic.verbal import DIFFERENT_SOURCE, ENFSI_SCALE_SOURCE, SAME_SOURCE, scale_table, verbal_equivalent
from handclip.report.forensic_html import write_case_report


def run_compare(checkpoint, calibration, questioned, references, out, device: str = "auto",
                quiet: bool = False) -> dict:
    """Score ``questioned`` against every reference, turn the scores into bounded LRs with the
    calibrator of ``calibration`` and write ``out/comparison.json`` and ``out/report.html``.
    A calibrator made for another checkpoint, an unreadable image or a NaN score: ``UserError``,
    nothing written."""
    checkpoint, calibration, out = Path(checkpoint), Path(calibration), Path(out)
    questioned, references = Path(questioned), [Path(r) for r in references]
    if not references:
        raise UserError("compare needs at least one REFERENCE image")
    check_replaceable(out, "comparison.json")
    calibrator = load_calibrator(calibration)
    checkpoint_sha = _checkpoint_sha256(checkpoint)
    if calibrator.checkpoint_sha256 != checkpoint_sha:
        raise UserError(f"{calibration}: this calibrator was made for another checkpoint (sha256 "
                        f"{str(calibrator.checkpoint_sha256)[:12]}…, {checkpoint} is {checkpoint_sha[:12]}…); "
                        f"run `handclip calibrate` for this checkpoint")
    for image in [questioned, *references]:
        read_image(image)  # an unreadable file fails here, before the model loads
    features = load_model(checkpoint, device=device).encode([questioned, *references]).double()
    scores = (features[1:] @ features[0]).numpy()
    if not np.isfinite(scores).all():
        raise UserError(f"{checkpoint}: the model gives NaN or infinite similarity scores (broken weights?)")
    comparison = comparison_record(checkpoint, checkpoint_sha, calibration, calibrator, questioned, references, scores)
    with atomic_directory(out) as tmp:
        atomic_write_json(tmp / "comparison.json", comparison)
        write_case_report(tmp, comparison, _held_out_llrs(calibration))
    print(format_comparison(comparison))
    if not quiet:
        print(f"report: {out / 'report.html'}")
    return comparison


def comparison_record(checkpoint: Path, checkpoint_sha: str, calibration: Path, calibrator, questioned: Path,
                      references: list[Path], scores: np.ndarray) -> dict:
    """comparison.json: per reference the score, bounded log10 LR, LR and verbal equivalent, with the
    propositions, the scale's source, the validation figures and what an audit needs."""
    return {
        "questioned": {"image": str(questioned), "sha256": sha256_file(questioned)},
        "comparisons": [_comparison(reference, score, llr, calibrator)
                        for reference, score, llr in zip(references, scores, calibrator.llr(scores))],
        "propositions": {"same_source": SAME_SOURCE, "different_source": DIFFERENT_SOURCE},
        "score": "cosine similarity of handclip.load_model(checkpoint).encode features",
        "verbal_scale": {"source": ENFSI_SCALE_SOURCE, "bands": scale_table()},
        "checkpoint": {"path": str(checkpoint), "sha256": checkpoint_sha},
        "calibrator": {"path": str(calibration), "sha256": sha256_file(_calibrator_file(calibration)),
                       "method": calibrator.method, "log10_lr_bounds": [calibrator.lower, calibrator.upper],
                       "counts": calibrator.info.get("counts"), "provenance": calibrator.info.get("provenance")},
        "validation": _validation(calibration),
        "handclip_version": __version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _comparison(reference: Path, score: float, llr: float, calibrator) -> dict:
    return {"reference": str(reference), "sha256": sha256_file(reference), "score": float(score),
            "log10_lr": float(llr), "lr": float(10.0 ** llr), "verbal": verbal_equivalent(llr),
            "at_bound": bool(llr <= calibrator.lower or llr >= calibrator.upper)}


def _checkpoint_sha256(checkpoint: Path) -> str:
    if not checkpoint.is_file():
        raise UserError(f"{checkpoint}: checkpoint not found")
    return sha256_file(checkpoint)


def _calibrator_file(calibration: Path) -> Path:
    return calibration / "calibrator.json" if calibration.is_dir() else calibration


def _validation(calibration: Path) -> dict | None:
    """validation.json beside the calibrator, when there is one."""
    path = _calibrator_file(calibration).parent / "validation.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _held_out_llrs(calibration: Path) -> tuple[np.ndarray, np.ndarray] | None:
    path = _calibrator_file(calibration).parent / "llrs.npz"
    try:
        with np.load(path) as data:
            return data["llr"], data["same"].astype(bool)
    except (OSError, KeyError, ValueError):
        return None


def format_comparison(comparison: dict) -> str:
    lines = [f"questioned: {comparison['questioned']['image']}",
             f"{'reference':<40}{'score':>8}{'log10 LR':>10}{'LR':>12}  verbal (ENFSI 2015)"]
    for row in comparison["comparisons"]:
        lines.append(f"{Path(row['reference']).name:<40}{row['score']:>8.3f}{row['log10_lr']:>10.2f}"
                     f"{row['lr']:>12.3g}  {row['verbal']}")
    return "\n".join(lines)
