"""Synthetic hand photos at the real datasets' sizes, for benchmarks/gpu.sh.

11k Hands: ``handclip synth`` draws ``--drawn`` photos per identity and aspect (in parallel), then
each is given hard-linked copies under new names until every identity has ``--per-aspect`` photos
per aspect, as in the real download (190 subjects, about 11,000 photos). HK PolyU HD: the
``Original Images/1-501`` and ``502-712`` folders, filled with hard links to the 11k photos. A copy
costs what a photo costs wherever speed is measured (every file is decoded on its own); it only
makes the identities easier, which no speed figure depends on.

    PYTHONPATH=src python benchmarks/gpu_data.py --out DATA [--ids 190 --per-aspect 14 --drawn 3 ...]
"""
from __future__ import annotations

import argparse
import csv
import itertools
import os
from collections import defaultdict
from pathlib import Path

from handclip.data.synth import HAND_INFO_COLUMNS, synthesize
from handclip.fileio import csv_text


def inflate_11k(root: Path, per_aspect: int) -> int:
    """Give every (subject, aspect) ``per_aspect`` photos without accessories; returns the photo count."""
    with open(root / "HandInfo.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    groups = defaultdict(list)
    for row in rows:
        if row["accessories"] == "0":
            groups[row["id"], row["aspectOfHand"]].append(row)
    added = []
    for group in groups.values():
        for source in itertools.islice(itertools.cycle(group), max(per_aspect - len(group), 0)):
            name = f"Hand_{len(rows) + len(added) + 1:07d}.jpg"
            os.link(root / "Hands" / source["imageName"], root / "Hands" / name)
            added.append({**source, "imageName": name})
    rows += added
    (root / "HandInfo.csv").write_text(csv_text(HAND_INFO_COLUMNS, [[r[c] for c in HAND_INFO_COLUMNS] for r in rows]),
                                       encoding="utf-8")
    return len(rows)


def hd_tree(root: Path, photos: list[Path], subjects: int, per_subject: int, distractors: int,
            per_distractor: int) -> int:
    """``root/Original Images/{1-501,502-712}/<id>_<n>.jpg`` linked to ``photos`` in turn."""
    source = itertools.cycle(photos)
    count = 0
    for folder, ids, per in (("1-501", range(1, subjects + 1), per_subject),
                             ("502-712", range(502, 502 + distractors), per_distractor)):
        (root / "Original Images" / folder).mkdir(parents=True)
        for subject in ids:
            for n in range(1, per + 1):
                os.link(next(source), root / "Original Images" / folder / f"{subject}_{n}.jpg")
                count += 1
    return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="gets 11k/ and hd/")
    parser.add_argument("--ids", type=int, default=190)
    parser.add_argument("--per-aspect", type=int, default=14, help="photos per identity and aspect (+ accessories)")
    parser.add_argument("--drawn", type=int, default=3, help="of which drawn, the rest linked copies")
    parser.add_argument("--size", default="1600x1200")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    parser.add_argument("--hd-subjects", type=int, default=501)
    parser.add_argument("--hd-photos", type=int, default=9)
    parser.add_argument("--hd-distractors", type=int, default=213)
    parser.add_argument("--hd-distractor-photos", type=int, default=6)
    args = parser.parse_args()
    width, height = map(int, args.size.split("x"))
    synthesize(args.out / "11k", ids=args.ids, per_aspect=args.drawn, size=(width, height), workers=args.workers)
    photos_11k = inflate_11k(args.out / "11k", args.per_aspect)
    photos = sorted((args.out / "11k" / "Hands").glob("*.jpg"))
    photos_hd = hd_tree(args.out / "hd", photos, args.hd_subjects, args.hd_photos, args.hd_distractors,
                        args.hd_distractor_photos)
    print(f"11k: {photos_11k} photos of {args.ids} subjects ({args.drawn} drawn per identity and aspect); "
          f"hd: {photos_hd} photos of {args.hd_subjects} + {args.hd_distractors} subjects; {width}x{height}")


if __name__ == "__main__":
    main()
