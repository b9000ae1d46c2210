"""The verbal equivalents of a likelihood ratio on the ENFSI scale.

Source: ENFSI Guideline for Evaluative Reporting in Forensic Science (European Network of Forensic
Science Institutes, 2015), its table of verbal equivalents. Bands are lower-inclusive ([2, 10) is
weak). The guideline's table starts at LR 2 and phrases support for the first proposition; an LR
below 1 is read on the same scale as 1/LR, in support of the other proposition, and an LR between
1/2 and 2 as support for neither.
"""
from __future__ import annotations

import math

ENFSI_SCALE_SOURCE = ("ENFSI Guideline for Evaluative Reporting in Forensic Science (European Network of "
                      "Forensic Science Institutes, 2015), table of verbal equivalents")
SAME_SOURCE = "the questioned and the reference image show the same person"
DIFFERENT_SOURCE = "the two images show different people"
NO_SUPPORT = "no support for either proposition"

# (lowest log10 LR of the band, its words, the LR range as the guideline prints it)
ENFSI_BANDS = (
    (math.log10(2), "weak support", "2 - 10"),
    (1.0, "moderate support", "10 - 100"),
    (2.0, "moderately strong support", "100 - 1,000"),
    (3.0, "strong support", "1,000 - 10,000"),
    (4.0, "very strong support", "10,000 - 1,000,000"),
    (6.0, "extremely strong support", "1,000,000 and above"),
)


def verbal_equivalent(log10_lr: float) -> str:
    """The ENFSI verbal equivalent of a log10 LR, naming the proposition it supports, e.g.
    ``"moderate support for the same-source proposition"`` for an LR of 50."""
    if math.isnan(log10_lr):
        raise ValueError("the log10 LR is NaN: it has no verbal equivalent")
    strength = support_band(abs(float(log10_lr)))
    if strength is None:
        return NO_SUPPORT
    side = "same-source" if log10_lr > 0 else "different-source"
    return f"{strength} for the {side} proposition"


def support_band(log10_lr: float) -> str | None:
    """The words of the band holding ``log10_lr`` (>= 0), or None below LR 2."""
    words = None
    for lowest, band_words, _ in ENFSI_BANDS:
        if log10_lr >= lowest:
            words = band_words
    return words


def scale_table() -> list[dict]:
    """The scale as printed in reports: ``[{"lr": "2 - 10", "verbal": "weak support"}, ...]``,
    after handclip's reading of LRs below 2 (not in the guideline's table)."""
    below = {"lr": "1/2 - 2 (below the guideline's table)", "verbal": NO_SUPPORT}
    return [below] + [{"lr": lr_range, "verbal": words} for _, words, lr_range in ENFSI_BANDS]
