"""Decoded-image cache: each image is decoded and resized once into a memory-mapped uint8 array.

Decoding a 1600×1200 JPEG costs ~10 ms of CPU; reading the stored square from the page cache costs
microseconds, so training never waits for JPEG decoding after the first run.

Files in the cache folder (``$HANDCLIP_CACHE_DIR``, else ``~/.cache/handclip``), per key:
  ``<key>.npy``   (N, size, size, 3) uint8; row i is the i-th path, stored by ``images.load_resized``
  ``<key>.json``  the paths; written last, so its presence marks the ``.npy`` as complete
  ``<key>.lock``  held (flock) while building: a second process waits, then reuses the result
The key hashes every (resolved path, file size, mtime) in order, the size and ``FORMAT_VERSION``:
a changed image, list or size is a different cache, never a stale one.
"""
from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import math
import multiprocessing
import os
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from handclip.data.images import load_resized
from handclip.errors import UserError
from handclip.fileio import atomic_write_json
from handclip.progress import progress as progress_bar

FORMAT_VERSION = 1  # bump when the stored geometry or resampling changes
CHUNK = 16  # images per task handed to a decoding worker
MAX_WORKERS = 8


def default_cache_dir() -> Path:
    return Path(os.environ.get("HANDCLIP_CACHE_DIR") or Path.home() / ".cache" / "handclip")


def default_workers() -> int:
    # CPUs this process may run on: a job scheduler may grant fewer than the machine has (Linux only)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(cpus, MAX_WORKERS)


def cache_key(paths: Sequence[str | os.PathLike], size: int) -> str:
    """sha256 over the ordered (resolved path, file size, mtime_ns) list, the size and the format."""
    digest = hashlib.sha256(f"handclip image cache v{FORMAT_VERSION} size {size}\n".encode())
    for path in paths:
        path = Path(path).resolve()
        try:
            stat = path.stat()
        except OSError as exc:
            raise UserError(f"cannot read image {path}: {exc.strerror or exc}") from None
        digest.update(json.dumps([str(path), stat.st_size, stat.st_mtime_ns]).encode() + b"\n")
    return digest.hexdigest()


class ImageCache:
    """The decoded images of a path list: ``cache[i]`` is image i as a (size, size, 3) uint8 array."""

    def __init__(self, file: Path, array: np.ndarray):
        self.file = file
        self.array = array  # read-only memmap (N, size, size, 3); fancy indexing returns a copy

    @classmethod
    def open_or_build(cls, paths: Sequence[str | os.PathLike], size: int, cache_dir: str | os.PathLike | None = None,
                      progress: bool = False, workers: int | None = None) -> "ImageCache":
        """Open the cache of ``paths`` at ``size``, decoding the images first if no complete one exists."""
        paths = [Path(p) for p in paths]
        folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        key = cache_key(paths, size)
        file, meta = folder / f"{key}.npy", folder / f"{key}.json"
        shape = (len(paths), size, size, 3)
        array = _open_complete(file, meta, shape)
        if array is None:
            with _build_lock(folder / f"{key}.lock"):
                array = _open_complete(file, meta, shape)  # another process may have built it meanwhile
                if array is None:
                    _build(paths, size, file, meta, progress, workers or default_workers())
                    array = _open_complete(file, meta, shape)
        return cls(file, array)

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, index: int) -> np.ndarray:
        return self.array[index]

    @property
    def size(self) -> int:
        return self.array.shape[1]

    # DataLoader workers receive the file name and map it again, not a pickled copy of the pixels.
    def __getstate__(self) -> dict:
        return {"file": self.file}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["file"], np.load(state["file"], mmap_mode="r"))


def _open_complete(file: Path, meta: Path, shape: tuple[int, ...]) -> np.ndarray | None:
    if not meta.exists():
        return None
    try:
        array = np.load(file, mmap_mode="r")
    except (OSError, ValueError):
        return None
    return array if array.shape == shape and array.dtype == np.uint8 else None


@contextlib.contextmanager
def _build_lock(lock_file: Path):
    try:
        lock_file.parent.mkdir(parents=True, exist_ok=True)
        handle = open(lock_file, "a")
    except OSError as exc:
        raise UserError(f"cannot write the image cache in {lock_file.parent}: {exc.strerror or exc} "
                        f"(set HANDCLIP_CACHE_DIR to a writable folder)") from None
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # released when the file closes
        yield


def _build(paths: list[Path], size: int, file: Path, meta: Path, progress: bool, workers: int) -> None:
    # The lock is held: temporary files of this key are leftovers of a killed build.
    for leftover in file.parent.glob(f".{file.stem}.*.tmp"):
        leftover.unlink(missing_ok=True)
    tmp = file.parent / f".{file.stem}.{os.getpid()}.tmp"
    try:
        _decode_into(tmp, paths, size, progress, workers)
        os.replace(tmp, file)
        atomic_write_json(meta, {"format": FORMAT_VERSION, "size": size, "count": len(paths),
                                 "paths": [str(p.resolve()) for p in paths]})
    except OSError as exc:
        raise UserError(f"cannot write the image cache {file}: {exc.strerror or exc}") from None
    finally:
        tmp.unlink(missing_ok=True)


def _decode_into(tmp: Path, paths: list[Path], size: int, progress: bool, workers: int) -> None:
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(paths), size, size, 3))
    if hasattr(os, "posix_fallocate"):  # not on macOS
        with open(tmp, "r+b") as handle:
            # Reserve the disk space now: a full disk then fails here, not with SIGBUS mid-write.
            os.posix_fallocate(handle.fileno(), 0, os.fstat(handle.fileno()).st_size)
    images = progress_bar(_decode_all(paths, size, workers), total=len(paths), desc="decode images", unit="img",
                          enabled=progress)
    for i, image in enumerate(images):
        out[i] = image
    out.flush()


def _decode_all(paths: list[Path], size: int, workers: int) -> Iterator[np.ndarray]:
    """``load_resized`` of each path, in order; in worker processes when there is enough to share."""
    decode = functools.partial(load_resized, size=size)
    workers = min(workers, math.ceil(len(paths) / CHUNK))
    if workers <= 1:
        yield from map(decode, paths)
        return
    with multiprocessing.Pool(workers) as pool:
        yield from pool.imap(decode, paths, chunksize=CHUNK)
