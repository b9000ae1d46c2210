"""Pictures of verification and likelihood-ratio validation, from score / LLR arrays.

DET curve and score histogram (evaluation); Tippett, empirical cross-entropy (ECE) and PAV plots
(calibration, Meuwly, Ramos & Haraksim 2017). Drawn like ``report.plots``: on the Agg canvas.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure
from scipy.stats import norm
from sklearn.metrics import det_curve

from handclip.forensic.validation import empirical_cross_entropy, pav_llr
from handclip.report.plots import _save

SAME_COLOUR, DIFFERENT_COLOUR = "tab:blue", "tab:red"
DET_TICKS = (0.001, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8)


def plot_det(scores, same, path, title: str = "DET") -> Path:
    """FNMR against FMR on normal-deviate axes (Martin et al. 1997), from ``det_curve``."""
    scores, same = _flat(scores, same)
    fmr, fnmr, _ = det_curve(same, scores)
    shown = (fmr > 0) & (fmr < 1) & (fnmr > 0) & (fnmr < 1)  # 0 and 1 lie at ±infinity
    figure = Figure(figsize=(5, 5))
    axes = figure.add_subplot()
    axes.plot(norm.ppf(fmr[shown]), norm.ppf(fnmr[shown]), color=SAME_COLOUR)
    ticks = norm.ppf(DET_TICKS)
    labels = [f"{100 * t:g}" for t in DET_TICKS]
    axes.set_xticks(ticks, labels)
    axes.set_yticks(ticks, labels)
    axes.set(xlim=(ticks[0], ticks[-1]), ylim=(ticks[0], ticks[-1]), xlabel="false match rate (%)",
             ylabel="false non-match rate (%)", title=title)
    axes.plot(ticks[[0, -1]], ticks[[0, -1]], color="grey", linestyle=":", linewidth=1, label="FMR = FNMR")
    axes.grid(alpha=0.3)
    axes.legend(loc="upper right")
    return _save(figure, path)


def plot_score_histogram(scores, same, path, title: str = "Scores") -> Path:
    """Density histograms of same-source and different-source scores."""
    scores, same = _flat(scores, same)
    figure = Figure(figsize=(6, 4))
    axes = figure.add_subplot()
    bins = np.linspace(scores.min(), scores.max(), 41) if np.ptp(scores) > 0 else 10
    for mask, colour, label in ((~same, DIFFERENT_COLOUR, "different source"), (same, SAME_COLOUR, "same source")):
        axes.hist(scores[mask], bins=bins, density=True, alpha=0.5, color=colour, label=f"{label} ({mask.sum()})")
    axes.set(xlabel="score (cosine similarity)", ylabel="density", title=title)
    axes.legend()
    return _save(figure, path)


def plot_tippett(llr, same, path, case_llrs: Sequence[float] = (), title: str = "Tippett plot") -> Path:
    """Share of same- and different-source pairs whose log10 LR exceeds each value; ``case_llrs``
    are drawn as vertical lines (the comparisons of a case)."""
    llr, same = _flat(llr, same)
    figure = Figure(figsize=(6, 4.2))
    axes = figure.add_subplot()
    for mask, colour, label in ((same, SAME_COLOUR, "same source"), (~same, DIFFERENT_COLOUR, "different source")):
        values = np.sort(llr[mask])
        exceeding = 1.0 - np.arange(1, len(values) + 1) / len(values)
        axes.step(np.r_[values[0], values], np.r_[1.0, exceeding], where="post", color=colour,
                  label=f"{label} ({mask.sum()})")
    for index, value in enumerate(case_llrs):
        axes.axvline(value, color="black", linestyle="--", linewidth=1,
                     label="this case" if index == 0 else None)
    axes.axvline(0, color="grey", linewidth=0.8)
    axes.set(xlabel="log10 LR", ylabel="share of pairs with a larger log10 LR", ylim=(0, 1.02), title=title)
    axes.grid(alpha=0.3)
    axes.legend()
    return _save(figure, path)


def plot_ece(llr, same, path, title: str = "Empirical cross-entropy") -> Path:
    """ECE against the prior log10 odds for the LRs, after PAV (perfect calibration) and for a
    neutral system (LR = 1)."""
    odds = np.linspace(-2.5, 2.5, 101)
    figure = Figure(figsize=(6, 4.2))
    axes = figure.add_subplot()
    axes.plot(odds, empirical_cross_entropy(llr, same, odds), color=SAME_COLOUR, label="LRs")
    axes.plot(odds, empirical_cross_entropy(pav_llr(llr, same), same, odds), color="tab:green", linestyle="--",
              label="after PAV (calibrated)")
    axes.plot(odds, empirical_cross_entropy(np.zeros(len(same)), same, odds), color="grey", linestyle=":",
              label="neutral (LR = 1)")
    axes.set(xlabel="prior log10 odds", ylabel="empirical cross-entropy (bits)", title=title)
    axes.grid(alpha=0.3)
    axes.legend()
    return _save(figure, path)


def plot_pav(llr, same, path, title: str = "PAV: calibrated vs. reported log10 LR") -> Path:
    """Each pair's log10 LR after PAV against the reported one; on the diagonal = well calibrated."""
    llr = np.asarray(llr, dtype=float)
    calibrated = pav_llr(llr, same)
    finite = np.isfinite(calibrated)
    order = np.argsort(llr[finite], kind="stable")
    figure = Figure(figsize=(5, 5))
    axes = figure.add_subplot()
    axes.plot(llr[finite][order], calibrated[finite][order], color=SAME_COLOUR, label="PAV")
    limits = (float(llr.min()) - 0.2, float(llr.max()) + 0.2)
    axes.plot(limits, limits, color="grey", linestyle=":", label="perfect calibration")
    axes.set(xlabel="reported log10 LR", ylabel="log10 LR after PAV", xlim=limits, title=title)
    axes.grid(alpha=0.3)
    axes.legend()
    return _save(figure, path)


def _flat(values, same) -> tuple[np.ndarray, np.ndarray]:
    """Any shape (a (Q, G) score matrix) as 1-D float values and boolean labels."""
    return np.asarray(values, dtype=float).ravel(), np.asarray(same).astype(bool).ravel()
