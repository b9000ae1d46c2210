"""``handclip prepare``: split preparation under the published protocol (MBA-Net / GPA-Net / CLIP-HandID) as CSV manifests.

11k Hands, each aspect separately, accessory-free images only: train_all = subject ids up to the
aspect's threshold, test = the rest; val = one random image per train_all identity, train = the
rest of train_all; N Monte Carlo splits with gallery_i = one random image per test identity and
query_i = the rest of test; gallery_i_all = the four aspects' gallery_i together.
HD: the same with train_all = ids <= 447 of ``1-501``, and every gallery also holding all
``502-712`` images as distractors.

The published scripts pick with unseeded ``np.random``; here every pick comes from a
``random.Random`` seeded by (seed, aspect) over identities and images in sorted order, so a seed
gives byte-identical files whatever the CSV's row order or the other aspects. Val is drawn first
and split i after split i-1, so fewer splits are a prefix of more.

In ``gallery_<i>_all.csv`` every image keeps its true identity and aspect; the published id offsets
appear only in the exported folder tree (see :mod:`handclip.data.manifests`).

HD distractors get the identity ``<id + 1000>`` (502 → ``1502``), as the published HD script names
their folders: one identity per subject, never equal to a 1-501 id, and re-reading an exported
tree gives the same identities.
"""
from __future__ import annotations

import contextlib
import csv
import hashlib
import random
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from handclip import __version__
from handclip.hand_datasets import (
    ASPECT_FROM_11K_LABEL,
    ASPECT_HD,
    ASPECTS_11K,
    HAND_DATASETS,
    TRAIN_ID_THRESHOLD_11K,
    TRAIN_ID_THRESHOLD_HD,
)
from handclip.data.manifests import IMAGE_SUFFIXES, TREE_PREFIX, Sample, write_folder_tree, write_split_csv
from handclip.errors import UserError
from handclip.fileio import atomic_directory, atomic_write_json

HANDINFO_COLUMNS = ("id", "accessories", "aspectOfHand", "imageName")
HD_FOLDER = HAND_DATASETS["hd"].root_entries[0]
HD_SUBJECTS, HD_DISTRACTORS = "1-501", HAND_DATASETS["hd"].distractors
HD_DISTRACTOR_ID_OFFSET = 1000  # the published HD script's folder names for 502-712
_HD_FILE = re.compile(r"^([0-9]+)_")
_MISSING_SHOWN = 10


@dataclass
class PrepareResult:
    dataset: str  # "11k" or "hd"
    out: Path
    seed: int
    num_splits: int
    splits: dict[str, dict[str, list[Sample]]]  # aspect → split name → samples
    manifest: dict


# ---- 11k Hands ------------------------------------------------------------------------------------
def prepare_11k(root, out=None, seed: int = 0, num_splits: int = 10, export_folders=None,
                copy: bool = False) -> PrepareResult:
    root = _existing_root(root)
    _check_num_splits(num_splits)
    handinfo = root / "HandInfo.csv"
    by_aspect = _read_handinfo(handinfo, root)
    splits = {}
    for aspect in ASPECTS_11K:
        threshold = TRAIN_ID_THRESHOLD_11K[aspect]
        where = f"{handinfo}: aspect {aspect}"
        splits[aspect] = split_aspect(by_aspect[aspect], threshold, _rng(seed, aspect), num_splits, where)
    for i in range(num_splits):
        gallery_all = sorted((s for a in ASPECTS_11K for s in splits[a][f"gallery_{i}"]), key=_by_image)
        for aspect in ASPECTS_11K:
            splits[aspect][f"gallery_{i}_all"] = gallery_all
    source = {"file": "HandInfo.csv", "sha256": hashlib.sha256(handinfo.read_bytes()).hexdigest()}
    result = _result("11k", root, out, seed, num_splits, splits, source)
    _write(result, export_folders, copy)
    return result


def _read_handinfo(handinfo: Path, root: Path) -> dict[str, list[Sample]]:
    """Accessory-free samples per aspect; any malformed row is an error naming its line."""
    if not handinfo.is_file():
        raise UserError(f"{handinfo}: not found (an 11k Hands root holds HandInfo.csv and Hands/)")
    by_aspect = {aspect: [] for aspect in ASPECTS_11K}
    try:
        with open(handinfo, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = [c.strip() for c in reader.fieldnames or []]
            missing = [c for c in HANDINFO_COLUMNS if c not in columns]
            if missing:
                raise UserError(f"{handinfo}: missing column {', '.join(missing)} (found: {', '.join(columns)})")
            reader.fieldnames = columns
            for row in reader:
                sample = _handinfo_sample(row, f"{handinfo}:{reader.line_num}", root)
                if sample is not None:
                    by_aspect[sample.aspect].append(sample)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"{handinfo}: not a readable CSV ({exc})") from None
    _require_files([s.path for samples in by_aspect.values() for s in samples],
                   f"{handinfo} (accessory-free rows)", root / "Hands")
    return by_aspect


def _handinfo_sample(row: dict, where: str, root: Path) -> Sample | None:
    """The row's sample, or None for a photo with accessories (the protocol drops those)."""
    value = {column: (row.get(column) or "").strip() for column in HANDINFO_COLUMNS}
    for column in ("id", "accessories"):
        if not (value[column].isascii() and value[column].isdigit()):
            raise UserError(f"{where} column '{column}': {row.get(column)!r} is not a whole number")
    aspect = ASPECT_FROM_11K_LABEL.get(value["aspectOfHand"])
    if aspect is None:
        raise UserError(f"{where} column 'aspectOfHand': unknown aspect {value['aspectOfHand']!r} "
                        f"(expected one of: {', '.join(ASPECT_FROM_11K_LABEL)})")
    if not value["imageName"]:
        raise UserError(f"{where} column 'imageName': empty")
    if int(value["accessories"]) != 0:
        return None
    image = f"Hands/{value['imageName']}"
    return Sample(image=image, identity=value["id"], aspect=aspect, path=root / image)


# ---- HK PolyU HD ----------------------------------------------------------------------------------
def prepare_hd(root, out=None, seed: int = 0, num_splits: int = 10, export_folders=None,
               copy: bool = False) -> PrepareResult:
    root = _existing_root(root)
    _check_num_splits(num_splits)
    subjects = _hd_samples(root, HD_SUBJECTS, id_offset=0)
    distractors = _hd_samples(root, HD_DISTRACTORS, id_offset=HD_DISTRACTOR_ID_OFFSET)
    clash = {s.identity for s in subjects} & {s.identity for s in distractors}
    if clash:
        raise UserError(f"{root / HD_FOLDER / HD_SUBJECTS}: subject ids {', '.join(sorted(clash))} clash with "
                        f"the {HD_DISTRACTORS} distractors' ids (their id + {HD_DISTRACTOR_ID_OFFSET})")
    where = str(root / HD_FOLDER / HD_SUBJECTS)
    aspect_splits = split_aspect(subjects, TRAIN_ID_THRESHOLD_HD, _rng(seed, ASPECT_HD), num_splits, where,
                                 extra_gallery=distractors)
    for i in range(num_splits):
        aspect_splits[f"gallery_{i}_all"] = aspect_splits[f"gallery_{i}"]  # one aspect: nothing to add
    listing = "\n".join(s.image for s in sorted(subjects + distractors, key=_by_image))
    source = {"file": f"{HD_FOLDER}/ (sorted file list)", "sha256": hashlib.sha256(listing.encode()).hexdigest()}
    result = _result("hd", root, out, seed, num_splits, {ASPECT_HD: aspect_splits}, source)
    _write(result, export_folders, copy)
    return result


def _hd_samples(root: Path, subfolder: str, id_offset: int) -> list[Sample]:
    folder = root / HD_FOLDER / subfolder
    if not folder.is_dir():
        raise UserError(f"{folder}: not found (an HD root holds '{HD_FOLDER}/{HD_SUBJECTS}' and "
                        f"'{HD_FOLDER}/{HD_DISTRACTORS}')")
    samples = []
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        match = _HD_FILE.match(path.name)
        if match is None:
            raise UserError(f"{path}: the file name must start with a numeric subject id, as in 12_3.jpg")
        identity = str(int(match[1]) + id_offset) if id_offset else match[1]
        image = path.relative_to(root).as_posix()
        samples.append(Sample(image=image, identity=identity, aspect=ASPECT_HD, path=path))
    if not samples:
        raise UserError(f"{folder}: no images")
    return samples


# ---- the protocol ---------------------------------------------------------------------------------
def split_aspect(samples: list[Sample], threshold: int, rng: random.Random, num_splits: int, where: str,
                 extra_gallery: list[Sample] = ()) -> dict[str, list[Sample]]:
    """train/val/train_all/test and query_i/gallery_i of one aspect; ``extra_gallery`` joins every gallery."""
    train_ids = _group_by_identity(s for s in samples if int(s.identity) <= threshold)
    test_ids = _group_by_identity(s for s in samples if int(s.identity) > threshold)
    if not test_ids:
        raise UserError(f"{where}: no test identities (none above id {threshold} after the protocol's filters)")
    val = [rng.choice(images) for images in train_ids.values()]
    train_all = _flatten(train_ids)
    test = _flatten(test_ids)
    splits = {"train": _without(train_all, val), "val": sorted(val, key=_by_image),
              "train_all": train_all, "test": test}
    for i in range(num_splits):
        gallery = [rng.choice(images) for images in test_ids.values()]
        splits[f"query_{i}"] = _without(test, gallery)
        splits[f"gallery_{i}"] = sorted(gallery + list(extra_gallery), key=_by_image)
    return splits


def _group_by_identity(samples) -> dict[str, list[Sample]]:
    """identity → its samples sorted by image, identities sorted: the order every pick follows."""
    groups = defaultdict(list)
    for sample in samples:
        groups[sample.identity].append(sample)
    return {identity: sorted(groups[identity], key=_by_image) for identity in sorted(groups)}


def _flatten(groups: dict[str, list[Sample]]) -> list[Sample]:
    return sorted((s for images in groups.values() for s in images), key=_by_image)


def _without(samples: list[Sample], removed: list[Sample]) -> list[Sample]:
    removed = set(removed)
    return [s for s in samples if s not in removed]


def _by_image(sample: Sample) -> tuple[str, str]:
    return sample.image, sample.aspect


def _rng(seed: int, aspect: str) -> random.Random:
    # A str seed is hashed with SHA-512: stable across runs and Python processes.
    return random.Random(f"handclip:{seed}:{aspect}")


# ---- output -------------------------------------------------------------------------------------
def _result(dataset: str, root: Path, out, seed: int, num_splits: int, splits: dict, source: dict) -> PrepareResult:
    files = {f"{aspect}/{name}.csv": len(samples) for aspect, named in splits.items()
             for name, samples in named.items()}
    manifest = {"protocol": f"{dataset}-published", "dataset": dataset, "seed": seed,
                "num_splits": num_splits, "aspects": list(splits), "files": files,
                "source": source, "handclip_version": __version__}
    out = Path(out) if out is not None else root / "splits"
    return PrepareResult(dataset=dataset, out=out, seed=seed, num_splits=num_splits, splits=splits,
                         manifest=manifest)


def _write(result: PrepareResult, export_folders, copy: bool) -> None:
    """CSVs and manifest.json in a temporary folder beside OUT (and each exported tree beside its
    final place), all swapped in only once everything is written."""
    out = result.out
    export = Path(export_folders) if export_folders is not None else None
    if export is not None and export.resolve().is_relative_to(out.resolve()):
        raise UserError(f"--export-folders {export}: must lie outside the splits folder {out}")
    try:
        with contextlib.ExitStack() as stack:
            staging = stack.enter_context(atomic_directory(out))
            for aspect, named in result.splits.items():
                for name, samples in named.items():
                    write_split_csv(staging / aspect / f"{name}.csv", samples)
            atomic_write_json(staging / "manifest.json", result.manifest)
            if export is not None:
                for aspect, named in result.splits.items():
                    tree = stack.enter_context(atomic_directory(export / f"{TREE_PREFIX}_{aspect}"))
                    write_folder_tree(tree, aspect, named, copy=copy)
    except OSError as exc:
        raise UserError(f"{exc.filename or out}: cannot write ({exc.strerror or exc})") from None


def _existing_root(root) -> Path:
    if root is None or not Path(root).is_dir():
        raise UserError(f"{root}: dataset root not found")
    return Path(root).resolve()


def _check_num_splits(num_splits: int) -> None:
    if num_splits < 1:
        raise UserError(f"--num-splits {num_splits}: need at least 1 query/gallery split")


def _require_files(paths: list[Path], listed_in: str, folder: Path) -> None:
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        shown = ", ".join(missing[:_MISSING_SHOWN])
        more = f" and {len(missing) - _MISSING_SHOWN} more" if len(missing) > _MISSING_SHOWN else ""
        raise UserError(f"{len(missing)} images listed in {listed_in} are missing from {folder}: {shown}{more}")


# ---- summary ------------------------------------------------------------------------------------
_SUMMARY_COLUMNS = ("train", "val", "train_all", "test", "query_0", "gallery_0", "gallery_0_all")


# A key of HAND_DATASETS → its reader: a new dataset is one table entry plus its function here.
PREPARERS = {"11k": prepare_11k, "hd": prepare_hd}


def format_summary(result: PrepareResult) -> str:
    """Identities/images per split and aspect (query/gallery columns: every split has the same counts)."""
    header = ["aspect"] + [c.replace("_0", "_i") for c in _SUMMARY_COLUMNS]
    rows = [header]
    for aspect, named in result.splits.items():
        rows.append([aspect] + [f"{len({(s.identity, s.aspect) for s in named[c]})}/{len(named[c])}"
                                for c in _SUMMARY_COLUMNS])
    widths = [max(len(row[k]) for row in rows) for k in range(len(header))]
    table = "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)
    return (f"{result.dataset}: {result.num_splits} query/gallery splits, seed {result.seed} → {result.out}\n"
            f"identities/images per split:\n{table}")
