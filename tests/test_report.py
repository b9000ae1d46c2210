import csv
import itertools
import re
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from PIL import Image

from handclip.errors import UserError
from handclip.report import missed_identities, worst_queries
from handclip.report.grids import (BORDER, GREEN, PAD, RED, THUMB_BACKGROUND, RankedRow, draw_ranked_grids,
                                   ranked_row)
from handclip.report.html import write_report
from handclip.report.plots import plot_cmc, plot_history

THUMB = 32


def draw_one_row(query, label, gallery, labels, scores, matches, path, thumb):
    return draw_ranked_grids([RankedRow(query, label, gallery, labels, scores, matches)], path, thumb)


@pytest.fixture
def hand_images(tmp_path):
    """Five small JPEGs in colours far from the frame colours (landscape, like the 11k photos)."""
    paths = []
    for i in range(5):
        path = tmp_path / "images" / f"Hand_{i:07d}.jpg"
        path.parent.mkdir(exist_ok=True)
        Image.new("RGB", (64, 48), (40 * i, 40 * i, 200)).save(path)
        paths.append(path)
    return paths


def frame_runs(image: Image.Image) -> list[list[str]]:
    """Per grid row, the frame colours left to right ("G"/"R"), read on the pixel line that
    crosses the most frame pixels (the frames' top edges); every frame must be whole there."""
    pixels = np.asarray(image.convert("RGB"))
    colour = np.full(pixels.shape[:2], "", dtype=object)
    colour[(pixels == GREEN).all(axis=2)] = "G"
    colour[(pixels == RED).all(axis=2)] = "R"
    framed = (colour != "").sum(axis=1)
    rows, y = [], 0
    while y < len(framed):
        if framed[y] and framed[y] == framed[y:y + BORDER].max():  # first line of a band of frame edges
            runs = [(key, len(list(group))) for key, group in itertools.groupby(colour[y]) if key]
            assert all(length == THUMB + 2 * BORDER for _, length in runs), runs
            assert colour[y][-PAD:].tolist() == [""] * PAD  # the margin on the right is left free
            rows.append([key for key, _ in runs])
            y += THUMB + 2 * BORDER
        y += 1
    return rows


# ---- grids ---------------------------------------------------------------------------------------------
def test_grid_frames_green_for_matches_red_otherwise(hand_images, tmp_path):
    out = draw_one_row(hand_images[0], "0000001", hand_images[1:], ["a", "b", "c", "d"], [0.1, 0.2, 0.3, 0.4],
                           [True, False, True, False], tmp_path / "grid.png", thumb=THUMB)
    with Image.open(out) as image:
        assert frame_runs(image) == [["G", "R", "G", "R"]]


def test_grid_size_follows_the_number_of_thumbnails(hand_images, tmp_path):
    def size(num_gallery, num_rows):
        row = RankedRow(hand_images[0], "q", hand_images[1:1 + num_gallery], ["x"] * num_gallery,
                        [0.5] * num_gallery, [False] * num_gallery)
        with Image.open(draw_ranked_grids([row] * num_rows, tmp_path / "size.png", thumb=THUMB)) as image:
            assert frame_runs(image) == [["R"] * num_gallery] * num_rows
            return image.size

    one_row_two, one_row_four, two_rows_four = size(2, 1), size(4, 1), size(4, 2)
    assert one_row_four[0] - one_row_two[0] == 2 * (THUMB + 2 * BORDER + PAD)
    assert two_rows_four[0] == one_row_four[0]
    row_height = two_rows_four[1] - one_row_four[1]
    assert row_height > THUMB + 2 * BORDER and one_row_four[1] == PAD + row_height


def test_grid_draws_unreadable_images_as_tiles(hand_images, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    out = draw_one_row(hand_images[0], "q", [broken, tmp_path / "gone.jpg"], ["a", "b"], [0.1, 0.2],
                           [True, True], tmp_path / "grid.png", thumb=THUMB)
    with Image.open(out) as image:
        assert frame_runs(image) == [["G", "G"]]
        pixels = np.asarray(image.convert("RGB"))
    assert (pixels == THUMB_BACKGROUND).all(axis=2).sum() > THUMB * THUMB  # two grey tiles


def test_ranked_row_orders_by_distance_and_marks_matches(hand_images):
    dist = np.array([[0.9, 0.1, 0.5, 0.3], [0.2, 0.2, 0.2, 0.2]])
    row = ranked_row(dist, 0, ["q0", "q1"], ["7", "8"], hand_images[:4], ["8", "7", "7", "9"], top_k=3)
    assert row.query_path == "q0" and row.query_label == "7"
    assert list(row.gallery_paths) == [hand_images[1], hand_images[3], hand_images[2]]
    assert list(row.gallery_labels) == ["7", "9", "7"]
    assert row.scores == pytest.approx([0.1, 0.3, 0.5])
    assert list(row.is_match) == [True, False, True]
    tied = ranked_row(dist, 1, ["q0", "q1"], ["7", "8"], hand_images[:4], ["8", "7", "7", "9"], top_k=10)
    assert list(tied.gallery_paths) == hand_images[:4]


def test_grid_rejects_rows_of_unequal_lengths(hand_images, tmp_path):
    with pytest.raises(ValueError, match="length"):
        draw_one_row(hand_images[0], "q", hand_images[1:3], ["a"], [0.1, 0.2], [True, False],
                         tmp_path / "grid.png", thumb=THUMB)


# ---- choosing what to show ------------------------------------------------------------------------------
def test_missed_identities_and_worst_queries():
    gallery_ids = ["A", "B", "C"]
    query_ids = ["A", "A", "B", "C", "C", "C", "Z"]
    dist = np.array([
        [0.1, 0.5, 0.9],  # A right
        [0.4, 0.3, 0.9],  # A wrong, match at rank 2, 0.1 behind
        [0.2, 0.6, 0.9],  # B wrong, match at rank 2, 0.4 behind
        [0.3, 0.2, 0.1],  # C right
        [0.1, 0.2, 0.3],  # C wrong, match at rank 3
        [0.1, 0.9, 0.2],  # C wrong, match at rank 2, 0.1 behind
        [0.5, 0.5, 0.5],  # Z not in the gallery: never counted
    ])
    assert missed_identities(dist, query_ids, gallery_ids) == [("C", 2), ("A", 1), ("B", 1)]
    assert missed_identities(dist, query_ids, gallery_ids, top=1) == [("C", 2)]
    assert worst_queries(dist, query_ids, gallery_ids, count=3) == [4, 2, 1]
    assert sorted(worst_queries(dist, query_ids, gallery_ids, count=10)) == [0, 1, 2, 3, 4, 5]


# ---- plots ----------------------------------------------------------------------------------------------
def assert_png(path: Path):
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 100 and image.height > 100


def test_plot_cmc_writes_png(tmp_path):
    out = plot_cmc({"fine-tuned": np.linspace(0.8, 1.0, 10), "zero-shot": np.linspace(0.6, 0.9, 10)},
                   tmp_path / "plots" / "cmc.png")
    assert out == tmp_path / "plots" / "cmc.png"
    assert_png(out)


def write_history(path: Path, rows: list[dict]):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_plot_history_draws_losses_lr_and_accuracy(tmp_path):
    history = tmp_path / "history.csv"
    write_history(history, [
        {"epoch": e, "loss_ce": 2.0 / e, "loss_triplet": 0.5 / e, "loss": 2.5 / e, "lr": 1e-4 * e, "train_acc": 0.2 * e,
         "val_rank1": "" if e % 2 else 0.3 * e, "val_mAP": "" if e % 2 else 0.25 * e, "img_per_s": 100}
        for e in range(1, 5)])
    written = plot_history(history, tmp_path / "plots")
    assert written == [tmp_path / "plots" / name for name in ("loss.png", "lr.png", "accuracy.png")]
    for path in written:
        assert_png(path)


def test_plot_history_skips_curves_without_values(tmp_path):
    history = tmp_path / "history.csv"
    write_history(history, [{"epoch": e, "loss": 1.0, "lr": 0.1, "train_acc": "", "val_rank1": "", "val_mAP": ""}
                            for e in (1, 2)])
    assert [p.name for p in plot_history(history, tmp_path / "plots")] == ["loss.png", "lr.png"]
    assert not (tmp_path / "plots" / "accuracy.png").exists()


def test_plot_history_bad_input_names_file_row_and_column(tmp_path):
    history = tmp_path / "history.csv"
    history.write_text("epoch,loss\n1,0.5\n2,oops\n")
    with pytest.raises(UserError, match=r"history\.csv: row 3, column 'loss': 'oops'"):
        plot_history(history, tmp_path / "plots")
    history.write_text("step,loss\n1,0.5\n")
    with pytest.raises(UserError, match="'epoch' column"):
        plot_history(history, tmp_path / "plots")
    with pytest.raises(UserError, match="missing.csv"):
        plot_history(tmp_path / "missing.csv", tmp_path / "plots")


# ---- html -----------------------------------------------------------------------------------------------
class ImageSources(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sources = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.sources.append(dict(attrs)["src"])


def result(aspect, rank1, std=0.0031):
    metrics = {"rank1": rank1, "rank5": 0.99, "rank10": 1.0, "mAP": 0.9798, "mINP": 0.9, "num_queries": 950.0}
    return {"aspect": aspect, "protocol": "single-aspect", "num_splits": 2,
            "splits": [dict(metrics, num_queries=950), dict(metrics, num_queries=950)],
            "mean": metrics, "std": {k: std for k in metrics}}


def test_report_links_every_picture_and_prints_percent_table(tmp_path, hand_images):
    out = tmp_path / "eval"
    draw_one_row(hand_images[0], "q", hand_images[1:3], ["a", "b"], [0.1, 0.2], [True, False],
                     out / "worst queries.png", thumb=THUMB)
    plot_cmc({"model": np.linspace(0.9, 1.0, 10)}, out / "cmc.png")
    history = tmp_path / "history.csv"
    write_history(history, [{"epoch": 1, "loss": 1.0, "lr": 0.1}, {"epoch": 2, "loss": 0.5, "lr": 0.1}])
    history_pngs = [p.relative_to(out) for p in plot_history(history, out / "history")]

    page = write_report(out, "dorsal <right> & co", {"aspects": [result("dorsal_r", 0.9745), result("hd", 0.9512)]},
                        images=[("Worst queries", "worst queries.png"), ("CMC", Path("cmc.png"))],
                        missed=[("0000123|dorsal_r", 4), ("<script>", 1)], history_pngs=history_pngs)
    assert page == out / "report.html"
    text = page.read_text(encoding="utf-8")
    parser = ImageSources()
    parser.feed(text)
    assert len(parser.sources) == 2 + len(history_pngs) == 4
    for source in parser.sources:
        assert not Path(source).is_absolute()
        assert (page.parent / unquote(source)).is_file()
    assert "dorsal &lt;right&gt; &amp; co" in text and "<script>" not in text
    assert "97.45 ± 0.31" in text and "95.12 ± 0.31" in text and "97.98 ± 0.31" in text
    assert "0000123|dorsal_r" in text


def test_report_accepts_flat_means_and_rejects_missing_pictures(tmp_path):
    flat = {"aspect": "trained", "rank1": 0.5, "rank5": 0.75, "rank10": 1.0, "mAP": 0.6, "mINP": 0.4,
            "num_queries": 12.0}
    text = write_report(tmp_path, "demo", [flat]).read_text(encoding="utf-8")
    assert "<td>50.00</td>" in text and "±" not in text
    with pytest.raises(ValueError, match="cmc.png"):
        write_report(tmp_path, "demo", [flat], images=[("CMC", "cmc.png")])
    (tmp_path / "abs.png").write_bytes(b"")
    with pytest.raises(ValueError, match="abs.png"):
        write_report(tmp_path, "demo", [flat], images=[("abs", tmp_path / "abs.png")])


def table_rows(text: str, marker: str) -> list[list[str]]:
    """The cells of every table row of ``text`` that contains ``marker``."""
    rows = re.findall(r"<tr>(.*?)</tr>", text)
    return [re.findall(r"<td>(.*?)</td>", row) for row in rows if marker in row]


def published_header(text: str) -> list[str]:
    (row,) = [row for row in re.findall(r"<tr>(.*?)</tr>", text) if "<th>source</th>" in row]
    return re.findall(r"<th>(.*?)</th>", row)


def test_report_shows_published_results_only_under_the_same_protocol(tmp_path):
    published = dict(result("dorsal_r", 0.5), protocol="published+rerank")
    text = write_report(tmp_path / "p", "published", published).read_text(encoding="utf-8")
    header = published_header(text)
    (mba,) = table_rows(text, "MBA-Net")
    assert mba[header.index("Rank-1")] == "97.45" and mba[header.index("mAP (trapezoid)")] == "97.98"
    assert mba[header.index("mAP")] == ""  # MBA-Net reports the trapezoid AP only
    assert table_rows(text, "GPA-Net") and not table_rows(text, "CLIP-FH")  # nor its zero-shot rows
    assert "Not shown, measured under another protocol" in text and "single-aspect" in text

    text = write_report(tmp_path / "s", "single", result("dorsal_r", 0.5)).read_text(encoding="utf-8")
    header = published_header(text)
    (thesis,) = table_rows(text, "CE+triplet+center")
    assert thesis[header.index("mAP")] == "92.20" and thesis[header.index("mAP (trapezoid)")] == ""
    assert len(table_rows(text, "zero-shot")) == 2 and not table_rows(text, "MBA-Net")
    assert "MBA-Net (ResNet50 (ImageNet), 324 px): published" in text

    text = write_report(tmp_path / "c", "cross", dict(result("dorsal_r->palmar_r", 0.5), protocol="cross-aspect"))
    assert "Published results" not in text.read_text(encoding="utf-8")
