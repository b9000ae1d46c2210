"""The gallery: one SQLite file (the standard library's sqlite3) holding the enrolled images' sha256,
path, identity, aspect, metadata, features and enrolment time, the checkpoint it was made with, and
an audit table of the searches run against it.

A gallery belongs to one checkpoint (by sha256): features of another model are not comparable, so
adding or searching with another is refused. The file is in WAL mode with a busy timeout, so several
processes may add at once and readers never block writers; every enrolment batch is one transaction.
"""
from __future__ import annotations

import functools
import json
import os
import sqlite3
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from handclip.errors import UserError

GALLERY_FORMAT = "handclip-gallery"
GALLERY_VERSION = 1
BUSY_TIMEOUT_S = 120.0  # another process's enrolment batch holds the write lock for well under this
FEATURE_DTYPE = np.dtype("<f4")
PAGE_SIZE = 16384
SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE images (
    id INTEGER PRIMARY KEY,
    sha256 TEXT NOT NULL UNIQUE,
    path TEXT NOT NULL,
    identity TEXT,
    aspect TEXT,
    metadata TEXT NOT NULL,
    features BLOB NOT NULL,
    enrolled TEXT NOT NULL
);
CREATE INDEX images_identity ON images (identity);
CREATE TABLE audit (id INTEGER PRIMARY KEY, time TEXT NOT NULL, query_sha256 TEXT NOT NULL, results TEXT NOT NULL);
"""


@dataclass(frozen=True)
class ModelInfo:
    """What a gallery's features were made with."""

    checkpoint_sha256: str
    checkpoint: str  # absolute path when enrolled; search loads the model from here
    feature_dim: int
    preprocessing: dict


@dataclass(frozen=True)
class GalleryRecord:
    sha256: str
    path: str
    features: np.ndarray  # (D,) L2-normalised
    identity: str | None = None
    aspect: str | None = None
    metadata: dict = field(default_factory=dict)


def now_utc() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _database_errors(method):
    """sqlite's own failures (a corrupt page, a lock held too long) become one line naming the file."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except sqlite3.DatabaseError as exc:
            raise UserError(f"{self.path}: {_describe(exc)}") from None
    return wrapper


def _describe(exc: sqlite3.DatabaseError) -> str:
    text = str(exc)
    if "not a database" in text or "malformed" in text:
        return f"not a handclip gallery (sqlite: {text})"
    if "locked" in text or "busy" in text:
        return f"database is locked by another process for over {BUSY_TIMEOUT_S:.0f} s ({text})"
    return f"gallery database error: {text}"


class Gallery:
    """An open gallery file. Use :meth:`open` (existing) or :meth:`open_or_create` (enrolment)."""

    def __init__(self, connection: sqlite3.Connection, path: Path):
        self.connection = connection
        self.path = path

    # ---- opening ---------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike) -> "Gallery":
        """An existing gallery; a missing, corrupt or foreign file is a ``UserError`` (nothing written)."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: gallery not found (make one with `handclip gallery add`)")
        gallery = cls(_connect(path, create=False), path)
        try:
            if gallery._state() != "gallery":
                raise UserError(f"{path}: not a handclip gallery (no '{GALLERY_FORMAT}' marker)")
            gallery._check_version()
            gallery._enable_wal()
        except BaseException:
            gallery.close()
            raise
        return gallery

    @classmethod
    def open_or_create(cls, path: str | os.PathLike, model: ModelInfo) -> "Gallery":
        """The gallery at ``path`` for ``model``: created if the file is new or empty, else checked to
        belong to the same checkpoint. Two processes doing this at once both succeed."""
        path = Path(path)
        if path.exists() and not path.is_file():
            raise UserError(f"{path}: is a folder, not a gallery file")
        path.parent.mkdir(parents=True, exist_ok=True)
        gallery = cls(_connect(path, create=True), path)
        try:
            state = gallery._state()
            if state == "foreign":  # checked before anything is written into someone else's file
                raise UserError(f"{path}: not a handclip gallery (no '{GALLERY_FORMAT}' marker)")
            if state == "empty":
                gallery._set_page_size()
            gallery._enable_wal()
            gallery._create_once(model)
            gallery._check_version()
            gallery.require_checkpoint(model.checkpoint_sha256)
            if gallery.model.feature_dim != model.feature_dim:
                raise UserError(f"{path}: holds {gallery.model.feature_dim}-d features, this model makes "
                                f"{model.feature_dim}-d ones")
        except BaseException:
            gallery.close()
            raise
        return gallery

    def close(self) -> None:
        self.connection.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @_database_errors
    def _state(self) -> str:
        """'empty' (no tables yet), 'gallery', or 'foreign' (someone else's database)."""
        tables = {row[0] for row in self.connection.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        if not tables:
            return "empty"
        if "meta" not in tables:
            return "foreign"
        row = self.connection.execute("SELECT value FROM meta WHERE key='format'").fetchone()
        return "gallery" if row and row[0] == GALLERY_FORMAT else "foreign"

    @_database_errors
    def _set_page_size(self) -> None:
        """Before the first table: 16 KiB pages hold seven rows of 512 float32 features where the
        default 4 KiB pages hold one (a 1M-row gallery then takes 2.3 GB instead of 4.2 GB)."""
        self.connection.execute(f"PRAGMA page_size = {PAGE_SIZE}")

    @_database_errors
    def _enable_wal(self) -> None:
        self.connection.execute("PRAGMA journal_mode=WAL")

    @_database_errors
    def _create_once(self, model: ModelInfo) -> None:
        with self._write():
            if self._state() == "gallery":  # another process created it first
                return
            if self._state() == "foreign":
                raise UserError(f"{self.path}: not a handclip gallery (no '{GALLERY_FORMAT}' marker)")
            for statement in SCHEMA.strip().split(";"):
                if statement.strip():
                    self.connection.execute(statement)
            meta = {
                "format": GALLERY_FORMAT,
                "version": str(GALLERY_VERSION),
                "checkpoint_sha256": model.checkpoint_sha256,
                "checkpoint": model.checkpoint,
                "feature_dim": str(model.feature_dim),
                "preprocessing": json.dumps(model.preprocessing, sort_keys=True),
                "created": now_utc(),
                "generation": "0",
            }
            self.connection.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", meta.items())

    def _check_version(self) -> None:
        version = self._meta().get("version")
        if version != str(GALLERY_VERSION):
            raise UserError(f"{self.path}: gallery version {version} is not supported "
                            f"(this handclip reads version {GALLERY_VERSION})")

    # ---- the model ---------------------------------------------------------------------------------
    @_database_errors
    def _meta(self) -> dict[str, str]:
        return dict(self.connection.execute("SELECT key, value FROM meta"))

    @property
    def model(self) -> ModelInfo:
        meta = self._meta()
        return ModelInfo(meta["checkpoint_sha256"], meta["checkpoint"], int(meta["feature_dim"]),
                         json.loads(meta["preprocessing"]))

    def require_checkpoint(self, checkpoint_sha256: str) -> None:
        own = self.model.checkpoint_sha256
        if checkpoint_sha256 != own:
            raise UserError(f"{self.path}: made with another checkpoint (sha256 {own[:12]}…, this one is "
                            f"{checkpoint_sha256[:12]}…); features of different models cannot be compared")

    @property
    def generation(self) -> int:
        """Changes with every committed enrolment batch or removal (readers reload on a change)."""
        return int(self._meta()["generation"])

    # ---- writing -------------------------------------------------------------------------------------
    def _write(self):
        """One write transaction, taken at once (BEGIN IMMEDIATE) so concurrent writers queue on the
        busy timeout instead of failing on a lock upgrade."""
        return _Transaction(self.connection)

    @_database_errors
    def known(self, sha256s: Iterable[str]) -> set[str]:
        """Which of ``sha256s`` are already enrolled."""
        sha256s, found = list(sha256s), set()
        for start in range(0, len(sha256s), 500):  # SQLite's host-parameter limit
            chunk = sha256s[start:start + 500]
            marks = ",".join("?" * len(chunk))
            found.update(r[0] for r in self.connection.execute(
                f"SELECT sha256 FROM images WHERE sha256 IN ({marks})", chunk))
        return found

    @_database_errors
    def add(self, records: list[GalleryRecord]) -> int:
        """Enrol ``records`` in one transaction; images already enrolled (by sha256) are skipped.
        Returns how many were added."""
        dim = self.model.feature_dim
        rows = []
        enrolled = now_utc()
        for record in records:
            features = np.ascontiguousarray(record.features, dtype=FEATURE_DTYPE).reshape(-1)
            if features.shape != (dim,):
                raise ValueError(f"features of {record.path} have {features.size} values, the gallery {dim}")
            rows.append((record.sha256, record.path, record.identity, record.aspect,
                         json.dumps(record.metadata, sort_keys=True, ensure_ascii=False), features.tobytes(), enrolled))
        with self._write():
            before = self.connection.total_changes
            self.connection.executemany(
                "INSERT OR IGNORE INTO images (sha256, path, identity, aspect, metadata, features, enrolled) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
            added = self.connection.total_changes - before
            self._bump_generation()
        return added

    @_database_errors
    def remove(self, identity: str | None = None, sha256: str | None = None) -> int:
        """Remove an identity's images or one image; returns how many were removed (0 is an error)."""
        if (identity is None) == (sha256 is None):
            raise UserError("gallery remove needs exactly one of --identity ID or --image SHA256")
        column, value = ("identity", identity) if identity is not None else ("sha256", sha256)
        with self._write():
            removed = self.connection.execute(f"DELETE FROM images WHERE {column} = ?", (value,)).rowcount
            if removed:
                self._bump_generation()
        if not removed:
            what = f"identity {identity!r}" if identity is not None else f"image {sha256}"
            raise UserError(f"{self.path}: no {what} in this gallery")
        return removed

    def _bump_generation(self) -> None:
        self.connection.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'")

    @_database_errors
    def append_audit(self, query_sha256: str, results: list[dict]) -> None:
        """Log one search: time, the query's sha256 and its top results (rank, sha256, score)."""
        summary = [{"rank": r["rank"], "sha256": r["sha256"], "score": r["score"]} for r in results]
        with self._write():
            self.connection.execute("INSERT INTO audit (time, query_sha256, results) VALUES (?, ?, ?)",
                                    (now_utc(), query_sha256, json.dumps(summary)))

    # ---- reading -------------------------------------------------------------------------------------
    @_database_errors
    def info(self) -> dict:
        meta = self._meta()
        count = lambda sql: self.connection.execute(sql).fetchone()[0]  # noqa: E731
        return {
            "images": count("SELECT COUNT(*) FROM images"),
            "identities": count("SELECT COUNT(DISTINCT identity) FROM images"),
            "unlabelled": count("SELECT COUNT(*) FROM images WHERE identity IS NULL"),
            "aspects": dict(self.connection.execute(
                "SELECT COALESCE(aspect, ''), COUNT(*) FROM images GROUP BY aspect ORDER BY aspect")),
            "checkpoint_sha256": meta["checkpoint_sha256"],
            "checkpoint": meta["checkpoint"],
            "feature_dim": int(meta["feature_dim"]),
            "preprocessing": json.loads(meta["preprocessing"]),
            "created": meta["created"],
            "last_enrolled": self.connection.execute("SELECT MAX(enrolled) FROM images").fetchone()[0],
            "searches": count("SELECT COUNT(*) FROM audit"),
            "db": str(self.path),
        }

    def feature_chunks(self, chunk: int = 20_000) -> Iterator[tuple[int, list[str], np.ndarray]]:
        """``(total, sha256s, float32 features)`` blocks of every image in enrolment order, all from one
        snapshot (others may add meanwhile), so a million rows load without a second full copy."""
        dim = self.model.feature_dim
        try:
            with self._read():
                total = self.connection.execute("SELECT COUNT(*) FROM images").fetchone()[0]
                cursor = self.connection.execute("SELECT sha256, features FROM images ORDER BY id")
                while rows := cursor.fetchmany(chunk):
                    block = np.frombuffer(b"".join(r[1] for r in rows), dtype=FEATURE_DTYPE).reshape(len(rows), dim)
                    yield total, [r[0] for r in rows], block
        except sqlite3.DatabaseError as exc:
            raise UserError(f"{self.path}: {_describe(exc)}") from None

    @_database_errors
    def features_of(self, sha256s: list[str]) -> np.ndarray:
        """The stored float32 features of the given images, one row each in the order given; an image
        no longer in the gallery (removed by another process meanwhile) is a ``UserError``."""
        found = {}
        for start in range(0, len(sha256s), 500):
            chunk = sha256s[start:start + 500]
            marks = ",".join("?" * len(chunk))
            found.update(self.connection.execute(f"SELECT sha256, features FROM images WHERE sha256 IN ({marks})",
                                                 chunk))
        missing = [sha for sha in sha256s if sha not in found]
        if missing:
            raise UserError(f"{self.path}: image {missing[0][:16]}… was removed during the search; search again")
        dim = self.model.feature_dim
        return np.frombuffer(b"".join(found[sha] for sha in sha256s), dtype=FEATURE_DTYPE).reshape(len(sha256s), dim)

    @_database_errors
    def records(self, sha256s: list[str]) -> dict[str, dict]:
        """The stored fields (no features) of the given images, by sha256."""
        found = {}
        for start in range(0, len(sha256s), 500):
            chunk = sha256s[start:start + 500]
            marks = ",".join("?" * len(chunk))
            for row in self.connection.execute(
                    f"SELECT sha256, path, identity, aspect, metadata, enrolled FROM images WHERE sha256 IN ({marks})",
                    chunk):
                found[row[0]] = {"sha256": row[0], "path": row[1], "identity": row[2], "aspect": row[3],
                                 "metadata": json.loads(row[4]), "enrolled": row[5]}
        return found

    @_database_errors
    def audit(self) -> list[dict]:
        return [{"time": t, "query_sha256": q, "results": json.loads(r)} for t, q, r in
                self.connection.execute("SELECT time, query_sha256, results FROM audit ORDER BY id")]

    def _read(self):
        return _Transaction(self.connection, "BEGIN")


class _Transaction:
    def __init__(self, connection: sqlite3.Connection, begin: str = "BEGIN IMMEDIATE"):
        self.connection, self.begin = connection, begin

    def __enter__(self):
        self.connection.execute(self.begin)

    def __exit__(self, exc_type, *exc):
        self.connection.execute("ROLLBACK" if exc_type else "COMMIT")


def _connect(path: Path, create: bool) -> sqlite3.Connection:
    mode = "rwc" if create else "rw"
    uri = f"{path.resolve().as_uri()}?mode={mode}"
    try:
        # autocommit mode (isolation_level None): transactions are the explicit ones above
        return sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None,
                               check_same_thread=False)
    except sqlite3.Error as exc:
        raise UserError(f"{path}: cannot open the gallery ({exc})") from None


def format_info(info: dict) -> str:
    """``handclip gallery info`` without ``--json``."""
    aspects = ", ".join(f"{k or 'none'} {v}" for k, v in info["aspects"].items()) or "none"
    return "\n".join([
        f"gallery     {info['db']}",
        f"images      {info['images']} ({info['unlabelled']} without identity), aspects: {aspects}",
        f"identities  {info['identities']}",
        f"model       {info['checkpoint']} (sha256 {info['checkpoint_sha256'][:16]}…), "
        f"{info['feature_dim']}-d features at {info['preprocessing']['image_size']} px",
        f"created     {info['created']}, last enrolment {info['last_enrolled'] or 'none'}",
        f"searches    {info['searches']} (audit log)",
    ])
