"""Biometric verification metrics of a score: every comparison is same-source or different-source.

ISO/IEC 19795-1 terms: a comparison is accepted when its score is at least the threshold; FMR (false
match rate) = the share of different-source comparisons accepted, FNMR (false non-match rate) = the
share of same-source comparisons rejected. The operating points come from scikit-learn's
``roc_curve`` (FMR = fpr, FNMR = 1 - tpr) over every threshold (``drop_intermediate=False``).

- EER: where FNMR = FMR, linearly interpolated between the two operating points on either side
  of the crossing.
- FNMR at FMR = x: the lowest FNMR of an operating point whose FMR is at most x (the threshold an
  operator would set so that no more than a share x of different people match; NIST FRVT).
- AUC: the area under the ROC curve = the probability that a same-source pair scores higher
  than a different-source one (ties count half).

Only the order of the scores matters: any increasing transform (similarity, -distance, log LR)
gives the same numbers.

``verification_metrics_on_device`` computes the same numbers with torch where the scores are (a GPU
during evaluation): one sort, then elementwise work and one read of the device at the end.
"""
from __future__ import annotations

import io

import numpy as np
import torch
from sklearn.metrics import roc_auc_score, roc_curve

from handclip.fileio import atomic_write_bytes
from handclip.metrics import encode_ids

FMR_TARGETS = (("fnmr_at_fmr_1e-2", 1e-2), ("fnmr_at_fmr_1e-3", 1e-3))
VERIFICATION_KEYS = ("eer",) + tuple(key for key, _ in FMR_TARGETS) + ("auc",)


def verification_metrics(scores, same) -> dict | None:
    """``{"eer", "fnmr_at_fmr_1e-2", "fnmr_at_fmr_1e-3", "auc"}`` (fractions) of ``scores``
    (higher = more alike) with labels ``same`` (1 = same source); None when one class is absent."""
    scores, same = pair_arrays(scores, same)
    if same.all() or not same.any():
        return None
    fmr, tpr, _ = roc_curve(same, scores, drop_intermediate=False)
    fnmr = 1.0 - tpr
    metrics = {"eer": equal_error_rate(fmr, fnmr)}
    metrics |= {key: float(fnmr[fmr <= target].min()) for key, target in FMR_TARGETS}
    metrics["auc"] = float(roc_auc_score(same, scores))
    return metrics


def verification_metrics_on_device(scores: torch.Tensor, same: torch.Tensor) -> dict | None:
    """``verification_metrics`` of a score tensor and a boolean tensor of the same shape, computed on
    their device. The operating points are the ends of the runs of equal scores in falling order
    (``roc_curve``'s thresholds) plus the point that accepts nothing; the AUC counts, for every
    different-source pair, the same-source pairs above it and half of those tied with it."""
    scores, same = scores.reshape(-1).double(), same.reshape(-1)
    order = torch.sort(scores, descending=True, stable=True).indices
    ordered, positive = scores[order], same[order].double()
    n_pos, n_neg = positive.sum(), (1.0 - positive).sum()
    run_end = torch.ones_like(ordered, dtype=torch.bool)  # the last pair of each run of equal scores
    run_end[:-1] = ordered[1:] != ordered[:-1]
    fmr = (1.0 - positive).cumsum(0) / n_neg.clamp(min=1)
    fnmr = 1.0 - positive.cumsum(0) / n_pos.clamp(min=1)
    index = torch.arange(len(ordered), device=scores.device)

    gap = fnmr - fmr  # at the point accepting nothing: 1
    after = torch.where(run_end & (gap <= 0), index, len(ordered)).min()  # first operating point with gap <= 0
    before = torch.where(run_end & (index < after), index, -1).max()  # the operating point before it (-1: none)
    at = after.clamp(max=len(ordered) - 1)
    gap_before = torch.where(before >= 0, gap[before.clamp(min=0)], 1.0)
    fmr_before = torch.where(before >= 0, fmr[before.clamp(min=0)], 0.0)
    eer = fmr_before + gap_before / (gap_before - gap[at]) * (fmr[at] - fmr_before)

    fnmr_at = [torch.where(run_end & (fmr <= target), fnmr, 1.0).min() for _, target in FMR_TARGETS]

    run = torch.cat([torch.zeros(1, dtype=torch.long, device=scores.device), run_end[:-1].long()]).cumsum(0)
    positives_in_run = torch.zeros_like(positive).index_add_(0, run, positive)
    positives_above_run = positives_in_run.cumsum(0) - positives_in_run
    wins = (positives_above_run[run] + 0.5 * positives_in_run[run]) * (1.0 - positive)
    auc = wins.sum() / (n_pos * n_neg).clamp(min=1)

    values = torch.stack([eer, *fnmr_at, auc, n_pos, n_neg]).tolist()
    if values[-2] == 0 or values[-1] == 0:
        return None
    return dict(zip(VERIFICATION_KEYS, values[:-2]))


def equal_error_rate(fmr: np.ndarray, fnmr: np.ndarray) -> float:
    """The error rate where the FNMR and FMR curves cross; both are given per operating point,
    threshold falling (FMR rising, FNMR falling), as ``roc_curve`` orders them."""
    gap = fnmr - fmr  # falls from 1 (nothing accepted) to -1 (everything accepted)
    after = int(np.argmax(gap <= 0))  # >= 1: the first point accepts nothing (gap 1)
    before = after - 1
    weight = gap[before] / (gap[before] - gap[after])
    return float(fmr[before] + weight * (fmr[after] - fmr[before]))


def pair_labels(query_keys, gallery_keys) -> np.ndarray:
    """(Q, G) booleans: query i and gallery image j show the same source."""
    return np.asarray(query_keys, dtype=object)[:, None] == np.asarray(gallery_keys, dtype=object)[None, :]


def pair_labels_on_device(query_keys, gallery_keys, device: torch.device) -> torch.Tensor:
    """``pair_labels`` as a (Q, G) boolean tensor on ``device``."""
    query_codes, gallery_codes = (torch.from_numpy(codes).to(device) for codes in encode_ids(query_keys, gallery_keys))
    return query_codes[:, None] == gallery_codes[None, :]


def summarise_verification(per_split: list[dict | None]) -> dict:
    """results.json's ``"verification"``: mean and std over the splits that have both classes,
    and every split (None where a split has only one class)."""
    present = [split for split in per_split if split is not None]
    summary = {"mean": None, "std": None, "splits": per_split}
    if present:
        table = {key: np.array([split[key] for split in present]) for key in VERIFICATION_KEYS}
        summary["mean"] = {key: float(values.mean()) for key, values in table.items()}
        summary["std"] = {key: float(values.std()) for key, values in table.items()}
    return summary


def save_pair_scores(path, scores, same, query_images, gallery_images) -> None:
    """``scores_<i>.npz``: one entry per query x gallery pair, row-major: ``score`` (float32),
    ``same`` (0/1), ``query`` and ``gallery`` (indices into ``query_images`` / ``gallery_images``,
    the split's images as its CSV names them, also stored)."""
    scores, same = np.asarray(scores), np.asarray(same)
    query, gallery = np.indices(scores.shape, dtype=np.int32)
    buffer = io.BytesIO()
    np.savez(buffer, score=scores.astype(np.float32).ravel(), same=same.astype(np.uint8).ravel(),
             query=query.ravel(), gallery=gallery.ravel(),
             query_images=np.array(query_images, dtype=str), gallery_images=np.array(gallery_images, dtype=str))
    atomic_write_bytes(path, buffer.getvalue())


class NonFiniteValues(ValueError):
    """Scores or LLRs that hold NaN (or infinite values, where those are not allowed)."""


def pair_arrays(values, same, name: str = "scores", allow_infinite: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``values`` as a flat float array and ``same`` as a flat boolean one, of the same length;
    ``NonFiniteValues`` when a value is NaN (or infinite, unless ``allow_infinite``)."""
    values = np.asarray(values, dtype=float).ravel()
    same = np.asarray(same).ravel().astype(bool)
    if values.shape != same.shape:
        raise ValueError(f"{values.size} {name} but {same.size} labels")
    bad = np.isnan(values) if allow_infinite else ~np.isfinite(values)
    if bad.any():
        raise NonFiniteValues(f"{int(bad.sum())} of the {values.size} {name} are NaN"
                              + ("" if allow_infinite else " or infinite"))
    return values, same
