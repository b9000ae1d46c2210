"""A run's ``history.csv``, one row per trained epoch: the one reader and writer that the trainer
(append, cut back on resume), evaluation and the report (curves) share. A leaf: no torch."""
from __future__ import annotations

import csv
from pathlib import Path

from handclip.errors import UserError
from handclip.fileio import atomic_write_csv

VAL_COLUMNS = ("val_rank1", "val_mAP", "val_acc")


def history_columns(rows: list[dict]) -> list[str]:
    """epoch, the loss terms (sorted), then the fixed columns: the order every history.csv has."""
    terms = sorted({k for row in rows for k in row if k.startswith("loss_")})
    return ["epoch", *terms, "loss", "lr", "train_acc", *VAL_COLUMNS, "img_per_s"]


def read_history(path: str | Path) -> list[dict[str, str]]:
    """The rows as written (cells are strings; empty where an epoch had no value). A missing or
    malformed file → ``UserError`` naming it."""
    path = Path(path)
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
    except OSError as error:
        raise UserError(f"{path}: cannot read the training history ({error.strerror or error})") from None
    if "epoch" not in (reader.fieldnames or []):
        raise UserError(f"{path}: no 'epoch' column in the training history")
    for row_number, row in enumerate(rows, start=2):
        if None in row:  # DictReader files surplus cells under None
            raise UserError(f"{path}: row {row_number} has more cells than the header has columns")
    return rows


def write_history(path: str | Path, rows: list[dict]) -> None:
    """Rewrite the file whole (atomically): never a half-written line."""
    atomic_write_csv(path, history_columns(rows), rows)


def append_history(path: str | Path, row: dict) -> None:
    write_history(path, (read_history(path) if Path(path).exists() else []) + [row])


def truncate_history(path: str | Path, epochs_done: int) -> None:
    """Keep the rows of epochs 1..epochs_done (resume replays the rest)."""
    if Path(path).exists():
        write_history(path, [r for r in read_history(path) if int(r["epoch"]) <= epochs_done])
