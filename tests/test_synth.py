"""The synthetic hand generator: 11k file format, determinism, CLI, and that identity is present
while raw pixels and colour histograms cannot find it."""
import csv

import numpy as np
import pytest
from PIL import Image

from handclip.cli import main
from handclip.hand_datasets import ASPECT_FROM_11K_LABEL, TRAIN_ID_THRESHOLD_11K
from handclip.data.synth import make_person, render_photo, subject_ids, synthesize
from handclip.errors import UserError

HEADER = "id,age,gender,skinColor,accessories,nailPolish,aspectOfHand,imageName,irregularities"
LABELS = ["dorsal right", "dorsal left", "palmar right", "palmar left"]


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth") / "set"
    info = synthesize(root, ids=6, per_aspect=2, size=(64, 48), seed=3)
    with open(root / "HandInfo.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    return root, info, rows


def test_hand_info_has_the_11k_columns_and_one_row_per_image(small_set):
    root, info, rows = small_set
    assert (root / "HandInfo.csv").read_text().splitlines()[0] == HEADER
    # 6 identities x 4 aspects x 2 clean photos, plus one accessory photo per aspect for identities 0 and 3
    assert len(rows) == info["images"] == 6 * 4 * 2 + 2 * 4
    assert info["identities"] == 6
    assert [r["imageName"] for r in rows] == [f"Hand_{i:07d}.jpg" for i in range(1, len(rows) + 1)]
    assert sorted(p.name for p in (root / "Hands").iterdir()) == [r["imageName"] for r in rows]
    for row in rows:
        with Image.open(root / "Hands" / row["imageName"]) as image:
            assert (image.format, image.mode, image.size) == ("JPEG", "RGB", (64, 48))


def test_rows_describe_consistent_people(small_set):
    _, _, rows = small_set
    ids = sorted({r["id"] for r in rows})
    assert len(ids) == 6 and all(len(i) == 7 and i.isdigit() for i in ids)
    assert {r["aspectOfHand"] for r in rows} == set(LABELS)
    for subject in ids:
        mine = [r for r in rows if r["id"] == subject]
        for label in LABELS:
            clean = [r for r in mine if r["aspectOfHand"] == label and r["accessories"] == "0"]
            assert len(clean) == 2
        # person-level columns are the same in every row of a person
        assert len({(r["age"], r["gender"], r["skinColor"], r["nailPolish"], r["irregularities"]) for r in mine}) == 1
    for row in rows:
        assert 18 <= int(row["age"]) <= 75
        assert row["gender"] in {"male", "female"}
        assert row["skinColor"] in {"very fair", "fair", "medium", "dark"}
        assert {row["accessories"], row["nailPolish"], row["irregularities"]} <= {"0", "1"}
    with_accessory = [r for r in rows if r["accessories"] == "1"]
    assert {r["aspectOfHand"] for r in with_accessory} == set(LABELS)
    assert len(with_accessory) == 8


@pytest.mark.parametrize("count", [2, 10, 24, 40, 60, 200, 1000])
def test_ids_give_train_and_test_identities_in_every_aspect(count):
    ids = subject_ids(count)
    assert len(set(ids)) == count and all(len(i) == 7 for i in ids)
    for aspect, threshold in TRAIN_ID_THRESHOLD_11K.items():
        train = sum(int(i) <= threshold for i in ids)
        assert 0 < train < count, aspect
        if count >= 10:
            assert 0.6 <= train / count <= 0.7, (aspect, train)


def _render(person, aspect, size, photo_seed, **kwargs):
    image = render_photo(person, aspect, size, np.random.default_rng(photo_seed), **kwargs)
    return np.asarray(image, dtype=np.float64)


@pytest.mark.parametrize("accessory", ["ring", "watch"])
def test_accessory_is_drawn_on_an_otherwise_identical_photo(accessory):
    person = make_person(0, 1)
    plain = _render(person, "dorsal right", (160, 120), 7, nuisance=False)
    worn = _render(person, "dorsal right", (160, 120), 7, nuisance=False, accessory=accessory)
    changed = np.abs(worn - plain).max(axis=2) > 30
    assert 20 < changed.sum() < 0.05 * changed.size  # a small, clearly visible object


def test_left_hand_is_the_right_one_mirrored_with_small_asymmetries():
    person, other = make_person(0, 2), make_person(0, 5)
    right = _render(person, "dorsal right", (96, 72), 1, nuisance=False)
    left = _render(person, "dorsal left", (96, 72), 1, nuisance=False)
    other_right = _render(other, "dorsal right", (96, 72), 1, nuisance=False)
    to_mirror = np.abs(left - right[:, ::-1]).mean()
    assert 0 < to_mirror < 0.5 * np.abs(left - right).mean()
    assert to_mirror < 0.5 * np.abs(left - other_right[:, ::-1]).mean()


def test_a_hand_looks_the_same_at_small_and_full_size():
    person = make_person(0, 0)
    small = _render(person, "palmar left", (160, 120), 4, nuisance=False)
    full = render_photo(person, "palmar left", (1600, 1200), np.random.default_rng(4), nuisance=False)
    assert full.size == (1600, 1200)
    shrunk = np.asarray(full.resize((160, 120), Image.Resampling.BOX), dtype=np.float64)
    assert np.abs(shrunk - small).mean() < 3  # grey levels
    other_pose = _render(person, "palmar left", (160, 120), 5, nuisance=False)
    assert np.abs(other_pose - small).mean() > 3 * np.abs(shrunk - small).mean()


def _rank1(features, labels, distance):
    """Gallery = each identity's first image, queries = the rest."""
    gallery = np.array([np.flatnonzero(labels == c)[0] for c in np.unique(labels)])
    queries = np.setdiff1d(np.arange(len(labels)), gallery)
    nearest = distance(features[queries], features[gallery]).argmin(axis=1)
    return float(np.mean(labels[gallery][nearest] == labels[queries]))


def _squared_l2(a, b):
    """All pairwise squared distances of the rows of a and b."""
    return (a * a).sum(1)[:, None] + (b * b).sum(1)[None] - 2 * a @ b.T


def _l1(a, b):
    return np.abs(a[:, None] - b[None]).sum(-1)


def _colour_histograms(images, bins=8):
    codes = (images // (256 // bins)).astype(np.int64) @ np.array([bins * bins, bins, 1])
    counts = np.stack([np.bincount(c.ravel(), minlength=bins ** 3) for c in codes]).astype(np.float64)
    return counts / counts.sum(axis=1, keepdims=True)


def _photo_set(nuisance, ids=30, per_identity=4, size=(64, 48)):
    images, labels = [], []
    for index in range(ids):
        person = make_person(0, index)
        for photo in range(per_identity):
            images.append(_render(person, "dorsal right", size, [index, photo], nuisance=nuisance))
            labels.append(index)
    return np.stack(images), np.array(labels)


def test_identity_is_present_but_pixels_and_colour_do_not_find_it():
    photos, labels = _photo_set(nuisance=True)
    pixels = photos.reshape(len(photos), -1)
    chance = 1 / 30
    pixel_rank1 = _rank1(pixels, labels, _squared_l2)
    colour_rank1 = _rank1(_colour_histograms(photos.astype(np.uint8)), labels, _l1)
    assert pixel_rank1 < 0.5 and colour_rank1 < 0.5, (pixel_rank1, colour_rank1, chance)

    clean, _ = _photo_set(nuisance=False)  # only the finger pose varies
    clean = clean.reshape(len(clean), -1)
    clean_rank1 = _rank1(clean, labels, _squared_l2)
    distances = _squared_l2(clean, clean)
    same = labels[:, None] == labels[None]
    not_self = ~np.eye(len(labels), dtype=bool)
    ratio = distances[same & not_self].mean() / distances[~same].mean()
    assert clean_rank1 > 0.6 and ratio < 0.4, (clean_rank1, ratio)


def test_same_seed_gives_identical_bytes_and_another_seed_differs(tmp_path):
    runs = {}
    for name, seed, workers in (("a", 5, 1), ("b", 5, 2), ("c", 6, 1)):  # b: drawn by two processes
        synthesize(tmp_path / name, ids=2, per_aspect=2, size=(48, 36), seed=seed, workers=workers)
        runs[name] = {p.relative_to(tmp_path / name): p.read_bytes() for p in (tmp_path / name).rglob("*") if p.is_file()}
    assert runs["a"] == runs["b"]
    jpegs = [p for p in runs["a"] if p.suffix == ".jpg"]
    assert jpegs and all(runs["a"][p] != runs["c"][p] for p in jpegs)


def test_cli_writes_a_set_and_may_replace_its_own_output(tmp_path, capsys):
    out = tmp_path / "hands"
    assert main(["synth", "--out", str(out), "--ids", "3", "--per-aspect", "2", "--size", "48x36"]) == 0
    assert "wrote 28 images of 3 identities" in capsys.readouterr().out
    assert main(["synth", "--out", str(out), "--ids", "2", "--per-aspect", "2", "--size", "48x36"]) == 0
    rows = list(csv.DictReader(open(out / "HandInfo.csv", newline="")))
    assert len({r["id"] for r in rows}) == 2
    assert len(list((out / "Hands").iterdir())) == len(rows) == 2 * 4 * 2 + 4


@pytest.mark.parametrize("flags, named", [
    (["--ids", "0"], "--ids"),
    (["--ids", "1"], "--ids"),
    (["--per-aspect", "1"], "--per-aspect"),
    (["--size", "16x12"], "--size"),
    (["--size", "big"], "--size"),
    (["--seed", "-1"], "--seed"),
])
def test_cli_rejects_bad_arguments_with_one_line(tmp_path, capsys, flags, named):
    out = tmp_path / "never"
    assert main(["synth", "--out", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("handclip: error: ") and named in err and err.count("\n") == 1
    assert not out.exists()


def test_refuses_to_replace_a_folder_it_did_not_write(tmp_path, capsys):
    (tmp_path / "photos.txt").write_text("mine")
    assert main(["synth", "--out", str(tmp_path), "--ids", "2", "--per-aspect", "2", "--size", "48x36"]) == 2
    assert str(tmp_path) in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["photos.txt"]
    with pytest.raises(UserError, match="is a file"):
        synthesize(tmp_path / "photos.txt", ids=2, per_aspect=2, size=(48, 36))


def test_studio_style_photographs_the_same_people_on_a_plain_light_backdrop(tmp_path):
    varied, studio = tmp_path / "varied", tmp_path / "studio"
    synthesize(varied, ids=3, per_aspect=2, size=(64, 48), seed=2)
    synthesize(studio, ids=3, per_aspect=2, size=(64, 48), seed=2, style="studio")
    assert (studio / "HandInfo.csv").read_bytes() == (varied / "HandInfo.csv").read_bytes()  # same people, photos
    assert "--style studio" in (studio / "SYNTHETIC.txt").read_text()
    assert "--style" not in (varied / "SYNTHETIC.txt").read_text()

    def plain_light_top_corners(root):
        """Per photo: are both top corners (the backdrop) light and nearly grey?"""
        verdicts = []
        for path in sorted((root / "Hands").iterdir()):
            pixels = np.asarray(Image.open(path).convert("RGB"), dtype=float)
            corners = [pixels[:4, :4].reshape(-1, 3).mean(0), pixels[:4, -4:].reshape(-1, 3).mean(0)]
            verdicts.append(all(c.min() > 160 and c.max() - c.min() < 45 for c in corners))
        return verdicts

    assert all(plain_light_top_corners(studio))
    assert sum(plain_light_top_corners(varied)) < len(plain_light_top_corners(varied)) / 2


def test_an_unknown_style_is_refused():
    with pytest.raises(UserError, match="--style nope"):
        synthesize("never", ids=2, per_aspect=2, style="nope")
