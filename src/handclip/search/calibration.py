"""The one place where calibrated output is made: scores → log10 likelihood ratios (and their verbal
equivalents) with a calibrator from the forensic module, when one is given.

A calibrator is any object with ``llr(scores: np.ndarray) -> np.ndarray`` of log10 LRs, as
``handclip.load_calibrator(CAL_DIR)`` returns; the verbal scale is
``handclip.forensic.verbal_equivalent(log10_lr)``. Both come from the forensic-evaluation work; this
module only looks them up, so search and serve work unchanged without them.
"""
from __future__ import annotations

import importlib
import os

import numpy as np

from handclip.errors import UserError


def load_calibration(cal_dir: str | os.PathLike | None):
    """The calibrator saved in ``cal_dir``, or None without one."""
    if cal_dir is None:
        return None
    import handclip

    load = getattr(handclip, "load_calibrator", None)
    if load is None:
        raise UserError(f"--calibration {cal_dir}: this handclip has no score calibration "
                        f"(handclip.load_calibrator is missing)")
    return load(cal_dir)


def add_likelihood_ratios(results: list[dict], calibrator) -> list[dict]:
    """Give each result (with a ``score``) its ``log10_lr`` and, where the verbal scale is available,
    its ``verbal`` equivalent; results are returned unchanged without a calibrator."""
    if calibrator is None or not results:
        return results
    log10_lrs = np.asarray(calibrator.llr(np.array([r["score"] for r in results], dtype=float)), dtype=float)
    verbal = _verbal_scale()
    for result, value in zip(results, log10_lrs):
        result["log10_lr"] = float(value)
        if verbal is not None:
            result["verbal"] = str(verbal(float(value)))
    return results


def _verbal_scale():
    try:
        return importlib.import_module("handclip.forensic").verbal_equivalent
    except (ImportError, AttributeError):
        return None
