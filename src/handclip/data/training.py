"""What a training run reads: train and val samples of one or several aspects, and the class map."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from handclip.data.manifests import Sample, load_split
from handclip.data.subjects import subject_key, subject_keys
from handclip.errors import UserError


def identity_key(sample: Sample, mode: str = "subject") -> str:
    """The class a sample belongs to: the person, or the person's hand aspect (cross-aspect runs)."""
    return sample.identity if mode == "subject" else f"{sample.identity}|{sample.aspect}"


@dataclass
class TrainingData:
    train: list[Sample]
    val: list[Sample]
    class_names: list[str]  # label index → identity key
    identity_mode: str

    @property
    def samples(self) -> list[Sample]:
        """Train then val: one dataset (and one image cache) holds both."""
        return self.train + self.val

    @property
    def labels(self) -> list[int]:
        index = {name: i for i, name in enumerate(self.class_names)}
        return [index[identity_key(s, self.identity_mode)] for s in self.train]

    @property
    def val_indices(self) -> range:
        return range(len(self.train), len(self.train) + len(self.val))

    @property
    def train_indices(self) -> range:
        return range(len(self.train))


def load_training_data(data_root: str | Path, splits: str | Path, aspects: list[str],
                       identity_mode: str = "subject", held_out_aspects: Sequence[str] = ()) -> TrainingData:
    """Train and val samples of ``aspects``. A subject who is a test identity in any of ``aspects``
    or ``held_out_aspects`` (the other stages of a sequential run) is left out of training
    altogether: the 11k thresholds differ per aspect (1050/1037/1051/1042), and training on one hand
    of a person tested on another would leak. Subjects are told apart per dataset (11k, HD)."""
    train, val = [], []
    for aspect in aspects:
        train += load_split(data_root, splits, aspect, "train")
        val += load_split(data_root, splits, aspect, "val")
    touched = list(dict.fromkeys([*aspects, *held_out_aspects]))
    if len(touched) > 1:
        tested = subject_keys(s for aspect in touched for s in load_split(data_root, splits, aspect, "test"))
        train = [s for s in train if subject_key(s) not in tested]
        val = [s for s in val if subject_key(s) not in tested]
    if not train:
        raise UserError(f"{splits}: the train split of {','.join(aspects)} is empty")
    class_names = sorted({identity_key(s, identity_mode) for s in train})
    return TrainingData(train=train, val=val, class_names=class_names, identity_mode=identity_mode)
