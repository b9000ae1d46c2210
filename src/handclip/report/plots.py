"""CMC curves and training-history curves as PNGs.

Figures are drawn on matplotlib's Agg canvas directly (no pyplot, no display, no global backend
change), so plotting works on headless machines and inside training processes.
"""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from handclip.errors import UserError
from handclip.fileio import atomic_write_bytes
from handclip.history import read_history


def plot_cmc(curves: Mapping[str, Sequence[float]], path, title: str = "CMC") -> Path:
    """One CMC curve per label (rates in [0, 1], index 0 = rank 1), drawn in percent → PNG ``path``."""
    figure = Figure(figsize=(6, 4.2))
    axes = figure.add_subplot()
    for label, cmc in curves.items():
        cmc = 100 * np.asarray(cmc, dtype=float)
        ranks = np.arange(1, len(cmc) + 1)
        axes.plot(ranks, cmc, marker="o", markersize=3, label=f"{label} (rank-1 {cmc[0]:.1f}%)")
    axes.set(xlabel="rank", ylabel="identification rate (%)", title=title, ylim=(0, 101))
    axes.xaxis.get_major_locator().set_params(integer=True)
    axes.grid(alpha=0.3)
    if curves:
        axes.legend(loc="lower right")
    return _save(figure, path)


def plot_history(history_csv, out_dir) -> list[Path]:
    """Curves of a training run's ``history.csv`` → PNGs in ``out_dir``; returns their paths.

    Columns: ``epoch``, ``loss``, any number of ``loss_<term>``, ``lr``, ``train_acc``,
    ``val_rank1``, ``val_mAP``, ``val_acc``, ``img_per_s``; an empty cell is a missing value (validation may
    not run every epoch). Writes ``loss.png`` (total and every term), ``lr.png`` and
    ``accuracy.png`` (train accuracy, val rank-1, mAP and accuracy in percent), each only when its
    columns hold a value. A missing file or column or a non-number → ``UserError`` naming it.
    """
    columns = _read_history(Path(history_csv))
    epochs = columns["epoch"]
    out_dir = Path(out_dir)
    loss_names = ["loss"] + sorted(name for name in columns if name.startswith("loss_"))
    panels = [
        ("loss.png", "loss", {name: columns.get(name) for name in loss_names}, 1.0, False),
        ("lr.png", "learning rate", {"lr": columns.get("lr")}, 1.0, True),
        ("accuracy.png", "%", {name: columns.get(name) for name in ("train_acc", "val_rank1", "val_mAP", "val_acc")},
         100.0, False),
    ]
    written = []
    for file_name, ylabel, series, scale, log_scale in panels:
        series = {name: values for name, values in series.items() if values is not None and np.isfinite(values).any()}
        if series:
            written.append(_plot_series(out_dir / file_name, epochs, series, ylabel, scale, log_scale))
    return written


def _plot_series(path: Path, epochs: np.ndarray, series: dict[str, np.ndarray], ylabel: str, scale: float,
                 log_scale: bool) -> Path:
    figure = Figure(figsize=(6, 4))
    axes = figure.add_subplot()
    for name, values in series.items():
        present = np.isfinite(values)  # epochs without a value (no validation run) are skipped
        axes.plot(epochs[present], scale * values[present], marker="o", markersize=3, label=name)
    if log_scale and all((values[np.isfinite(values)] > 0).all() for values in series.values()):
        axes.set_yscale("log")
    axes.set(xlabel="epoch", ylabel=ylabel)
    axes.xaxis.get_major_locator().set_params(integer=True)
    axes.grid(alpha=0.3)
    axes.legend()
    return _save(figure, path)


def _read_history(path: Path) -> dict[str, np.ndarray]:
    """Every column as floats (NaN for empty cells)."""
    rows = read_history(path)
    header = list(rows[0]) if rows else ["epoch"]
    columns = {name: np.array([_number(path, row_number, name, row[name])
                               for row_number, row in enumerate(rows, start=2)], dtype=float)
               for name in header}
    if np.isnan(columns["epoch"]).any():
        raise UserError(f"{path}: column 'epoch' has an empty cell")
    return columns


def _number(path: Path, row_number: int, column: str, cell: str | None) -> float:
    if cell is None or cell.strip() == "":
        return math.nan
    try:
        return float(cell)
    except ValueError:
        raise UserError(f"{path}: row {row_number}, column '{column}': '{cell}' is not a number") from None


def _save(figure: Figure, path) -> Path:
    FigureCanvasAgg(figure)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)
