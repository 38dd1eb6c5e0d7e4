"""Progress of long loops: a bar on a terminal, a log line at a steady rhythm elsewhere.

A run whose output goes to a file or a pipe has no use for ``\\r`` bars, but a person
following it needs to know it is alive and when it will end. :func:`progress` gives
either: with ``bar=True`` a tqdm bar; otherwise log lines (``statistics: 120/391 batches
(15,360 images), 34.1 batch/s, ETA 8 s``) at most every :func:`log_interval` seconds, plus
one when the loop ends. The rhythm is a process-wide setting (``--log-interval`` on the
command line) because it is about the reader, not about any one stage.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from tqdm.auto import tqdm

__all__ = ["Progress", "log_interval", "progress", "set_log_interval", "stage"]

logger = logging.getLogger("cdprune.progress")

_INTERVAL = {"seconds": 30.0}


def set_log_interval(seconds: float) -> None:
    """Seconds between progress log lines when no bar is shown; 0 or less: none."""
    _INTERVAL["seconds"] = float(seconds)


def log_interval() -> float:
    """The current seconds between progress log lines (see :func:`set_log_interval`)."""
    return _INTERVAL["seconds"]


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class Progress:
    """Counts a loop's steps and reports them as log lines (the bar-less half of
    :func:`progress`).

    Args:
        total: steps expected (``None``: unknown, no ETA).
        desc: what the loop does, the start of every line (``"epoch 3/300"``).
        unit: name of a step.
        items: optional name of what a step holds (``"images"``), counted by
            :meth:`update`'s ``items``.
        interval: seconds between lines; default :func:`log_interval`.
    """

    disable = True  # no bar: callers that refresh a bar's postfix can skip the work

    def __init__(self, total: int | None, desc: str, unit: str = "batch", *,
                 items: str | None = None, interval: float | None = None):
        self.total, self.desc, self.unit, self.items = total, desc, unit, items
        self.interval = log_interval() if interval is None else interval
        self.n = 0
        self.count = 0
        self.postfix: dict[str, Any] = {}
        self.started = self.last = time.perf_counter()
        self.lines = 0

    def update(self, n: int = 1, items: int = 0) -> None:
        """Count ``n`` steps (and ``items`` things); log a line when the interval passed."""
        self.n += n
        self.count += items
        if self.interval > 0:
            now = time.perf_counter()
            if now - self.last >= self.interval:
                self.last = now
                self._log(now)

    def wants_postfix(self, step: int) -> bool:
        """Whether the next :meth:`update` logs a line, so its values are worth computing."""
        return self.interval > 0 and time.perf_counter() - self.last >= self.interval

    def set_postfix(self, refresh: bool = False, **values: Any) -> None:
        """Values shown at the end of the next line (``loss=0.31``)."""
        self.postfix = values

    def _log(self, now: float, done: bool = False) -> None:
        elapsed = now - self.started
        of = f"/{self.total}" if self.total else ""
        line = f"{self.desc}: {self.n}{of} {self.unit}{'es' if self.unit.endswith('h') else 's'}"
        if self.items:
            line += f" ({self.count:,} {self.items})"
        rate = self.n / elapsed if elapsed > 0 else math.inf
        if math.isfinite(rate):
            line += f", {rate:,.0f}" if rate >= 100 else f", {rate:.3g}"
            line += f" {self.unit}/s"
        if done:
            line += f", done in {_duration(elapsed)}"
        elif self.total and rate > 0 and math.isfinite(rate):
            line += f", ETA {_duration((self.total - self.n) / rate)}"
        if self.postfix and not done:  # values of the last line, not of the end
            line += ", " + ", ".join(f"{k} {v}" for k, v in self.postfix.items())
        logger.info("%s", line)
        self.lines += 1

    def close(self) -> None:
        """End the loop: a last line if any line was logged (so the reader sees the end)."""
        if self.lines and self.interval > 0:
            self._log(time.perf_counter(), done=True)


def progress(total: int | None, desc: str, unit: str = "batch", *, bar: bool,
             items: str | None = None, leave: bool = False) -> Any:
    """A tqdm bar (``bar=True``) or a :class:`Progress` that logs at a steady rhythm.

    Both take ``update(n)``, ``set_postfix(...)`` and ``close()``; a :class:`Progress`
    also counts ``items`` (``update(1, items=128)``).
    """
    if bar:
        return _Bar(total=total, desc=desc, unit=unit, leave=leave, dynamic_ncols=True)
    return Progress(total, desc, unit, items=items)


class _Bar(tqdm):
    """tqdm, whose ``update`` also accepts the ``items`` count of :class:`Progress`."""

    POSTFIX_EVERY = 10  # steps between postfix refreshes (each may wait for the GPU)

    def update(self, n: int = 1, items: int = 0) -> Any:  # type: ignore[override]
        return super().update(n)

    def wants_postfix(self, step: int) -> bool:
        return not self.disable and (step + 1) % self.POSTFIX_EVERY == 0


@contextmanager
def stage(label: str) -> Iterator[None]:
    """Log the start and the end of a stage of a run, with its duration."""
    logger.info("%s: started", label)
    started = time.perf_counter()
    yield
    logger.info("%s: finished in %s", label, _duration(time.perf_counter() - started))
