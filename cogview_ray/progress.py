"""Driver progress: a live bar on a terminal, plain periodic log lines otherwise (e.g. under
`ray job submit`, whose logs are files). Shows rows done, images, images/s, ETA and workers."""
from __future__ import annotations

import sys
import time
from collections import deque
from typing import Callable, Optional

BAR_WIDTH = 24
# Rates are measured over a trailing window, so a run that slows down (or speeds up after
# warm-up) shows its current throughput; before the window fills, since the start.
RATE_WINDOW_S = 120.0
TTY_INTERVAL_S = 0.5
LOG_INTERVAL_S = 30.0
_CLEAR_EOL = "\x1b[K"


def format_eta(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf") or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s >= 86400:
        return f"{s // 86400}d{s % 86400 // 3600:02d}h"
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    """Counts finished rows and ok images; `tick()` redraws at most every `interval_s`.

    `clock` (monotonic seconds) is injectable for tests. The driver sets `workers_alive`.
    """

    def __init__(self, total_rows: int, workers: int, out=sys.stderr, interval_s: Optional[float] = None,
                 *, clock: Callable[[], float] = time.monotonic, tty: Optional[bool] = None):
        self.total, self.done, self.ok = total_rows, 0, 0
        self.workers, self.workers_alive = workers, workers
        self.out = out
        self.tty = bool(tty) if tty is not None else bool(getattr(out, "isatty", None) and out.isatty())
        self.interval_s = interval_s if interval_s is not None else (TTY_INTERVAL_S if self.tty else LOG_INTERVAL_S)
        self.clock = clock
        self.started = self.last = clock()
        self._samples: deque = deque([(self.started, 0, 0)])  # (t, rows done, ok images)
        self._closed = False

    def advance(self, rows: int, ok: int) -> None:
        self.done += rows
        self.ok += ok
        now = self.clock()
        self._samples.append((now, self.done, self.ok))
        # keep one sample older than the window as its left edge
        while len(self._samples) > 2 and now - self._samples[1][0] >= RATE_WINDOW_S:
            self._samples.popleft()

    def rates(self) -> tuple[float, float]:
        """(rows/s, images/s) over the trailing window."""
        now = self.clock()
        t0, done0, ok0 = self._samples[0]
        elapsed = now - t0
        if elapsed <= 0:
            return 0.0, 0.0
        return (self.done - done0) / elapsed, (self.ok - ok0) / elapsed

    def eta_s(self) -> float:
        row_rate, _ = self.rates()
        remaining = max(self.total - self.done, 0)
        if remaining == 0:
            return 0.0
        return remaining / row_rate if row_rate > 0 else float("inf")

    def line(self) -> str:
        _, img_rate = self.rates()
        pct = 100.0 * self.done / self.total if self.total else 100.0
        bar = ""
        if self.tty:
            filled = int(BAR_WIDTH * min(self.done, self.total) / self.total) if self.total else BAR_WIDTH
            bar = "|" + "#" * filled + "." * (BAR_WIDTH - filled) + "| "
        return (f"[cogview-ray] {bar}{self.done}/{self.total} rows ({pct:.0f}%) | {self.ok} images | "
                f"{img_rate:.2f} img/s | ETA {format_eta(self.eta_s())} | "
                f"workers {self.workers_alive}/{self.workers}")

    def tick(self, force: bool = False) -> None:
        now = self.clock()
        if not force and now - self.last < self.interval_s:
            return
        self.last = now
        if self.tty:
            self.out.write("\r" + self.line() + _CLEAR_EOL)
        else:
            self.out.write(self.line() + "\n")
        self.out.flush()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.tick(force=True)
        if self.tty:
            self.out.write("\n")
            self.out.flush()
