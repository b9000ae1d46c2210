"""The input path and its measurement: the read-ahead batch loader, `handclip bench`, `handclip cache build`.

No test here asserts a speed: figures are checked for presence, sign and consistency only.
"""
import json
from pathlib import Path

import pytest
import torch

from handclip.cli import main
from handclip.config import load_config
from handclip.data.datasets import BatchLoader, ImageDataset
from handclip.data.samplers import PKSampler
from handclip.engine import bench
from handclip.engine.cache_cli import build_cache_for_splits
from handclip.engine.evaluation import same_aspect_protocol
from handclip.data.training import load_training_data
from handclip.engine.state import train_cache_size

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny-cpu.yaml"


@pytest.fixture
def photos(make_photos):
    return make_photos(9)


# ---- BatchLoader --------------------------------------------------------------------------------
BATCHES = [[4, 0, 8], [1, 1], [7, 2, 3, 5], [6]]


@pytest.mark.parametrize("cache, workers", [(True, 0), (False, 0), (False, 2)])
def test_loader_yields_each_batch_in_order_with_the_stored_pixels(photos, tmp_path, cache, workers):
    reference = ImageDataset(photos, 12, cache_dir=tmp_path / "cache")
    dataset = ImageDataset(photos, 12, cache=cache, cache_dir=tmp_path / "cache")
    loaded = list(BatchLoader(dataset, BATCHES, num_workers=workers, depth=1))
    assert [list(indices) for indices, _ in loaded] == BATCHES
    for indices, images in loaded:
        assert images.dtype == torch.uint8 and torch.equal(images, reference.batch(indices))


def test_loader_passes_errors_on_and_can_be_left_early(photos, tmp_path):
    dataset = ImageDataset(photos, 12, cache_dir=tmp_path / "cache")
    with pytest.raises(IndexError, match=r"\[0, 9\)"):
        list(BatchLoader(dataset, [[0], [9]]))
    loader = iter(BatchLoader(dataset, BATCHES * 50, depth=2))
    next(loader)
    loader.close()  # the reading thread stops; nothing hangs


def test_loader_follows_the_sampler_epoch(photos, tmp_path):
    dataset = ImageDataset(photos, 12, cache_dir=tmp_path / "cache")
    sampler = PKSampler([0, 0, 1, 1, 2, 2, 3, 3, 3], batch_size=4, k=2, seed=0)
    loader = BatchLoader(dataset, sampler)
    for epoch in range(2):
        sampler.set_epoch(epoch)
        assert [list(i) for i, _ in loader] == [list(b) for b in sampler]


# ---- bench --------------------------------------------------------------------------------------
def test_throughput_counts_only_the_steps_after_warm_up(monkeypatch):
    clock = iter(range(100))  # a fake clock: each reading is one second later
    monkeypatch.setattr(bench.time, "perf_counter", lambda: float(next(clock)))
    steps = iter([1000, 1000, 1000, 10, 10, 10, 10])
    # read after the 3rd step and after the 7th: 40 images in 1 s
    assert bench.images_per_second(steps, torch.device("cpu"), warmup=3) == 40.0
    with pytest.raises(ValueError, match="more than 3 steps"):
        bench.images_per_second(iter([5, 5, 5]), torch.device("cpu"), warmup=3)


def test_batch_plan_continues_into_later_epochs():
    sampler = PKSampler([0, 0, 1, 1, 2, 2], batch_size=4, k=2, seed=3)
    per_epoch = len(sampler)
    plan = bench.batch_plan(sampler, 3 * per_epoch)
    expected = []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        expected += [list(b) for b in sampler]
    assert [list(b) for b in plan] == expected


def test_bench_writes_every_figure(synth_root, splits_dir, tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = main(["bench", "--config", str(CONFIG), "--data", str(synth_root), "--splits", str(splits_dir),
                 "--aspect", "dorsal_r", "--out", str(out), "--steps", "2", "--device", "cpu",
                 "--image-size", "64", "--batch-size", "16"])
    assert code == 0
    result = json.loads(out.read_text())
    figures = [key for key, _ in bench.MEASURES]
    assert all(result[key] > 0 for key in figures)
    ratios = result["ratios"]
    assert ratios["train_e2e_over_model_only"] == pytest.approx(result["train_e2e_img_s"] / result["model_only_img_s"])
    assert ratios["cached_over_jpeg_loader"] == pytest.approx(result["cached_loader_img_s"] / result["jpeg_loader_img_s"])
    assert result["targets"] == {"train_e2e_over_model_only": 0.9, "cached_over_jpeg_loader": 3.0}
    settings = result["settings"]
    assert (settings["arch"], settings["image_size"], settings["batch_size"], settings["steps"]) == ("tiny-vit", 64, 16, 2)
    assert settings["stored_size"] == 73 and settings["source_image"] == "96x72"
    assert result["device"]["device"] == "cpu" and result["device"]["cpu_cores"] >= 1
    table = capsys.readouterr().out
    assert all(label in table for _, label in bench.MEASURES) and "target >= 3" in table


def test_bench_needs_a_step_to_time(synth_root, splits_dir, tmp_path, capsys):
    code = main(["bench", "--config", str(CONFIG), "--data", str(synth_root), "--splits", str(splits_dir),
                 "--aspect", "dorsal_r", "--out", str(tmp_path / "b.json"), "--steps", "0"])
    assert code == 2 and "--steps 0" in capsys.readouterr().err
    assert not (tmp_path / "b.json").exists()


# ---- cache build --------------------------------------------------------------------------------
def test_cache_build_makes_the_caches_train_and_evaluate_read(synth_root, splits_dir, capsys):
    assert main(["cache", "build", "--data", str(synth_root), "--splits", str(splits_dir), "--aspect", "dorsal_l",
                 "--size", "128", "--quiet"]) == 0
    assert "dorsal_l" in capsys.readouterr().out
    rows = build_cache_for_splits(synth_root, splits_dir, ["dorsal_l"], size=128, quiet=True)
    assert [(r["images"], r["size"], r["status"]) for r in rows] == [
        ("train+val", 128, "found"), ("train+val, validation", 112, "found"), ("test", 112, "found"),
        ("test, gallery-all", 112, "found")]

    config = load_config(CONFIG, {"data.aspects": ["dorsal_l"], "train.device": "cpu"})
    data = load_training_data(synth_root, splits_dir, config.data.aspects)
    assert train_cache_size(config, 112) == 128
    train = ImageDataset(data.samples, size=128)
    validation = ImageDataset(data.samples, size=112)
    test = ImageDataset(same_aspect_protocol(synth_root, splits_dir, "dorsal_l", None, False).images(), size=112)
    assert [str(d.cache.file) for d in (train, validation, test)] == [r["file"] for r in rows[:3]]
    assert rows[0]["count"] == len(data.train) + len(data.val)


def test_cache_build_of_every_aspect_and_bad_input(synth_root, splits_dir, tmp_path, capsys):
    rows = build_cache_for_splits(synth_root, splits_dir, None, size=32, quiet=True)
    assert sorted({r["aspect"] for r in rows}) == ["dorsal_l", "dorsal_r", "palmar_l", "palmar_r"]
    (tmp_path / "empty").mkdir()
    for args, message in ([["--splits", str(tmp_path / "empty")], "no aspect has splits"],
                          [["--splits", str(splits_dir), "--aspect", "hand_x"], "hand_x"]):
        assert main(["cache", "build", "--data", str(synth_root), *args, "--quiet"]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
