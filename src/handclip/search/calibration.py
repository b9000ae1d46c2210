"""The one place where search results get likelihood ratios: scores → ELUB-bounded log10 LRs and
their verbal equivalents, with a calibrator of ``handclip calibrate`` (handclip.forensic)."""
from __future__ import annotations

import os

import numpy as np

from handclip.errors import UserError
from handclip.forensic import verbal_equivalent
from handclip.forensic.calibration import Calibrator, load_calibrator


def load_calibration(cal_dir: str | os.PathLike | None, checkpoint_sha256: str) -> Calibrator | None:
    """The calibrator saved in ``cal_dir`` (None without one); it must belong to the gallery's model:
    LRs calibrated on another model's scores mean nothing for these."""
    if cal_dir is None:
        return None
    calibrator = load_calibrator(cal_dir)
    if calibrator.checkpoint_sha256 != checkpoint_sha256:
        raise UserError(f"--calibration {cal_dir}: made for another checkpoint (sha256 "
                        f"{str(calibrator.checkpoint_sha256)[:12]}…) than the gallery's ({checkpoint_sha256[:12]}…)")
    return calibrator


def add_likelihood_ratios(results: list[dict], calibrator: Calibrator | None) -> list[dict]:
    """Give each result (with a ``score``) its ``log10_lr`` and ``verbal`` equivalent; results are
    returned unchanged without a calibrator."""
    if calibrator is None or not results:
        return results
    log10_lrs = calibrator.llr(np.array([r["score"] for r in results], dtype=float))
    for result, value in zip(results, log10_lrs):
        result["log10_lr"] = float(value)
        result["verbal"] = verbal_equivalent(float(value))
    return results
