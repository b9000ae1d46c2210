"""The hand datasets handclip knows, one table entry each: aspects, the published train/test id
thresholds, what a download's root holds, and gallery distractors. A leaf (no imports): config,
data, published, the CLI and the benchmark all read it, so a third dataset is one entry here plus
its reader in :mod:`handclip.data.prepare`."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HandDataset:
    name: str  # the key: `handclip prepare NAME`, a subject record's dataset
    title: str
    aspects: tuple[str, ...]
    train_id_threshold: dict[str, int]  # aspect → train_all = subject ids <= this; test = the rest
    root_entries: tuple[str, ...]  # what a download's root holds (checked before anything runs)
    distractors: str | None = None  # subfolder whose images join every gallery (never queries)


HAND_DATASETS = {
    "11k": HandDataset(
        name="11k", title="11k Hands", aspects=("dorsal_r", "dorsal_l", "palmar_r", "palmar_l"),
        # MBA-Net / GPA-Net protocol.
        train_id_threshold={"dorsal_r": 1050, "dorsal_l": 1037, "palmar_r": 1051, "palmar_l": 1042},
        root_entries=("HandInfo.csv", "Hands")),
    "hd": HandDataset(
        name="hd", title="HK PolyU HD", aspects=("hd",), train_id_threshold={"hd": 447},
        root_entries=("Original Images",), distractors="502-712"),
}

ALL_ASPECTS = tuple(aspect for dataset in HAND_DATASETS.values() for aspect in dataset.aspects)
# Which dataset's id space an aspect's subject ids belong to: 11k and HD ids overlap numerically.
DATASET_OF_ASPECT = {aspect: dataset.name for dataset in HAND_DATASETS.values() for aspect in dataset.aspects}

ASPECTS_11K = HAND_DATASETS["11k"].aspects
ASPECT_HD = "hd"
TRAIN_ID_THRESHOLD_11K = HAND_DATASETS["11k"].train_id_threshold
TRAIN_ID_THRESHOLD_HD = HAND_DATASETS["hd"].train_id_threshold[ASPECT_HD]
# HandInfo.csv's aspectOfHand → our key.
ASPECT_FROM_11K_LABEL = {
    "dorsal right": "dorsal_r",
    "dorsal left": "dorsal_l",
    "palmar right": "palmar_r",
    "palmar left": "palmar_l",
}
# Offsets the published code adds to other aspects' ids in gallery_i_all.
GALLERY_ALL_OFFSETS = (11000000, 21000000, 31000000)


def dataset_of(aspect: str) -> HandDataset:
    return HAND_DATASETS[DATASET_OF_ASPECT[aspect]]
