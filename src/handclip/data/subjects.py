"""Which people a model was trained on, and whether an evaluation tests any of them.

A record maps a dataset ("11k", "hd": their subject ids overlap numerically) to the sorted subject
ids trained on. Ids are compared in canonical form (``0001040`` and ``1040`` are one person), so
splits from ``handclip prepare`` and from an older folder tree agree.
"""
from __future__ import annotations

from typing import Iterable

from handclip.hand_datasets import DATASET_OF_ASPECT

SubjectRecord = dict[str, list[str]]


def subject_id(identity: str) -> str:
    """The canonical subject id: numbers without leading zeros, anything else stripped."""
    identity = identity.strip()
    return str(int(identity)) if identity.isdigit() else identity


def subject_key(sample) -> tuple[str, str]:
    """(dataset, canonical subject id) of a sample (anything with ``identity`` and ``aspect``)."""
    return DATASET_OF_ASPECT.get(sample.aspect, sample.aspect), subject_id(sample.identity)


def subject_keys(samples: Iterable) -> set[tuple[str, str]]:
    return {subject_key(s) for s in samples}


def subject_record(samples: Iterable) -> SubjectRecord:
    """The record of the subjects in ``samples``: dataset → sorted subject ids."""
    return merge_records(_as_record(subject_keys(samples)))


def merge_records(*records: SubjectRecord) -> SubjectRecord:
    merged: dict[str, set[str]] = {}
    for record in records:
        for dataset, subjects in record.items():
            merged.setdefault(dataset, set()).update(subjects)
    return {dataset: sorted(merged[dataset], key=_numeric_first) for dataset in sorted(merged)}


def overlapping_subjects(record: SubjectRecord, samples: Iterable) -> list[tuple[str, str]]:
    """(dataset, subject) pairs of ``samples`` that ``record`` was trained on, sorted."""
    trained = {(dataset, subject) for dataset, subjects in record.items() for subject in subjects}
    return sorted(subject_keys(samples) & trained, key=lambda key: (key[0], _numeric_first(key[1])))


def _as_record(keys: Iterable[tuple[str, str]]) -> SubjectRecord:
    record: dict[str, list[str]] = {}
    for dataset, subject in keys:
        record.setdefault(dataset, []).append(subject)
    return record


def _numeric_first(subject: str) -> tuple:
    return (0, int(subject), "") if subject.isdigit() else (1, 0, subject)
