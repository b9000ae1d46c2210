"""Forensic evaluation: verification metrics, likelihood ratios from calibrated scores, their
validation, and the ENFSI verbal scale.

    import handclip
    calibrator = handclip.load_calibrator("cal/dorsal_r")          # made by `handclip calibrate`
    log10_lr = calibrator.llr(scores)                              # cosine similarities in, ELUB-bounded
    handclip.forensic.verbal_equivalent(log10_lr[0])               # "moderate support for the same-source ..."

- ``verification``: EER, FNMR at fixed FMR, ROC AUC of same- vs different-source scores.
- ``calibration``: logistic / isotonic / KDE calibrators, ELUB bounds, subject-disjoint folds.
- ``validation``: Cllr, Cllr_min, Cllr_cal, empirical cross-entropy.
- ``verbal``: the ENFSI (2015) verbal equivalents.
"""
from handclip.forensic.verbal import ENFSI_SCALE_SOURCE, verbal_equivalent

__all__ = ["ENFSI_SCALE_SOURCE", "load_calibrator", "verbal_equivalent"]


def load_calibrator(path):
    """The calibrator of ``CAL_DIR/calibrator.json``; ``.llr(scores)`` gives bounded log10 LRs."""
    from handclip.forensic.calibration import load_calibrator as _load_calibrator

    return _load_calibrator(path)
