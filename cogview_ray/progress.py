"""Driver progress: a live line on a terminal, plain periodic log lines otherwise."""
from __future__ import annotations

import sys
import time


def _eta(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf"):
        return "?"
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Progress:
    def __init__(self, total_rows: int, workers: int, out=sys.stderr, interval_s: float | None = None):
        self.total, self.done, self.ok = total_rows, 0, 0
        self.workers_alive = workers
        self.out = out
        self.tty = hasattr(out, "isatty") and out.isatty()
        self.interval_s = interval_s if interval_s is not None else (0.5 if self.tty else 10.0)
        self.started = self.last = time.time()

    def advance(self, rows: int, ok: int) -> None:
        self.done += rows
        self.ok += ok

    def line(self) -> str:
        elapsed = max(time.time() - self.started, 1e-9)
        rate = self.ok / elapsed
        row_rate = self.done / elapsed
        eta = (self.total - self.done) / row_rate if row_rate > 0 else float("inf")
        pct = 100.0 * self.done / self.total if self.total else 100.0
        return (f"[cogview-ray] {self.done}/{self.total} rows ({pct:.0f}%) | {self.ok} images | "
                f"{rate:.2f} img/s | ETA {_eta(eta)} | workers {self.workers_alive}")

    def tick(self, force: bool = False) -> None:
        now = time.time()
        if not force and now - self.last < self.interval_s:
            return
        self.last = now
        if self.tty:
            self.out.write("\r" + self.line().ljust(100))
        else:
            self.out.write(self.line() + "\n")
        self.out.flush()

    def close(self) -> None:
        self.tick(force=True)
        if self.tty:
            self.out.write("\n")
            self.out.flush()
