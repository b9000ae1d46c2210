"""Progress a person can read: tqdm bars on a terminal, plain lines in a log.

On a terminal (stderr is a tty) a loop gets a tqdm bar; a nested bar (batches inside an epoch)
disappears when done. In a log (CI, a file, a pipe) bars would be redrawn line after line, so a
loop prints instead one line per item when ``per_item`` (epochs), otherwise one line when it ends
(a phase: "decode images: 455 img in 2.1 s"), and nothing for nested loops.

    bar = progress(range(epochs), desc="train run", unit="epoch", per_item=True)
    for epoch in bar:
        ...
        bar.set_postfix(loss=f"{loss:.3f}")   # on the bar, or on the epoch's line
"""
from __future__ import annotations

import sys
import time
from typing import Iterable

from tqdm import tqdm


def on_terminal(stream=None) -> bool:
    """Whether ``stream`` (default: stderr, where progress goes) is an interactive terminal."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def progress(iterable: Iterable, desc: str, total: int | None = None, unit: str = "it", enabled: bool = True,
             nested: bool = False, per_item: bool = False, initial: int = 0):
    """``iterable`` wrapped in a bar or a line writer (see the module's doc); both have
    ``set_postfix(**values)``. ``initial``: items already done before (a resumed run)."""
    if on_terminal():
        return tqdm(iterable, desc=desc, total=total, unit=unit, disable=not enabled, leave=not nested,
                    initial=initial)
    return LineProgress(iterable, desc, total, unit, enabled and not nested, per_item, initial)


class LineProgress:
    """Progress as whole lines on stderr: one per finished item (``per_item``) or one at the end."""

    def __init__(self, iterable: Iterable, desc: str, total: int | None, unit: str, enabled: bool,
                 per_item: bool, initial: int = 0):
        self.iterable, self.desc, self.unit = iterable, desc, unit
        self.total = total if total is not None else _length(iterable, initial)
        self.enabled, self.per_item, self.initial = enabled, per_item, initial
        self.postfix: dict = {}

    def set_postfix(self, **values) -> None:
        self.postfix = values

    def __iter__(self):
        started = item_started = time.perf_counter()
        count = self.initial
        for item in self.iterable:
            yield item  # the caller's loop body runs here, and may set the postfix
            count += 1
            if self.enabled and self.per_item:
                now = time.perf_counter()
                self._write(f"{self.desc}: {self.unit} {count}/{self.total}{self._postfix()} ({now - item_started:.1f} s)")
                item_started = now
        if self.enabled and not self.per_item:
            self._write(f"{self.desc}: {count - self.initial} {self.unit} in {time.perf_counter() - started:.1f} s"
                        f"{self._postfix()}")

    def _postfix(self) -> str:
        cells = [f"{name} {_format(value)}" for name, value in self.postfix.items() if value not in ("", None)]
        return "  " + "  ".join(cells) if cells else ""

    @staticmethod
    def _write(line: str) -> None:
        print(line, file=sys.stderr, flush=True)


def _length(iterable, initial: int) -> str:
    try:
        return str(initial + len(iterable))
    except TypeError:
        return "?"


def _format(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
