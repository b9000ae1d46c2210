"""Decoded-image cache: equal to direct decoding, built once, rebuilt on change, safe when
interrupted or built by two processes at once, corrupt images named."""
import multiprocessing
import os
import pickle
import time

import numpy as np
import pytest
from PIL import Image

import handclip.data.cache as cache_module
from handclip.data.cache import ImageCache, cache_key
from handclip.data.images import load_resized
from handclip.errors import UserError

SIZE = 16


def write_photos(folder, count, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"hand_{i:03d}.jpg" for i in range(count)]
    for path in paths:
        Image.fromarray(rng.integers(0, 256, (24, 32, 3), np.uint8)).save(path)
    return paths


@pytest.fixture
def photos(tmp_path):
    return write_photos(tmp_path / "photos", 5)


@pytest.fixture
def decodes(monkeypatch):
    """Counts the images the cache decodes in this process."""
    calls = []

    def counting(path, size):
        calls.append(path)
        return load_resized(path, size)

    monkeypatch.setattr(cache_module, "load_resized", counting)
    return calls


def cache_files(folder, suffix):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(suffix))


def test_cached_pixels_equal_direct_decoding_with_worker_processes(tmp_path):
    paths = write_photos(tmp_path / "photos", 2 * cache_module.CHUNK + 3)  # enough for 2 workers
    cache = ImageCache.open_or_build(paths, SIZE, tmp_path / "cache", workers=2)
    assert len(cache) == len(paths) and cache.array.shape == (len(paths), SIZE, SIZE, 3)
    assert cache.array.dtype == np.uint8
    for i, path in enumerate(paths):
        assert np.array_equal(cache[i], load_resized(path, SIZE))


def test_second_open_reuses_the_cache_without_decoding(photos, tmp_path, decodes):
    first = ImageCache.open_or_build(photos, SIZE, tmp_path / "cache", workers=1)
    assert len(decodes) == len(photos)
    built_at = first.file.stat().st_mtime_ns
    second = ImageCache.open_or_build(photos, SIZE, tmp_path / "cache", workers=1)
    assert len(decodes) == len(photos)
    assert second.file == first.file and second.file.stat().st_mtime_ns == built_at
    assert np.array_equal(second.array, first.array)


def test_default_folder_comes_from_the_environment(photos, tmp_path, monkeypatch):
    monkeypatch.setenv("HANDCLIP_CACHE_DIR", str(tmp_path / "env-cache"))
    cache = ImageCache.open_or_build(photos, SIZE)
    assert cache.file.parent == tmp_path / "env-cache"


def test_a_changed_image_rebuilds(photos, tmp_path):
    folder = tmp_path / "cache"
    old = ImageCache.open_or_build(photos, SIZE, folder)
    Image.new("RGB", (32, 24), (10, 200, 30)).save(photos[2])
    os.utime(photos[2], ns=(time.time_ns(), photos[2].stat().st_mtime_ns + 10**9))  # coarse clocks
    new = ImageCache.open_or_build(photos, SIZE, folder)
    assert new.file != old.file
    assert np.array_equal(new[2], load_resized(photos[2], SIZE))
    assert not np.array_equal(new[2], old[2])
    assert np.array_equal(new[0], old[0])


def test_a_different_size_or_order_is_a_different_cache(photos, tmp_path):
    small = ImageCache.open_or_build(photos, SIZE, tmp_path / "cache")
    large = ImageCache.open_or_build(photos, SIZE * 2, tmp_path / "cache")
    assert small.file != large.file and large.array.shape == (len(photos), 2 * SIZE, 2 * SIZE, 3)
    assert cache_key(photos[::-1], SIZE) != cache_key(photos, SIZE)
    assert len(cache_files(tmp_path / "cache", ".npy")) == 2


def test_an_interrupted_build_leaves_nothing_that_is_used(photos, tmp_path, monkeypatch):
    folder = tmp_path / "cache"

    def fail_on_third(path, size, calls=[]):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return load_resized(path, size)

    monkeypatch.setattr(cache_module, "load_resized", fail_on_third)
    with pytest.raises(KeyboardInterrupt):
        ImageCache.open_or_build(photos, SIZE, folder, workers=1)
    assert cache_files(folder, ".npy") == cache_files(folder, ".json") == cache_files(folder, ".tmp") == []
    # a build killed outright leaves its temporary file; the next build removes it and starts over
    (folder / f".{cache_key(photos, SIZE)}.99999.tmp").write_bytes(b"half an array")
    monkeypatch.setattr(cache_module, "load_resized", load_resized)
    cache = ImageCache.open_or_build(photos, SIZE, folder, workers=1)
    assert all(np.array_equal(cache[i], load_resized(p, SIZE)) for i, p in enumerate(photos))
    assert cache_files(folder, ".tmp") == []


def test_an_array_without_its_completion_mark_is_rebuilt(photos, tmp_path, decodes):
    folder = tmp_path / "cache"
    cache = ImageCache.open_or_build(photos, SIZE, folder, workers=1)
    cache.file.with_suffix(".json").unlink()
    ImageCache.open_or_build(photos, SIZE, folder, workers=1)
    assert len(decodes) == 2 * len(photos)


def _build_slowly_in_child(paths, folder, log, results):
    """Runs in a forked process: decodes slowly so that two builds overlap; logs each decode."""
    def slow(path, size):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(0.05)
        return load_resized(path, size)

    cache_module.load_resized = slow
    cache = ImageCache.open_or_build(paths, SIZE, folder, workers=1)
    results.put((str(cache.file), np.asarray(cache.array).tobytes()))


def test_two_processes_building_at_once_share_one_build(photos, tmp_path):
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    log = tmp_path / "decodes.log"
    children = [context.Process(target=_build_slowly_in_child, args=(photos, tmp_path / "cache", log, results))
                for _ in range(2)]
    for child in children:
        child.start()
    outcomes = [results.get(timeout=60) for _ in children]
    for child in children:
        child.join(timeout=60)
        assert child.exitcode == 0
    expected = np.stack([load_resized(p, SIZE) for p in photos]).tobytes()
    assert [pixels == expected for _, pixels in outcomes] == [True, True]
    assert outcomes[0][0] == outcomes[1][0]
    assert len(log.read_text().split()) == len(photos)  # only one process decoded
    assert len(cache_files(tmp_path / "cache", ".npy")) == 1


def test_a_corrupt_image_is_named_and_no_cache_is_left(tmp_path):
    paths = write_photos(tmp_path / "photos", 2 * cache_module.CHUNK + 3)
    paths[20].write_bytes(paths[20].read_bytes()[:300])
    folder = tmp_path / "cache"
    with pytest.raises(UserError, match=r"cannot read image .*hand_020\.jpg"):
        ImageCache.open_or_build(paths, SIZE, folder, workers=2)
    assert cache_files(folder, ".npy") == cache_files(folder, ".json") == cache_files(folder, ".tmp") == []


def test_a_missing_image_is_named(photos, tmp_path):
    photos[1].unlink()
    with pytest.raises(UserError, match=r"cannot read image .*hand_001\.jpg: No such file"):
        ImageCache.open_or_build(photos, SIZE, tmp_path / "cache")


def test_pickling_passes_the_file_name_not_the_pixels(photos, tmp_path):
    cache = ImageCache.open_or_build(photos, SIZE, tmp_path / "cache")
    payload = pickle.dumps(cache)
    assert len(payload) < 1000
    assert np.array_equal(pickle.loads(payload).array, cache.array)
