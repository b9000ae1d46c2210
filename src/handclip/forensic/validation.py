"""Validation of likelihood ratios (Meuwly, Ramos & Haraksim, FSI 276, 2017): Cllr, Cllr_min,
Cllr_cal and the empirical cross-entropy. All LRs are log10 LRs; labels ``same`` are 1 for
same-source pairs (proposition Hp) and 0 for different-source pairs (Hd).
"""
from __future__ import annotations

import numpy as np
from sklearn.isotonic import IsotonicRegression

from handclip.forensic.verification import pair_arrays, verification_metrics

LN10 = np.log(10.0)


def cllr(llr, same) -> float:
    """The log-likelihood-ratio cost (Brümmer & du Preez, Computer Speech and Language 20, 2006):

        Cllr = ½ [ mean over Hp of log2(1 + 1/LR) + mean over Hd of log2(1 + LR) ]

    0 for perfect LRs, 1 for a system that always says LR = 1; above 1 the LRs mislead. LRs of 0
    or infinity are allowed (a misleading one costs infinity)."""
    llr, same = _checked(llr, same, finite=False)
    return 0.5 * (float(np.mean(_log2_one_plus_lr(-llr[same]))) + float(np.mean(_log2_one_plus_lr(llr[~same]))))


def pav_llr(llr, same) -> np.ndarray:
    """The LLRs after the pool-adjacent-violators algorithm: the non-decreasing transform of ``llr``
    whose posterior best fits the labels (isotonic regression, as Brümmer & du Preez 2006 define Cllr_min),
    turned back into LLRs by removing the data's prior log odds. Ties are pooled. Finite LLRs in;
    ±inf out where a pool holds one class only."""
    llr, same = _checked(llr, same, finite=True)
    posterior = IsotonicRegression(y_min=0.0, y_max=1.0).fit_transform(llr, same.astype(float))
    prior_log_odds = np.log10(same.sum() / (~same).sum())
    with np.errstate(divide="ignore"):
        return np.log10(posterior) - np.log10(1.0 - posterior) - prior_log_odds


def cllr_min(llr, same) -> float:
    """Cllr after PAV: the cost left when calibration is perfect (discrimination only)."""
    return cllr(pav_llr(llr, same), same)


def empirical_cross_entropy(llr, same, prior_log10_odds) -> np.ndarray:
    """ECE at each prior log10 odds o (Ramos, Gonzalez-Rodriguez, Zadora & Aitken, J. Forensic
    Sci. 58, 2013):

        ECE = P(Hp) · mean over Hp of log2(1 + 1/(LR·O)) + P(Hd) · mean over Hd of log2(1 + LR·O)

    with O = 10^o and P(Hp) = O / (1 + O). At o = 0, ECE = Cllr."""
    llr, same = _checked(llr, same, finite=False)
    llr_same, llr_different = llr[same], llr[~same]
    ece = []
    for odds in np.asarray(prior_log10_odds, dtype=float).ravel():  # one prior at a time: pairs may be millions
        p_same = 1.0 / (1.0 + 10.0 ** -odds)
        ece.append(p_same * np.mean(_log2_one_plus_lr(-(llr_same + odds)))
                   + (1.0 - p_same) * np.mean(_log2_one_plus_lr(llr_different + odds)))
    return np.array(ece)


def validation_summary(llr, same, scores) -> dict:
    """validation.json's figures: Cllr, Cllr_min, Cllr_cal of the LLRs, the EER of the scores,
    how often the LR points the right way, the LLR range and the pair counts."""
    llr, same = _checked(llr, same, finite=True)
    total, minimum = cllr(llr, same), cllr_min(llr, same)
    return {
        "cllr": total,
        "cllr_min": minimum,
        "cllr_cal": total - minimum,
        "eer": verification_metrics(scores, same)["eer"],
        "same_source_lr_above_1": float(np.mean(llr[same] > 0)),
        "different_source_lr_below_1": float(np.mean(llr[~same] < 0)),
        "log10_lr_range": [float(llr.min()), float(llr.max())],
        "counts": {"pairs": int(len(same)), "same_source": int(same.sum()), "different_source": int((~same).sum())},
    }


def _log2_one_plus_lr(llr: np.ndarray) -> np.ndarray:
    """log2(1 + 10^llr) without overflow; 0 at llr = -inf, inf at +inf."""
    return np.logaddexp(0.0, llr * LN10) / np.log(2.0)


def _checked(llr, same, finite: bool) -> tuple[np.ndarray, np.ndarray]:
    llr, same = pair_arrays(llr, same, "LLRs", allow_infinite=not finite)
    if same.all() or not same.any():
        raise ValueError("the pairs need both same-source and different-source examples")
    return llr, same
