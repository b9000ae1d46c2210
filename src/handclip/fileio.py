"""Atomic writes: a reader never sees a half-written file or folder, and a failed run
never changes what an earlier run left."""
from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

from handclip.errors import UserError
from typing import Iterable, Mapping, Sequence


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def csv_text(header: Sequence[str], rows: Iterable[Sequence | Mapping]) -> str:
    """A CSV with ``header``; a row is a sequence of cells, or a mapping read by column (missing → empty)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow([row.get(column, "") for column in header] if isinstance(row, Mapping) else row)
    return buffer.getvalue()


def atomic_write_csv(path: str | os.PathLike, header: Sequence[str], rows: Iterable[Sequence | Mapping]) -> None:
    atomic_write_text(path, csv_text(header, rows))


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike):
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` whole.

    On any exception the temporary folder is removed and ``path`` is left as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.parent / f".{path.name}.old.{os.getpid()}"
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks (checkpoints can be gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_format(payload, path, what: str, marker: str, version: int) -> None:
    """A ``UserError`` naming ``path`` unless ``payload`` is a mapping with ``format`` ``marker`` and
    ``version`` ``version`` (handclip's own files: checkpoints, calibrators)."""
    if not isinstance(payload, dict) or payload.get("format") != marker:
        raise UserError(f"{path}: not a handclip {what} (no '{marker}' marker)")
    if payload.get("version") != version:
        raise UserError(f"{path}: {what} version {payload.get('version')} is not supported "
                        f"(this handclip reads version {version})")
