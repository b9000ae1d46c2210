"""Score-to-likelihood-ratio calibrators, their ELUB bounds, subject-disjoint cross-validation,
and the calibrator file ``calibrator.json``.

A calibrator turns a similarity score into log10 LR = log10 p(score | same source) / p(score |
different sources). Every method treats the two classes as equally probable (class-balanced
weights), so what it fits is the LR itself and not posterior odds of the calibration set's mix.

- ``logistic``: log10 LR = a · score + b by logistic regression (Morrison, Australian J. Forensic
  Sci. 45, 2013), unregularised.
- ``isotonic``: the non-decreasing step-wise posterior of isotonic regression / PAV (Zadrozny &
  Elkan, KDD 2002; Brümmer & du Preez 2006), linearly interpolated between its steps.
- ``kde``: the ratio of Gaussian kernel density estimates of the two classes' scores (scipy's
  ``gaussian_kde``, Scott's bandwidth) on a grid over the calibration scores, made
  non-decreasing by isotonic regression over the grid (a higher similarity never lowers the LR).

Every LR is then clipped to the empirical lower and upper bounds (ELUB, Vergeer et al., Science &
Justice 56, 2016) of the calibration set, so that n comparisons never claim more than they support.
Scores outside the calibration range get the LR of the nearest calibrated score (isotonic, KDE) or
the logistic line's, bounded.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.stats import gaussian_kde
from sklearn.exceptions import ConvergenceWarning
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression

from handclip.errors import UserError
from handclip.fileio import check_format
from handclip.forensic.verification import NonFiniteValues, pair_arrays

METHODS = ("logistic", "isotonic", "kde")
CALIBRATOR_FORMAT = "handclip-calibrator"
CALIBRATOR_VERSION = 1
ELUB_STEP = 0.01  # log10 LR resolution of the bounds, as in Vergeer et al.
KDE_GRID_POINTS = 256
KDE_LLR_LIMIT = 20.0  # keeps tail ratios finite before the monotone fit; ELUB bounds far tighter
LN10 = np.log(10.0)


@dataclass
class Calibrator:
    """A fitted calibrator. ``llr(scores)`` gives ELUB-bounded log10 LRs; ``info`` holds what
    calibrator.json records besides the fit (checkpoint, counts, provenance)."""

    method: str
    parameters: dict
    lower: float  # log10 LR bounds
    upper: float
    info: dict = field(default_factory=dict)

    def llr(self, scores) -> np.ndarray:
        """log10 LRs of cosine-similarity ``scores`` (any shape), clipped to the ELUB bounds."""
        scores = np.asarray(scores, dtype=float)
        if not np.isfinite(scores).all():
            raise UserError(f"{int((~np.isfinite(scores)).sum())} of the similarity scores are NaN or infinite")
        return np.clip(raw_llr(self.method, self.parameters, scores), self.lower, self.upper)

    @property
    def checkpoint_sha256(self) -> str | None:
        return self.info.get("checkpoint", {}).get("sha256")

    def to_dict(self) -> dict:
        return {"format": CALIBRATOR_FORMAT, "version": CALIBRATOR_VERSION, "method": self.method,
                "parameters": self.parameters,
                "bounds": {"log10_lr_lower": self.lower, "log10_lr_upper": self.upper,
                           "method": "ELUB (Vergeer et al., Science & Justice 56, 2016)"},
                **self.info}


def fit_calibrator(method: str, scores, same) -> Calibrator:
    """Fit ``method`` on (score, same-source label) pairs and bound it with ELUB on those pairs."""
    if method not in METHODS:
        raise UserError(f"--method {method}: unknown calibration method (expected one of: {', '.join(METHODS)})")
    scores, same = _pairs(scores, same)
    parameters = FITTERS[method](scores, same)
    lower, upper = elub_bounds(raw_llr(method, parameters, scores), same)
    return Calibrator(method, parameters, float(lower), float(upper))


def raw_llr(method: str, parameters: dict, scores: np.ndarray) -> np.ndarray:
    """Unbounded log10 LRs (±inf possible for isotonic)."""
    if method == "logistic":
        return parameters["slope"] * scores + parameters["intercept"]
    if method == "isotonic":
        posterior = np.interp(scores, parameters["scores"], parameters["posterior"])
        with np.errstate(divide="ignore"):
            return np.log10(posterior) - np.log10(1.0 - posterior)
    return np.interp(scores, parameters["scores"], parameters["log10_lr"])


def _class_weights(same: np.ndarray) -> np.ndarray:
    """Weights that give both classes the same total: the fit then estimates the LR."""
    return np.where(same, 0.5 / same.sum(), 0.5 / (~same).sum()) * len(same)


def _fit_logistic(scores: np.ndarray, same: np.ndarray) -> dict:
    model = LogisticRegression(C=np.inf, class_weight="balanced")
    with warnings.catch_warnings():  # separable scores: the slope grows until the solver stops; ELUB bounds it
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(scores[:, None], same)
    return {"slope": float(model.coef_[0, 0] / LN10), "intercept": float(model.intercept_[0] / LN10)}


def _fit_isotonic(scores: np.ndarray, same: np.ndarray) -> dict:
    model = IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip")
    model.fit(scores, same.astype(float), sample_weight=_class_weights(same))
    return {"scores": model.X_thresholds_.tolist(), "posterior": model.y_thresholds_.tolist()}


def _fit_kde(scores: np.ndarray, same: np.ndarray) -> dict:
    for label, values in (("same-source", scores[same]), ("different-source", scores[~same])):
        if np.ptp(values) == 0:
            raise UserError(f"kde calibration needs at least two different {label} scores")
    grid = np.linspace(scores.min(), scores.max(), KDE_GRID_POINTS)
    log_ratio = gaussian_kde(scores[same]).logpdf(grid) - gaussian_kde(scores[~same]).logpdf(grid)
    llr = np.clip(np.nan_to_num(log_ratio / LN10, nan=0.0), -KDE_LLR_LIMIT, KDE_LLR_LIMIT)
    monotone = IsotonicRegression().fit_transform(grid, llr)
    return {"scores": grid.tolist(), "log10_lr": monotone.tolist()}


FITTERS = {"logistic": _fit_logistic, "isotonic": _fit_isotonic, "kde": _fit_kde}


def elub_bounds(llr, same, step: float = ELUB_STEP) -> tuple[float, float]:
    """Empirical lower and upper bound log10 LRs (Vergeer, van Es, de Jongh, Alberink & Stoel,
    Science & Justice 56, 2016).

    For a decision threshold t (accept Hp when log10 LR > t) the normalised Bayes error of the
    LRs, with one misleading pair added to each class (a same-source pair never accepted, a
    different-source pair always accepted), is

        E(t) = (misses + 1) / (n_Hp + 1) + 10^t · (false accepts + 1) / (n_Hd + 1),

    and a neutral system (LR = 1 always) has E = min(1, 10^t). The bounds are the thresholds
    nearest 0 on either side where the LRs do worse than neutral, moved one step towards 0;
    thresholds run over the LRs' range, at most ±log10(n + 1) of the opposite class. A bound
    never crosses 0.
    """
    llr = np.asarray(llr, dtype=float)
    same = np.asarray(same).astype(bool)
    llr_same, llr_different = np.sort(llr[same]), np.sort(llr[~same])
    low = max(llr.min(), -np.log10(len(llr_same) + 1))
    high = min(llr.max(), np.log10(len(llr_different) + 1))
    thresholds = step * np.arange(min(0, int(np.floor(low / step))), max(0, int(np.floor(high / step)) + 1) + 1)
    misses = np.searchsorted(llr_same, thresholds, side="right")
    false_accepts = len(llr_different) - np.searchsorted(llr_different, thresholds, side="right")
    error = (misses + 1) / (len(llr_same) + 1) + 10.0 ** thresholds * (false_accepts + 1) / (len(llr_different) + 1)
    worse = error > np.minimum(1.0, 10.0 ** thresholds)
    lower = np.max(thresholds[(thresholds <= 0) & worse] + step, initial=thresholds.min())
    upper = np.min(thresholds[(thresholds >= 0) & worse] - step, initial=thresholds.max())
    return float(min(lower, 0.0)), float(max(upper, 0.0))


def subject_folds(subjects, folds: int, seed: int = 0) -> dict[str, int]:
    """Each subject's fold: subjects in sorted order, shuffled with ``seed``, dealt into ``folds``
    groups of (nearly) equal size."""
    unique = sorted(set(subjects))
    if folds < 3:
        raise UserError(f"--folds {folds}: need at least 3 folds (a pair across two folds is fit on the others)")
    if folds > len(unique):
        raise UserError(f"--folds {folds}: the calibration set has only {len(unique)} subjects")
    order = np.random.default_rng(seed).permutation(len(unique))
    return {unique[index]: position % folds for position, index in enumerate(order)}


def cross_validated_llr(method: str, scores, same, first_subject, second_subject, folds: int = 5,
                        seed: int = 0) -> np.ndarray:
    """Held-out, bounded log10 LRs: no pair's LR comes from a calibrator fit on a pair that shares
    a subject with it.

    Subjects are dealt into ``folds`` folds (``subject_folds``). A pair whose two subjects lie in
    folds i and j (i = j for same-source pairs and pairs within one fold) gets its LR from a
    calibrator (with its own ELUB bounds) fit on the pairs whose subjects both lie outside folds i
    and j. Every pair is scored once; there are folds·(folds+1)/2 fits.
    """
    scores, same = _pairs(scores, same)
    fold_of = subject_folds(list(first_subject) + list(second_subject), folds, seed)
    first = np.array([fold_of[s] for s in first_subject])
    second = np.array([fold_of[s] for s in second_subject])
    low, high = np.minimum(first, second), np.maximum(first, second)
    llr = np.empty(len(scores))
    for i in range(folds):
        for j in range(i, folds):
            held_out = (low == i) & (high == j)
            if not held_out.any():
                continue
            train = ~np.isin(first, (i, j)) & ~np.isin(second, (i, j))
            _require_both_classes(same[train], f"--folds {folds}: fitting the pairs of folds {i} and {j} on the "
                                               f"other folds' subjects")
            llr[held_out] = fit_calibrator(method, scores[train], same[train]).llr(scores[held_out])
    return llr


def load_calibrator(path) -> Calibrator:
    """``handclip.load_calibrator(CAL_DIR)``: the calibrator of ``CAL_DIR/calibrator.json`` (or of
    that file itself). Any problem is one ``UserError`` naming the file."""
    path = Path(path)
    file = path / "calibrator.json" if path.is_dir() else path
    try:
        data = json.loads(file.read_text())
    except FileNotFoundError:
        raise UserError(f"{file}: not found (a calibration folder made by `handclip calibrate`)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{file}: not a readable calibrator ({exc})") from None
    check_format(data, file, "calibrator", CALIBRATOR_FORMAT, CALIBRATOR_VERSION)
    try:
        method, parameters, bounds = data["method"], data["parameters"], data["bounds"]
        lower, upper = float(bounds["log10_lr_lower"]), float(bounds["log10_lr_upper"])
        if method not in METHODS:
            raise ValueError(f"unknown method '{method}'")
        raw_llr(method, parameters, np.zeros(1))
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{file}: malformed calibrator ({type(exc).__name__}: {exc})") from None
    info = {k: v for k, v in data.items() if k not in ("format", "version", "method", "parameters", "bounds")}
    return Calibrator(method, parameters, lower, upper, info)


def _pairs(scores, same) -> tuple[np.ndarray, np.ndarray]:
    try:
        scores, same = pair_arrays(scores, same, "similarity scores")
    except NonFiniteValues as exc:  # a model that gives NaN features: the user's checkpoint
        raise UserError(str(exc)) from None
    _require_both_classes(same, "calibration")
    return scores, same


def _require_both_classes(same: np.ndarray, what: str) -> None:
    if not same.any() or same.all():
        missing = "same-source" if not same.any() else "different-source"
        raise UserError(f"{what} has only one class: no {missing} pair")
