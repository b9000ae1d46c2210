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
    from handclip.data.protocols import prepare_11k

    out = synth_root / "splits"
    prepare_11k(root=synth_root, out=out, seed=0, num_splits=3)
    return out


@pytest.fixture(scope="session")
def tiny_run(synth_root, splits_dir, tmp_path_factory):
    """A tiny-vit run trained for 2 epochs on dorsal_r: a real checkpoint for evaluation tests."""
    from handclip.engine.trainer import run_training

    os.environ["HANDCLIP_CACHE_DIR"] = str(tmp_path_factory.getbasetemp() / "image-cache")
    out = tmp_path_factory.mktemp("runs") / "tiny"
    config = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny-cpu.yaml")
    run_training(config_path=config, overrides={"train.epochs": 2, "train.device": "cpu"},
                 data_root=synth_root, splits=splits_dir, out=out, quiet=True)
    return out


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
