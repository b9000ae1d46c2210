"""Split manifests: CSV round trips, lookup, counting, and the published folder trees."""
from pathlib import Path

import pytest

from handclip.data.manifests import (
    Sample,
    count_splits,
    load_split,
    read_split_csv,
    tree_folder_name,
    tree_identity,
    write_split_csv,
)
from handclip.errors import UserError


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\xff\xd8 not decoded here")
    return path


def sample(root: Path, image: str, identity: str, aspect: str = "dorsal_r") -> Sample:
    return Sample(image, identity, aspect, touch(root / image))


def test_csv_round_trip(tmp_path):
    rows = [sample(tmp_path, "Hands/Hand_0000002.jpg", "0000000"),
            sample(tmp_path, "Hands/a,b.jpg", "1200000", "palmar_l")]  # a comma needs quoting
    write_split_csv(tmp_path / "splits" / "dorsal_r" / "train.csv", rows)
    text = (tmp_path / "splits" / "dorsal_r" / "train.csv").read_text()
    assert text == ('image,identity,aspect\nHands/Hand_0000002.jpg,0000000,dorsal_r\n'
                    '"Hands/a,b.jpg",1200000,palmar_l\n')
    assert read_split_csv(tmp_path / "splits" / "dorsal_r" / "train.csv", tmp_path) == rows
    assert load_split(tmp_path, tmp_path / "splits", "dorsal_r", "train") == rows


@pytest.mark.parametrize("content, fragment", [
    ("image,id,aspect\n", "header must be exactly image,identity,aspect"),
    ("image,identity,aspect\nHands/x.jpg,1\n", "bad.csv:2: expected 3 non-empty fields"),
    ("image,identity,aspect\nHands/x.jpg,1,dorsal_r\nHands/gone.jpg,2,dorsal_r\n",
     "1 of 2 images not found under"),
])
def test_read_split_csv_errors(tmp_path, content, fragment):
    touch(tmp_path / "Hands" / "x.jpg")
    (tmp_path / "bad.csv").write_text(content)
    with pytest.raises(UserError, match=fragment) as error:
        read_split_csv(tmp_path / "bad.csv", tmp_path)
    assert "bad.csv" in str(error.value)
    if "not found" in fragment:
        assert "Hands/gone.jpg" in str(error.value)


def test_load_split_errors(tmp_path):
    (tmp_path / "splits" / "dorsal_r").mkdir(parents=True)
    with pytest.raises(UserError, match=r"dorsal_r/query_4\.csv: split file not found"):
        load_split(tmp_path, tmp_path / "splits", "dorsal_r", "query_4")
    with pytest.raises(UserError, match="unknown split name 'query4'"):
        load_split(tmp_path, tmp_path / "splits", "dorsal_r", "query4")
    with pytest.raises(UserError, match="nowhere: splits folder not found"):
        count_splits(tmp_path / "nowhere", "dorsal_r")


def test_count_splits_counts_complete_pairs(tmp_path):
    splits = tmp_path / "splits"
    for name in ["train", "query_0", "gallery_0", "query_1", "gallery_1", "query_2"]:
        write_split_csv(splits / "palmar_r" / f"{name}.csv", [])
    assert count_splits(splits, "palmar_r") == 2
    assert count_splits(splits, "dorsal_l") == 0


def test_tree_names_follow_the_published_code():
    assert [tree_folder_name(n) for n in ["train", "query_3", "gallery_3", "gallery_12_all"]] == \
        ["train", "query3", "gallery3", "gallery12_all"]
    # the published gallery_all script (cases 1-4): millions added to each other aspect's ids
    published = {"dorsal_r": {"dorsal_l": 11, "palmar_r": 21, "palmar_l": 31},
                 "dorsal_l": {"dorsal_r": 11, "palmar_r": 21, "palmar_l": 31},
                 "palmar_r": {"dorsal_l": 11, "dorsal_r": 21, "palmar_l": 31},
                 "palmar_l": {"palmar_r": 11, "dorsal_r": 21, "dorsal_l": 31}}
    for query_aspect, offsets in published.items():
        for aspect, millions in {**offsets, query_aspect: 0}.items():
            other = Sample("x.jpg", "0001043", aspect, Path("/x.jpg"))
            expected = str(millions * 1_000_000 + 1043) if millions else "0001043"
            assert tree_identity(other, query_aspect) == expected


def test_published_tree_with_offsets_and_underscored_names(tmp_path):
    """A tree as other tools leave it: copies, offset ids in gallery<i>_all, a '1200000 ' folder."""
    tree = tmp_path / "data" / "train_val_test_split_palmar_l"
    touch(tree / "query_0" / "1200000 " / "Hand_1.jpg")
    touch(tree / "gallery_0" / "1200000 " / "Hand_2.jpg")
    touch(tree / "gallery0_all" / "1200000 " / "Hand_2.jpg")
    touch(tree / "gallery0_all" / "11001052" / "Hand_3.jpg")  # palmar_r's 0001052
    touch(tree / "gallery0_all" / "31001040" / "Hand_4.jpg")  # dorsal_l's 0001040
    (tree / "gallery0_all" / "31001040" / "Thumbs.db").write_text("")
    root = tmp_path / "data"
    assert count_splits(root, "palmar_l") == 1
    assert count_splits(root, "palmar_r") == 0
    gallery_all = load_split(root, root, "palmar_l", "gallery_0_all")
    assert sorted((s.image, s.identity, s.aspect) for s in gallery_all) == [
        ("train_val_test_split_palmar_l/gallery0_all/11001052/Hand_3.jpg", "0001052", "palmar_r"),
        ("train_val_test_split_palmar_l/gallery0_all/1200000 /Hand_2.jpg", "1200000", "palmar_l"),
        ("train_val_test_split_palmar_l/gallery0_all/31001040/Hand_4.jpg", "0001040", "dorsal_l"),
    ]
    query = load_split(tmp_path / "elsewhere", tree, "palmar_l", "query_0")  # images outside --data
    assert [(s.image, s.identity) for s in query] == [(str(tree / "query_0" / "1200000 " / "Hand_1.jpg"),
                                                       "1200000")]
    with pytest.raises(UserError, match="holds aspect 'palmar_l', not 'dorsal_r'"):
        load_split(root, tree, "dorsal_r", "query_0")
    with pytest.raises(UserError, match="train_val_test_split_palmar_l/test: split folder not found"):
        load_split(root, root, "palmar_l", "test")


def test_hd_script_tree_without_aspect_suffix(tmp_path):
    tree = tmp_path / "Original Images" / "train_val_test_split"
    touch(tree / "gallery0" / "1502" / "502_1.jpg")
    touch(tree / "query0" / "450" / "450_2.jpg")
    gallery = load_split(tmp_path, tmp_path / "Original Images", "hd", "gallery_0")
    assert [(s.image, s.identity, s.aspect) for s in gallery] == [
        ("Original Images/train_val_test_split/gallery0/1502/502_1.jpg", "1502", "hd")]
    assert count_splits(tmp_path / "Original Images", "hd") == 1
