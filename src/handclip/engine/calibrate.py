"""``handclip calibrate``: a likelihood-ratio calibrator for one checkpoint, fit on comparisons of
people the model never saw, validated subject-disjointly.

Pairs: every unordered pair of distinct images of the calibration splits (default: the aspect's
``test`` split, the identities held out of training); a pair is same-source when both images show
the same subject. Score = cosine similarity of the features ``handclip.load_model(ckpt).encode``
gives (the image cache decodes exactly as ``encode`` does). Validation LRs come from
``forensic.calibration.cross_validated_llr`` (subject-disjoint folds); the calibrator saved for
casework is then fit on every pair.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from handclip import __version__
from handclip.data.datasets import ImageDataset
from handclip.data.manifests import Sample, load_split
from handclip.data.subjects import SubjectRecord, merge_records, overlapping_subjects, subject_id
from handclip.engine.checkpoint import build_model_from_checkpoint, load_checkpoint
from handclip.engine.encoder import Encoder
from handclip.engine.features import extract_features
from handclip.errors import UserError
from handclip.fileio import atomic_directory, atomic_write_json, sha256_file
from handclip.forensic.calibration import METHODS, cross_validated_llr, fit_calibrator, subject_folds
from handclip.forensic.validation import validation_summary
from handclip.hand_datasets import DATASET_OF_ASPECT
from handclip.report.forensic_html import write_validation_report

MIN_PAIRS_PER_CLASS = 30
PAIRING = ("all unordered pairs of distinct calibration images; same-source = the same subject")


@dataclass
class CalibrateOptions:
    checkpoint: Path
    data_root: Path
    splits: Path
    aspect: str
    out: Path
    method: str = "logistic"
    calibration_splits: list[str] = field(default_factory=lambda: ["test"])
    folds: int = 5
    seed: int = 0
    batch_size: int = 128
    device: str = "auto"
    quiet: bool = False


@dataclass
class CalibrationPairs:
    samples: list[Sample]
    first: np.ndarray  # indices into samples
    second: np.ndarray
    scores: np.ndarray
    same: np.ndarray

    @property
    def first_subjects(self) -> list[str]:
        return [self.samples[i].identity for i in self.first]

    @property
    def second_subjects(self) -> list[str]:
        return [self.samples[i].identity for i in self.second]


def run_calibrate(options: CalibrateOptions) -> dict:
    """Write ``calibrator.json``, ``validation.json``, ``llrs.npz`` and ``validation.html`` (with
    its plots) into ``options.out``; returns the validation figures. Nothing is written on error."""
    if options.method not in METHODS:
        raise UserError(f"--method {options.method}: unknown (expected one of: {', '.join(METHODS)})")
    out = Path(options.out)
    check_replaceable(out, "calibrator.json")
    payload = load_checkpoint(options.checkpoint)
    samples = calibration_samples(options, training_subjects(payload, options.aspect))
    model, _ = build_model_from_checkpoint(payload, options.checkpoint)
    pairs = score_pairs(Encoder(model, device=options.device), samples, options)
    held_out = cross_validated_llr(options.method, pairs.scores, pairs.same, pairs.first_subjects,
                                   pairs.second_subjects, options.folds, options.seed)
    calibrator = fit_calibrator(options.method, pairs.scores, pairs.same)
    calibrator.info = calibration_info(options, pairs)
    validation = {"method": options.method, "folds": options.folds, "seed": options.seed,
                  "units": "log10 LR", **validation_summary(held_out, pairs.same, pairs.scores),
                  "subjects": len({s.identity for s in samples}), "images": len(samples)}
    with atomic_directory(out) as tmp:
        atomic_write_json(tmp / "calibrator.json", calibrator.to_dict())
        atomic_write_json(tmp / "validation.json", validation)
        np.savez(tmp / "llrs.npz", llr=held_out, same=pairs.same.astype(np.uint8), score=pairs.scores)
        write_validation_report(tmp, calibrator.to_dict(), validation, held_out, pairs.same)
    print(format_validation(validation))
    if not options.quiet:
        print(f"report: {out / 'validation.html'}")
    return validation


def training_subjects(payload: dict, aspect: str) -> SubjectRecord:
    """The subjects a checkpoint was trained on, through every stage and --init-from it descends from
    (its record); for a checkpoint of older handclip, its class names (``subject`` or ``subject|aspect``)
    taken as subjects of ``aspect``'s dataset."""
    record = payload.get("trained_subjects")
    if record is not None:
        return record
    dataset = DATASET_OF_ASPECT.get(aspect, aspect)
    return merge_records({dataset: [subject_id(str(name).split("|")[0]) for name in payload.get("class_names", [])]})


def calibration_samples(options: CalibrateOptions, trained_on: SubjectRecord) -> list[Sample]:
    """The calibration splits' images, each once. Checked before any image is encoded: no subject
    was a training class, both kinds of pair are numerous enough, the subjects fill the folds."""
    unique = {}
    for name in options.calibration_splits:
        for sample in load_split(options.data_root, options.splits, options.aspect, name):
            unique.setdefault(sample.path, sample)
    samples = list(unique.values())
    leaked = overlapping_subjects(trained_on, samples)
    if leaked:
        raise UserError(f"{options.checkpoint}: {len(leaked)} calibration subjects (e.g. {leaked[0][1]}) were training "
                        f"identities of this checkpoint; calibrate on people it never saw (--calibration-splits)")
    check_pair_counts(_pair_labels(samples, *np.triu_indices(len(samples), k=1)))
    subject_folds([s.identity for s in samples], options.folds, options.seed)
    return samples


def score_pairs(encoder: Encoder, samples: list[Sample], options: CalibrateOptions) -> CalibrationPairs:
    """Every pair's cosine similarity; NaN or infinite scores (broken weights) are refused."""
    dataset = ImageDataset(samples, size=encoder.image_size, cache=True, progress=not options.quiet)
    features = extract_features(encoder, dataset, batch_size=options.batch_size, progress=not options.quiet,
                                desc="encode calibration images").double()
    first, second = np.triu_indices(len(samples), k=1)
    scores = (features @ features.T).numpy()[first, second]
    bad = int((~np.isfinite(scores)).sum())
    if bad:
        raise UserError(f"{options.checkpoint}: {bad} of {len(scores)} similarity scores are NaN or infinite "
                        f"(broken weights?)")
    return CalibrationPairs(samples, first, second, scores, _pair_labels(samples, first, second))


def _pair_labels(samples: list[Sample], first: np.ndarray, second: np.ndarray) -> np.ndarray:
    identities = np.array([s.identity for s in samples], dtype=object)
    return identities[first] == identities[second]


def check_pair_counts(same: np.ndarray) -> None:
    """A calibration set needs both classes and MIN_PAIRS_PER_CLASS pairs of each."""
    n_same, n_different = int(same.sum()), int((~same).sum())
    if n_same == 0 or n_different == 0:
        missing = "same-source" if n_same == 0 else "different-source"
        raise UserError(f"the calibration set has only one class: no {missing} pair among {len(same)} pairs")
    for count, label in ((n_same, "same-source"), (n_different, "different-source")):
        if count < MIN_PAIRS_PER_CLASS:
            raise UserError(f"the calibration set has {count} {label} pairs; at least {MIN_PAIRS_PER_CLASS} are needed")


def calibration_info(options: CalibrateOptions, pairs: CalibrationPairs) -> dict:
    """What calibrator.json records besides the fit: the checkpoint, the score, counts, provenance."""
    return {
        "checkpoint": {"path": str(options.checkpoint), "sha256": sha256_file(options.checkpoint)},
        "score": "cosine similarity of handclip.load_model(checkpoint).encode features",
        "counts": {"images": len(pairs.samples), "subjects": len({s.identity for s in pairs.samples}),
                   "pairs": int(len(pairs.same)), "same_source": int(pairs.same.sum()),
                   "different_source": int((~pairs.same).sum())},
        "provenance": {"data_root": str(options.data_root), "splits": str(options.splits), "aspect": options.aspect,
                       "calibration_splits": list(options.calibration_splits), "pairing": PAIRING,
                       "validation": f"{options.folds} subject-disjoint folds (seed {options.seed})",
                       "handclip_version": __version__,
                       "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
    }


def format_validation(validation: dict) -> str:
    counts = validation["counts"]
    return (f"{validation['method']} calibration, {validation['folds']} subject-disjoint folds: "
            f"Cllr {validation['cllr']:.3f}, Cllr_min {validation['cllr_min']:.3f}, "
            f"Cllr_cal {validation['cllr_cal']:.3f}, EER {100 * validation['eer']:.2f}% | "
            f"LR > 1 for {100 * validation['same_source_lr_above_1']:.1f}% of {counts['same_source']} same-source "
            f"pairs, LR < 1 for {100 * validation['different_source_lr_below_1']:.1f}% of "
            f"{counts['different_source']} different-source pairs ({validation['subjects']} subjects)")


def check_replaceable(out: Path, marker: str) -> None:
    """``out`` is replaced whole: refuse a non-empty folder that is not an earlier output."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / marker).is_file())):
        raise UserError(f"{out}: exists and is not an earlier output (no {marker}); choose a new --out folder")
