"""The search benchmark (``benchmarks/search_bench.py``): enrolment throughput with a tiny model, and,
for galleries of random features inserted through the library, insertion rate, loading time, memory
and the latency (p50/p99) of one query's search.

Latency is the search alone (the query's features given): encoding a query is the model's cost and is
reported once, separately (``query_encode_ms``).
"""
from __future__ import annotations

import datetime
import hashlib
import os
import platform
import sqlite3
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from handclip.fileio import atomic_write_json
from handclip.gallery.enrol import collect_images, enrol
from handclip.gallery.store import Gallery, GalleryRecord, ModelInfo
from handclip.search.searcher import gallery_index

INSERT_BATCH = 10_000


def run_search_bench(out: str | os.PathLike, sizes=(10_000, 100_000, 1_000_000), dim: int = 512, queries: int = 200,
                     top: int = 20, extra_backends: dict | None = None, enrol_images: int = 128,
                     image_size: tuple[int, int] = (1600, 1200), workdir: str | os.PathLike | None = None) -> dict:
    """Measure and write ``out`` (JSON); ``extra_backends`` ``{rows: [backend, ...]}`` also times
    forced backends at those sizes (e.g. ``{1_000_000: ["float16"]}``)."""
    with tempfile.TemporaryDirectory(prefix="handclip-search-bench-", dir=workdir) as scratch:
        scratch = Path(scratch)
        result = {
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                        "platform": platform.platform(), "load_average_at_start": os.getloadavg()},
            "enrolment": bench_enrolment(scratch, enrol_images, image_size),
            "galleries": [],
        }
        for rows in sizes:
            for backend in ["auto", *(extra_backends or {}).get(rows, [])]:
                result["galleries"].append(bench_gallery(scratch, rows, dim, queries, top, backend))
                print(_line(result["galleries"][-1]), flush=True)
    result["machine"]["load_average_at_end"] = os.getloadavg()
    atomic_write_json(out, result)
    return result


def tiny_checkpoint(path: Path) -> Path:
    """A random-init tiny ViT checkpoint (the tests' and demo's architecture)."""
    from handclip.config import config_from_dict
    from handclip.engine.checkpoint import save_checkpoint
    from handclip.models.reid import build_reid_model

    config = config_from_dict({"model": {"arch": "tiny-vit", "pretrained": "none"}})
    torch.manual_seed(0)
    save_checkpoint(path, model=build_reid_model(config.model, num_classes=0), config=config, class_names=[], epoch=0)
    return path


def bench_enrolment(scratch: Path, count: int, image_size: tuple[int, int]) -> dict:
    """``gallery add`` of ``count`` synthetic JPEG photos (11k format) with a tiny model, batch 64."""
    from handclip.data.synth import synthesize

    per_identity = 16  # 4 aspects × 4 photos
    synthesize(scratch / "photos", ids=max(2, -(-count // per_identity)), per_aspect=4, size=image_size, seed=0)
    items = collect_images([scratch / "photos" / "Hands"])[:count]
    checkpoint = tiny_checkpoint(scratch / "tiny.pt")
    start = time.perf_counter()
    summary = enrol(scratch / "enrol.db", checkpoint, items, batch_size=64)
    seconds = time.perf_counter() - start
    return {"images": summary["added"], "photo_size": list(image_size), "model": "tiny-vit (random init), 112 px",
            "seconds": round(seconds, 2), "images_per_s": round(summary["added"] / seconds, 1),
            "note": "check + sha256 + model load + decode/resize + encode + one transaction per batch of 64"}


def fill_random(db: Path, rows: int, dim: int, seed: int = 0) -> float:
    """Insert ``rows`` random unit features through :meth:`Gallery.add`; returns rows per second."""
    model = ModelInfo(checkpoint_sha256="0" * 64, checkpoint="/none/random.pt", feature_dim=dim,
                      preprocessing={"image_size": 0, "note": "random features for the benchmark"})
    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    with Gallery.open_or_create(db, model) as gallery:
        for begin in range(0, rows, INSERT_BATCH):
            count = min(INSERT_BATCH, rows - begin)
            features = rng.standard_normal((count, dim), dtype=np.float32)
            features /= np.linalg.norm(features, axis=1, keepdims=True)
            gallery.add([GalleryRecord(hashlib.sha256(b"%d" % i).hexdigest(), f"/random/{i}.jpg", f,
                                       identity=str(i // 4)) for i, f in zip(range(begin, begin + count), features)])
    return rows / (time.perf_counter() - start)


def bench_gallery(scratch: Path, rows: int, dim: int, queries: int, top: int, backend: str) -> dict:
    """Load a random gallery of ``rows`` (made once per size) into an index and time one-query searches."""
    db = scratch / f"random-{rows}-{dim}.db"
    insert_rate = None if db.exists() else fill_random(db, rows, dim)
    rss_before = _rss_bytes()
    start = time.perf_counter()
    gallery = Gallery.open(db)  # stays open: the compact backends rescore from it, as Searcher's do
    _, index = gallery_index(gallery, backend)
    load_s = time.perf_counter() - start
    rss_growth = _rss_bytes() - rss_before
    rng = np.random.default_rng(1)
    near = _stored_features(db, rng.integers(1, rows + 1, queries))  # queries near gallery rows, as real ones are
    near += 0.05 * rng.standard_normal(near.shape, dtype=np.float32)
    try:
        index.search(near[:1], top)  # warm-up
        latencies_ms = []
        for query in near:
            begin = time.perf_counter()
            index.search(query[None], top)
            latencies_ms.append((time.perf_counter() - begin) * 1000)
    finally:
        gallery.close()
    return {"rows": rows, "dim": dim, "backend": index.backend, "top": top, "queries": queries,
            "insert_rows_per_s": None if insert_rate is None else round(insert_rate),
            "db_bytes": sum(_size(db.with_name(db.name + suffix)) for suffix in ("", "-wal")),
            "load_s": round(load_s, 2), "index_bytes": index.nbytes, "rss_growth_bytes": rss_growth,
            "latency_ms": {"p50": round(float(np.percentile(latencies_ms, 50)), 2),
                           "p99": round(float(np.percentile(latencies_ms, 99)), 2),
                           "max": round(float(np.max(latencies_ms)), 2)}}


def _stored_features(db: Path, ids) -> np.ndarray:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as connection:
        blobs = [connection.execute("SELECT features FROM images WHERE id = ?", (int(i),)).fetchone()[0] for i in ids]
    connection.close()
    return np.frombuffer(b"".join(blobs), dtype="<f4").reshape(len(ids), -1).copy()


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _line(g: dict) -> str:
    return (f"{g['rows']:>9} rows x {g['dim']} {g['backend']:<8} load {g['load_s']:6.1f} s  index "
            f"{g['index_bytes'] / 2**20:7.0f} MiB  RSS +{g['rss_growth_bytes'] / 2**20:6.0f} MiB  "
            f"p50 {g['latency_ms']['p50']:7.1f} ms  p99 {g['latency_ms']['p99']:7.1f} ms")
