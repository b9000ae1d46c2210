"""Split manifests: the CSV files ``handclip prepare`` writes, and the folder trees of older tools.

A split is a list of :class:`Sample`. On disk it is either

* a CSV ``<splits>/<aspect>/<name>.csv`` with the header ``image,identity,aspect`` (``image`` is
  relative to the dataset root, with ``/``), or
* the folder tree the published code (MBA-Net) writes by copying images:
  ``<splits>/train_val_test_split_<aspect>/<folder>/<identity>/<file>``, where ``<folder>`` is
  ``train``, ``val``, ``train_all``, ``test``, ``query<i>``, ``gallery<i>`` or ``gallery<i>_all``
  (``query_<i>`` etc. are accepted too). ``splits`` may also point at such a folder directly.

Identities in ``gallery_<i>_all``: the CSV keeps every image's true subject id in ``identity`` and
its true aspect in ``aspect``; evaluation tells other-aspect distractors apart by the pair
(identity, aspect). The folder tree has no aspect column, so the published code adds
11000000 / 21000000 / 31000000 to the other aspects' ids instead, in an order that depends on the
query aspect (:data:`GALLERY_ALL_ORDER`). :func:`write_folder_tree` writes those offsets and
reading a tree maps them back to (7-digit 11k id, aspect), so both forms give the same samples.
"""
from __future__ import annotations

import csv
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

from handclip.hand_datasets import ALL_ASPECTS, GALLERY_ALL_OFFSETS
from handclip.errors import UserError
from handclip.fileio import atomic_write_csv

CSV_HEADER = ("image", "identity", "aspect")
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp"})
TREE_PREFIX = "train_val_test_split"
# For each query aspect, the other aspects in the order the published code gives them the
# GALLERY_ALL_OFFSETS (its gallery_all script, cases 1-4).
GALLERY_ALL_ORDER = {
    "dorsal_r": ("dorsal_l", "palmar_r", "palmar_l"),
    "dorsal_l": ("dorsal_r", "palmar_r", "palmar_l"),
    "palmar_r": ("dorsal_l", "dorsal_r", "palmar_l"),
    "palmar_l": ("palmar_r", "dorsal_r", "dorsal_l"),
}
_OFFSET_BAND = 10_000_000  # the offsets are 10M apart; real 11k ids are below 2M
_FIXED_SPLITS = ("train", "val", "train_all", "test")
_NUMBERED_SPLIT = re.compile(r"^(query|gallery)_(\d+)(_all)?$")


@dataclass(frozen=True)
class Sample:
    image: str  # path relative to the dataset root, with '/' (absolute for tree files outside it)
    identity: str
    aspect: str
    path: Path  # absolute file path on disk


# ---- CSV ------------------------------------------------------------------------------------------
def write_split_csv(path: str | os.PathLike, rows: Iterable[Sample]) -> None:
    """Write ``rows`` (anything with ``image``, ``identity``, ``aspect``) atomically."""
    atomic_write_csv(path, CSV_HEADER, ((row.image, row.identity, row.aspect) for row in rows))


def read_split_csv(csv_path: str | os.PathLike, data_root: str | os.PathLike) -> list[Sample]:
    csv_path, root = Path(csv_path), Path(data_root).resolve()
    try:
        with open(csv_path, newline="", encoding="utf-8") as f:
            lines = list(csv.reader(f))
    except FileNotFoundError:
        raise UserError(f"{csv_path}: split file not found") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"{csv_path}: not a readable CSV ({exc})") from None
    if not lines or tuple(lines[0]) != CSV_HEADER:
        raise UserError(f"{csv_path}: the header must be exactly {','.join(CSV_HEADER)}")
    samples = []
    for line_number, fields in enumerate(lines[1:], start=2):
        if len(fields) != 3 or not all(fields):
            raise UserError(f"{csv_path}:{line_number}: expected 3 non-empty fields image,identity,aspect")
        image, identity, aspect = fields
        samples.append(Sample(image, identity, aspect, root / image))
    _require_images_exist(samples, csv_path, root)
    return samples


def _require_images_exist(samples: list[Sample], source: Path, root: Path) -> None:
    """Fail early and clearly when --data is not the root the split was made for."""
    missing = [s for s in samples if not s.path.is_file()]
    if missing:
        raise UserError(f"{source}: {len(missing)} of {len(samples)} images not found under {root}, "
                        f"e.g. {missing[0].image} (is --data the dataset root?)")


# ---- split lookup ---------------------------------------------------------------------------------
def load_split(data_root: str | os.PathLike, splits: str | os.PathLike, aspect: str, name: str) -> list[Sample]:
    """The samples of split ``name`` (train, val, train_all, test, query_<i>, gallery_<i>,
    gallery_<i>_all) of ``aspect``, from a ``handclip prepare`` folder or an older tools' tree."""
    _check_split_name(name)
    splits = _existing_splits(splits)
    csv_path = splits / aspect / f"{name}.csv"
    if csv_path.is_file():
        return read_split_csv(csv_path, data_root)
    tree = _tree_root(splits, aspect)
    if tree is None:
        raise UserError(f"{csv_path}: split file not found (nor a {TREE_PREFIX}_{aspect} folder tree in {splits})")
    folder = _tree_split_folder(tree, name)
    if folder is None:
        raise UserError(f"{tree / tree_folder_name(name)}: split folder not found")
    return _read_tree_split(folder, data_root, aspect, gallery_all=name.endswith("_all"))


def count_splits(splits: str | os.PathLike, aspect: str) -> int:
    """How many query_<i>/gallery_<i> pairs exist for ``aspect`` (0 when the aspect has none)."""
    splits = _existing_splits(splits)
    tree = None if (splits / aspect).is_dir() else _tree_root(splits, aspect)
    count = 0
    while all(_split_exists(splits, tree, aspect, f"{kind}_{count}") for kind in ("query", "gallery")):
        count += 1
    return count


def aspects_with_splits(splits: str | os.PathLike) -> list[str]:
    """The known aspects (in table order) that have at least one query/gallery split in ``splits``."""
    found = []
    for aspect in ALL_ASPECTS:
        try:
            if count_splits(splits, aspect) > 0:
                found.append(aspect)
        except UserError:
            pass
    return found


def _split_exists(splits: Path, tree: Path | None, aspect: str, name: str) -> bool:
    if tree is None:
        return (splits / aspect / f"{name}.csv").is_file()
    return _tree_split_folder(tree, name) is not None


def _check_split_name(name: str) -> None:
    if name not in _FIXED_SPLITS and not _NUMBERED_SPLIT.match(name):
        raise UserError(f"unknown split name {name!r}: expected one of {', '.join(_FIXED_SPLITS)}, "
                        "query_<i>, gallery_<i>, gallery_<i>_all")


def _existing_splits(splits: str | os.PathLike) -> Path:
    splits = Path(splits)
    if not splits.is_dir():
        raise UserError(f"{splits}: splits folder not found (run `handclip prepare` or pass a folder tree)")
    return splits


# ---- folder trees ---------------------------------------------------------------------------------
def tree_folder_name(name: str) -> str:
    """The published tree's folder for a split name: query_3 → query3, gallery_3_all → gallery3_all."""
    match = _NUMBERED_SPLIT.match(name)
    return f"{match[1]}{match[2]}{match[3] or ''}" if match else name


def tree_identity(sample: Sample, query_aspect: str) -> str:
    """The identity folder of ``sample`` in ``query_aspect``'s gallery<i>_all (offset if another aspect)."""
    if sample.aspect == query_aspect:
        return sample.identity
    offset = GALLERY_ALL_OFFSETS[GALLERY_ALL_ORDER[query_aspect].index(sample.aspect)]
    return str(int(sample.identity) + offset)


def _identity_from_tree(folder_name: str, query_aspect: str) -> tuple[str, str]:
    """Undo :func:`tree_identity`: (identity, aspect) of a gallery<i>_all identity folder."""
    identity = folder_name.strip()  # older trees keep the 11k file's '1200000 '
    if identity.isdigit() and query_aspect in GALLERY_ALL_ORDER:
        number = int(identity)
        for offset, aspect in zip(GALLERY_ALL_OFFSETS, GALLERY_ALL_ORDER[query_aspect]):
            if offset <= number < offset + _OFFSET_BAND:
                return f"{number - offset:07d}", aspect
    return identity, query_aspect


def _tree_root(splits: Path, aspect: str) -> Path | None:
    """The tree folder of ``aspect``: a child ``train_val_test_split_<aspect>`` (or the HD script's
    plain ``train_val_test_split``), or ``splits`` itself when it holds the split folders."""
    names = [f"{TREE_PREFIX}_{aspect}"] + ([TREE_PREFIX] if aspect == "hd" else [])
    for candidate in (splits / n for n in names):
        if candidate.is_dir():
            return candidate
    if splits.name.startswith(f"{TREE_PREFIX}_") and splits.name != f"{TREE_PREFIX}_{aspect}":
        raise UserError(f"{splits}: this folder tree holds aspect '{splits.name[len(TREE_PREFIX) + 1:]}', "
                        f"not '{aspect}'")
    if any((splits / n).is_dir() for n in _FIXED_SPLITS + ("query0", "query_0")):
        return splits
    return None


def _tree_split_folder(tree: Path, name: str) -> Path | None:
    for candidate in (tree / tree_folder_name(name), tree / name):
        if candidate.is_dir():
            return candidate
    return None


def _read_tree_split(folder: Path, data_root: str | os.PathLike, aspect: str, gallery_all: bool) -> list[Sample]:
    root = Path(data_root).resolve()
    samples = []
    for identity_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        if gallery_all:
            identity, sample_aspect = _identity_from_tree(identity_dir.name, aspect)
        else:
            identity, sample_aspect = identity_dir.name.strip(), aspect
        for file in sorted(identity_dir.iterdir()):
            if file.suffix.lower() in IMAGE_SUFFIXES:
                path = Path(os.path.realpath(file))  # exported symlinks → the same image as the CSV's
                samples.append(Sample(_relative_image(path, root), identity, sample_aspect, path))
    _require_images_exist(samples, folder, root)
    return samples


def _relative_image(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def write_folder_tree(tree: Path, aspect: str, splits: Mapping[str, list[Sample]], copy: bool = False) -> None:
    """Write ``splits`` (split name → samples) as the published tree under ``tree``, linking
    (or copying) every image to ``<folder>/<identity>/<file name>``."""
    for name, samples in splits.items():
        folder = tree / tree_folder_name(name)
        folder.mkdir(parents=True)
        for sample in samples:
            identity = tree_identity(sample, aspect) if name.endswith("_all") else sample.identity
            target = folder / identity / sample.path.name
            target.parent.mkdir(exist_ok=True)
            if copy:
                shutil.copyfile(sample.path, target)
            else:
                os.symlink(sample.path, target)
