"""`handclip prepare`: the published protocol on a tiny generated 11k / HD download."""
import csv
import hashlib
import io
import json
import random
from collections import defaultdict
from pathlib import Path

import pytest
from PIL import Image

import handclip
from handclip.cli import main
from handclip.hand_datasets import ASPECT_FROM_11K_LABEL, ASPECTS_11K, TRAIN_ID_THRESHOLD_11K
from handclip.data.manifests import count_splits, load_split, read_split_csv
from handclip.data.prepare import format_summary, prepare_11k, prepare_hd
from handclip.errors import UserError

HANDINFO_HEADER = ["id", "age", "gender", "skinColor", "accessories", "nailPolish", "aspectOfHand", "imageName",
                   "irregularities"]
LABEL_OF = {aspect: label for label, aspect in ASPECT_FROM_11K_LABEL.items()}
NUM_SPLITS = 3


def _jpeg_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 150, 120)).save(buffer, "JPEG")
    return buffer.getvalue()


JPEG = _jpeg_bytes()


def handinfo_rows() -> list[dict]:
    """Per aspect: a single-image train id, ids just below / on / above the threshold, an accessory
    photo in train and in test; dorsal_r also has the real file's '1200000 ' with a trailing space."""
    plan = []  # (id as written, accessories, aspect)
    for aspect, threshold in TRAIN_ID_THRESHOLD_11K.items():
        for subject, count in ((threshold - 2, 1), (threshold - 1, 3), (threshold, 2), (threshold + 1, 3),
                               (threshold + 2, 2)):
            plan += [(f"{subject:07d}", 0, aspect)] * count
        plan += [(f"{threshold - 1:07d}", 1, aspect), (f"{threshold + 1:07d}", 1, aspect)]
    plan += [("1200000 ", 0, "dorsal_r"), ("1200000", 0, "dorsal_r"), ("1200000", 1, "dorsal_r")]
    return [{"id": subject, "age": "30", "gender": "male", "skinColor": "fair", "accessories": str(accessories),
             "nailPolish": "0", "aspectOfHand": LABEL_OF[aspect], "imageName": f"Hand_{n:07d}.jpg",
             "irregularities": "0"} for n, (subject, accessories, aspect) in enumerate(plan)]


def write_11k(root: Path, rows: list[dict]) -> Path:
    (root / "Hands").mkdir(parents=True, exist_ok=True)
    for row in rows:
        (root / "Hands" / row["imageName"]).write_bytes(JPEG)
    write_handinfo(root, rows)
    return root


def write_handinfo(root: Path, rows: list[dict], header=HANDINFO_HEADER) -> None:
    with open(root / "HandInfo.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def expected_images(rows) -> dict[str, dict[str, set[str]]]:
    """aspect → identity → images, computed straight from the rows."""
    expected = defaultdict(lambda: defaultdict(set))
    for row in rows:
        if row["accessories"] == "0":
            aspect = ASPECT_FROM_11K_LABEL[row["aspectOfHand"]]
            expected[aspect][row["id"].strip()].add(f"Hands/{row['imageName']}")
    return expected


def by_identity(samples) -> dict[str, set[str]]:
    groups = defaultdict(set)
    for s in samples:
        groups[s.identity].add(s.image)
    return groups


def csv_bytes(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*.csv"))}


@pytest.fixture
def root_11k(tmp_path):
    return write_11k(tmp_path / "11k", handinfo_rows())


def test_11k_protocol_rules(root_11k):
    out = root_11k / "splits"
    prepare_11k(root=root_11k, out=out, seed=0, num_splits=NUM_SPLITS)
    expected = expected_images(handinfo_rows())
    for aspect in ASPECTS_11K:
        threshold = TRAIN_ID_THRESHOLD_11K[aspect]
        split = {p.stem: read_split_csv(p, root_11k) for p in (out / aspect).glob("*.csv")}
        assert all(s.aspect == aspect and s.path == root_11k / s.image for s in split["train_all"] + split["test"])
        train_all, test = by_identity(split["train_all"]), by_identity(split["test"])
        assert train_all == {i: imgs for i, imgs in expected[aspect].items() if int(i) <= threshold}
        assert test == {i: imgs for i, imgs in expected[aspect].items() if int(i) > threshold}
        assert f"{threshold:07d}" in train_all and f"{threshold + 1:07d}" in test  # ids on each side
        val, train = by_identity(split["val"]), by_identity(split["train"])
        assert set(val) == set(train_all) and all(len(imgs) == 1 for imgs in val.values())
        for identity, images in train_all.items():
            assert val[identity] | train.get(identity, set()) == images
            assert not val[identity] & train.get(identity, set())
        assert f"{threshold - 2:07d}" not in train  # single-image identity: val only
        for i in range(NUM_SPLITS):
            gallery, query = by_identity(split[f"gallery_{i}"]), by_identity(split[f"query_{i}"])
            assert set(gallery) == set(test) and all(len(imgs) == 1 for imgs in gallery.values())
            for identity, images in test.items():
                assert gallery[identity] | query[identity] == images
                assert not gallery[identity] & query[identity]
            everyone = {(s.image, s.identity, s.aspect) for a in ASPECTS_11K
                        for s in load_split(root_11k, out, a, f"gallery_{i}")}
            assert {(s.image, s.identity, s.aspect) for s in split[f"gallery_{i}_all"]} == everyone
    dorsal_r_test = by_identity(load_split(root_11k, out, "dorsal_r", "test"))
    assert len(dorsal_r_test["1200000"]) == 2  # '1200000 ' and '1200000' are one person
    assert (out / "dorsal_r" / "train.csv").read_text().splitlines()[0] == "image,identity,aspect"
    assert not list(root_11k.glob("splits/**/*.jpg"))  # images are never copied


def test_11k_seeded_and_independent_of_row_order(root_11k, tmp_path):
    prepare_11k(root=root_11k, out=tmp_path / "a", seed=0, num_splits=NUM_SPLITS)
    shuffled = handinfo_rows()
    random.Random(1).shuffle(shuffled)
    write_handinfo(root_11k, shuffled)
    prepare_11k(root=root_11k, out=tmp_path / "b", seed=0, num_splits=NUM_SPLITS)
    prepare_11k(root=root_11k, out=tmp_path / "fewer", seed=0, num_splits=NUM_SPLITS - 1)
    prepare_11k(root=root_11k, out=tmp_path / "other", seed=1, num_splits=NUM_SPLITS)
    first = csv_bytes(tmp_path / "a")
    assert csv_bytes(tmp_path / "b") == first
    fewer = csv_bytes(tmp_path / "fewer")
    assert fewer == {name: data for name, data in first.items() if name in fewer}  # fewer splits = a prefix
    other = csv_bytes(tmp_path / "other")
    assert other.keys() == first.keys() and other != first
    for aspect in ASPECTS_11K:  # another seed: other picks, same sets
        assert other[f"{aspect}/train_all.csv"] == first[f"{aspect}/train_all.csv"]


def test_manifest_json(root_11k):
    out = root_11k / "out"
    result = prepare_11k(root=root_11k, out=out, seed=7, num_splits=2)
    manifest = json.loads((out / "manifest.json").read_text())
    on_disk = {name: len(data.decode().splitlines()) - 1 for name, data in csv_bytes(out).items()}
    assert manifest["files"] == on_disk and len(on_disk) == 4 * (4 + 3 * 2)
    assert manifest["seed"] == 7 and manifest["num_splits"] == 2 and manifest["dataset"] == "11k"
    assert manifest["protocol"] == "11k-published"
    assert manifest["source"]["sha256"] == hashlib.sha256((root_11k / "HandInfo.csv").read_bytes()).hexdigest()
    assert manifest["handclip_version"] == handclip.__version__
    assert result.manifest == manifest


def test_cli_default_out_and_summary(root_11k, capsys):
    assert main(["prepare", "11k", "--root", str(root_11k), "--num-splits", "2"]) == 0
    assert count_splits(root_11k / "splits", "palmar_l") == 2
    lines = capsys.readouterr().out.splitlines()
    row = next(line.split() for line in lines if line.startswith("dorsal_r"))
    # train 3+2 ids (the single-image id is val only)/3 images, val 3/3, train_all 3/6,
    # test 3 ids/7 images, query 4 images, gallery 3, gallery_all 3 + 3 × 2 others
    assert row == ["dorsal_r", "2/3", "3/3", "3/6", "3/7", "3/4", "3/3", "9/9"]


def write_hd(root: Path) -> Path:
    for folder, subjects in (("1-501", {"1": 2, "446": 3, "447": 2, "448": 3, "449": 1, "501": 2}),
                             ("502-712", {"502": 2, "712": 3})):
        (root / "Original Images" / folder).mkdir(parents=True)
        for subject, count in subjects.items():
            for n in range(1, count + 1):
                (root / "Original Images" / folder / f"{subject}_{n}.jpg").write_bytes(JPEG)
    return root


def test_hd_protocol_and_distractors(tmp_path):
    root = write_hd(tmp_path / "HD")
    result = prepare_hd(root=root, seed=0, num_splits=NUM_SPLITS)
    out = root / "splits"
    assert result.out == out and json.loads((out / "manifest.json").read_text())["aspects"] == ["hd"]
    assert set(by_identity(load_split(root, out, "hd", "train_all"))) == {"1", "446", "447"}
    test = by_identity(load_split(root, out, "hd", "test"))
    assert set(test) == {"448", "449", "501"}
    distractors = {("Original Images/502-712/502_1.jpg", "1502"), ("Original Images/502-712/502_2.jpg", "1502"),
                   ("Original Images/502-712/712_1.jpg", "1712"), ("Original Images/502-712/712_2.jpg", "1712"),
                   ("Original Images/502-712/712_3.jpg", "1712")}
    for i in range(NUM_SPLITS):
        gallery = load_split(root, out, "hd", f"gallery_{i}")
        query = load_split(root, out, "hd", f"query_{i}")
        assert {(s.image, s.identity) for s in gallery if s.identity in ("1502", "1712")} == distractors
        own = by_identity(s for s in gallery if s.identity in test)
        assert set(own) == set(test) and all(len(images) == 1 for images in own.values())
        assert not {s.identity for s in query} & {"1502", "1712"}
        assert len(query) == 6 - 3 and all(s.aspect == "hd" for s in gallery + query)
        assert load_split(root, out, "hd", f"gallery_{i}_all") == gallery


def test_export_folders_and_reading_them_back(root_11k, tmp_path):
    out, trees = tmp_path / "splits", tmp_path / "trees"
    prepare_11k(root=root_11k, out=out, seed=0, num_splits=2, export_folders=trees)
    tree = trees / "train_val_test_split_dorsal_r"
    palmar_l_test_id = TRAIN_ID_THRESHOLD_11K["palmar_l"] + 1
    assert (tree / "gallery1_all" / str(palmar_l_test_id + 31000000)).is_dir()  # published offset
    link = next((tree / "query0").rglob("*.jpg"))
    assert link.is_symlink() and link.resolve().parent == root_11k / "Hands"
    names = ["train", "val", "train_all", "test"] + [f"{k}_{i}" for i in range(2) for k in ("query", "gallery")] \
        + [f"gallery_{i}_all" for i in range(2)]
    for aspect in ASPECTS_11K:
        assert count_splits(trees, aspect) == 2
        for name in names:
            rows = {(s.image, s.identity, s.aspect) for s in load_split(root_11k, out, aspect, name)}
            assert {(s.image, s.identity, s.aspect) for s in load_split(root_11k, trees, aspect, name)} == rows
    direct = load_split(root_11k, trees / "train_val_test_split_palmar_r", "palmar_r", "query_1")
    assert direct == load_split(root_11k, out, "palmar_r", "query_1")


def test_export_copies_and_hd_tree(tmp_path):
    root = write_hd(tmp_path / "HD")
    trees = tmp_path / "trees"
    prepare_hd(root=root, out=tmp_path / "splits", seed=0, num_splits=1, export_folders=trees, copy=True)
    copied = trees / "train_val_test_split_hd" / "gallery0" / "1712" / "712_3.jpg"
    assert copied.is_file() and not copied.is_symlink() and copied.read_bytes() == JPEG
    from_tree = load_split(root, trees, "hd", "gallery_0")
    expected = load_split(root, tmp_path / "splits", "hd", "gallery_0")
    assert sorted((s.path.name, s.identity) for s in from_tree) == sorted((s.path.name, s.identity) for s in expected)


# ---- bad input ------------------------------------------------------------------------------------
def _drop_column(root, rows):
    write_handinfo(root, rows, header=[c for c in HANDINFO_HEADER if c != "accessories"])


def _set_cell(index, column, value):
    def change(root, rows):
        rows[index][column] = value
        write_handinfo(root, rows)
    return change


def _remove_images(root, rows):
    for row in rows[3:5]:
        (root / "Hands" / row["imageName"]).unlink()


def _no_palmar_l_test(root, rows):
    threshold = TRAIN_ID_THRESHOLD_11K["palmar_l"]
    write_handinfo(root, [r for r in rows if not (r["aspectOfHand"] == "palmar left" and int(r["id"]) > threshold)])


BAD_11K = {
    "missing HandInfo.csv": (lambda root, rows: (root / "HandInfo.csv").unlink(), ["HandInfo.csv", "not found"]),
    "missing column": (_drop_column, ["HandInfo.csv", "missing column accessories"]),
    "non-numeric id": (_set_cell(4, "id", "12a"), ["HandInfo.csv:6", "'id'", "12a"]),
    "non-numeric accessories": (_set_cell(0, "accessories", "yes"), ["HandInfo.csv:2", "'accessories'"]),
    "unknown aspect": (_set_cell(2, "aspectOfHand", "side view"), ["HandInfo.csv:4", "aspectOfHand", "side view"]),
    "missing images": (_remove_images, ["2 images", "Hand_0000003.jpg, Hand_0000004.jpg"]),
    "no test identities": (_no_palmar_l_test, ["palmar_l", "no test identities"]),
}


def _assert_one_line_error(capsys, fragments):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("handclip: error: ") and "Traceback" not in err
    for fragment in fragments:
        assert fragment in err


@pytest.mark.parametrize("case", BAD_11K)
def test_bad_11k_input_exits_2_and_keeps_earlier_out(case, root_11k, capsys):
    out = root_11k.parent / "out"
    assert main(["prepare", "11k", "--root", str(root_11k), "--out", str(out), "--num-splits", "1"]) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    breaks, fragments = BAD_11K[case]
    rows = handinfo_rows()
    breaks(root_11k, rows)
    assert main(["prepare", "11k", "--root", str(root_11k), "--out", str(out), "--seed", "5"]) == 2
    _assert_one_line_error(capsys, fragments)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["11k", "out"]  # no temporary folders left


def test_missing_accessory_image_is_not_an_error(root_11k):
    """The protocol never reads photos with accessories, so they need not exist."""
    accessory_row = next(r for r in handinfo_rows() if r["accessories"] == "1")
    (root_11k / "Hands" / accessory_row["imageName"]).unlink()
    assert prepare_11k(root=root_11k, num_splits=1).manifest["files"]["dorsal_r/test.csv"] == 3 + 2 + 2


def test_missing_root_and_unwritable_out(tmp_path, root_11k, capsys):
    assert main(["prepare", "11k", "--root", str(tmp_path / "nowhere")]) == 2
    _assert_one_line_error(capsys, ["nowhere", "dataset root not found"])
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["prepare", "11k", "--root", str(root_11k), "--out", str(blocker / "splits")]) == 2
    _assert_one_line_error(capsys, ["a-file", "cannot write"])


def test_failed_export_keeps_earlier_out(root_11k, tmp_path, capsys):
    out = tmp_path / "out"
    prepare_11k(root=root_11k, out=out, num_splits=1)
    before = csv_bytes(out)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    argv = ["prepare", "11k", "--root", str(root_11k), "--out", str(out), "--seed", "3", "--export-folders"]
    assert main(argv + [str(blocker)]) == 2
    _assert_one_line_error(capsys, ["a-file", "cannot write"])
    assert csv_bytes(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["11k", "a-file", "out"]
    with pytest.raises(UserError, match="outside the splits folder"):
        prepare_11k(root=root_11k, out=out, export_folders=out / "trees")


def test_bad_hd_input(tmp_path, capsys):
    root = write_hd(tmp_path / "HD")
    (root / "Original Images" / "1-501" / "left_1.jpg").write_bytes(JPEG)
    assert main(["prepare", "hd", "--root", str(root)]) == 2
    _assert_one_line_error(capsys, ["left_1.jpg", "numeric subject id"])
    (root / "Original Images" / "1-501" / "left_1.jpg").unlink()
    for path in (root / "Original Images" / "502-712").iterdir():
        path.unlink()
    (root / "Original Images" / "502-712").rmdir()
    assert main(["prepare", "hd", "--root", str(root)]) == 2
    _assert_one_line_error(capsys, ["502-712", "not found"])
    assert not (root / "splits").exists()


def test_summary_counts_every_aspect(root_11k):
    text = format_summary(prepare_11k(root=root_11k, num_splits=1))
    assert [line.split()[0] for line in text.splitlines()[3:]] == list(ASPECTS_11K)
