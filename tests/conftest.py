"""Shared fixtures: one synthetic hand set and its splits per test session, an isolated image
cache, and no network."""
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("HANDCLIP_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "image-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory):
    """A small synthetic 11k-format dataset (24 identities, 4 photos per aspect)."""
    from handclip.data.synth import synthesize

    root = tmp_path_factory.mktemp("synth")
    synthesize(root, ids=24, per_aspect=4, size=(96, 72), seed=0)
    return root


@pytest.fixture(scope="session")
def splits_dir(synth_root):
    """The published protocol on the synthetic set, 3 splits."""
    from handclip.data.prepare import prepare_11k

    out = synth_root / "splits"
    prepare_11k(root=synth_root, out=out, seed=0, num_splits=3)
    return out


@pytest.fixture(scope="session")
def tiny_run(synth_root, splits_dir, tmp_path_factory):
    """A tiny-vit run trained for 2 epochs on dorsal_r: a real checkpoint for evaluation tests."""
    from handclip.engine.train import run_training

    os.environ["HANDCLIP_CACHE_DIR"] = str(tmp_path_factory.getbasetemp() / "image-cache")
    out = tmp_path_factory.mktemp("runs") / "tiny"
    config = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny-cpu.yaml")
    run_training(config_path=config, overrides={"train.epochs": 2, "train.device": "cpu"},
                 data_root=synth_root, splits=splits_dir, out=out, quiet=True)
    return out


@pytest.fixture(scope="session")
def hd_root(tmp_path_factory):
    """A tiny fake HK PolyU HD download: six training subjects (ids <= 447) with 4 photos, four test
    subjects with 3, two 502-712 distractor subjects with 2; small seeded JPEGs, one colour per subject."""
    root = tmp_path_factory.mktemp("hd")
    rng = np.random.default_rng(0)
    plan = {"1-501": {**dict.fromkeys(range(442, 448), 4), **dict.fromkeys(range(448, 452), 3)},
            "502-712": {502: 2, 503: 2}}
    for folder, subjects in plan.items():
        (root / "Original Images" / folder).mkdir(parents=True)
        for subject, count in subjects.items():
            colour = rng.integers(0, 256, 3)
            for n in range(1, count + 1):
                pixels = np.clip(colour + rng.normal(0, 30, (24, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / "Original Images" / folder / f"{subject}_{n}.jpg")
    return root


@dataclass(frozen=True)
class PhotoSample:
    """The one field of manifests.Sample that datasets read."""
    path: Path


@pytest.fixture
def make_photos(tmp_path):
    """``make_photos(n)``: n small random JPEGs as samples (seeded)."""
    def make(count: int) -> list[PhotoSample]:
        rng = np.random.default_rng(0)
        paths = [tmp_path / f"hand_{i}.jpg" for i in range(count)]
        for path in paths:
            Image.fromarray(rng.integers(0, 256, (30, 40, 3), np.uint8)).save(path)
        return [PhotoSample(p) for p in paths]
    return make


@pytest.fixture
def write_calibrator():
    """Writes a real logistic calibrator, fit on separable synthetic scores, as `handclip calibrate`
    saves it, for the checkpoint of sha256 ``checkpoint_sha256``; returns the calibrator."""
    from handclip.fileio import atomic_write_json
    from handclip.forensic.calibration import fit_calibrator

    def write(cal_dir, checkpoint_sha256):
        rng = np.random.default_rng(0)
        scores = np.concatenate([rng.normal(0.8, 0.1, 200), rng.normal(0.3, 0.1, 200)])
        calibrator = fit_calibrator("logistic", scores, np.r_[np.ones(200), np.zeros(200)])
        calibrator.info["checkpoint"] = {"sha256": checkpoint_sha256}
        atomic_write_json(cal_dir / "calibrator.json", calibrator.to_dict())
        return calibrator

    return write


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on the 2 shared cores: with a second thread spinning against other processes,
    small matmuls (the text tower's above all) ran many times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
