"""Run statistics with bounded memory: counts, rates and per-stage timing percentiles."""
from __future__ import annotations

import random
import time
from collections import Counter

from cogview_ray.records import count_reasons

STAGES = ("queue_s", "text_encoding_s", "denoising_s", "decoding_s", "image_encoding_s", "writing_s")


class Reservoir:
    """A uniform sample of at most `size` values (Vitter's algorithm R), seeded for repeatability."""

    def __init__(self, size: int = 10_000, seed: int = 0):
        self.size, self.seen, self.values = size, 0, []
        self._rng = random.Random(seed)

    def add(self, value: float) -> None:
        self.seen += 1
        if len(self.values) < self.size:
            self.values.append(value)
        else:
            j = self._rng.randrange(self.seen)
            if j < self.size:
                self.values[j] = value

    def percentiles(self) -> dict:
        if not self.values:
            return {}
        v = sorted(self.values)

        def pct(p: float) -> float:
            return v[min(len(v) - 1, int(round(p / 100 * (len(v) - 1))))]

        return {"p50": pct(50), "p90": pct(90), "p99": pct(99), "max": v[-1], "mean": sum(v) / len(v)}


class RunStats:
    def __init__(self):
        self.started = time.time()
        self.counts = Counter()
        self.reasons = Counter()
        self.stages = {s: Reservoir(seed=i) for i, s in enumerate(STAGES)}
        self.events = Counter()  # workers_lost, workers_replaced, shard_timeouts, shard_attempts_failed

    def note(self, event: str, n: int = 1) -> None:
        self.events[event] += n

    def add(self, records, failed_shard=None) -> None:
        """Count committed records. `failed_shard` is ignored (failed shards are read back from
        their commit markers); it goes once the driver stops passing it."""
        self.reasons.update(count_reasons(r.reason for r in records))
        for r in records:
            self.counts[str(r.status)] += 1
            if r.status == "ok":
                for s in STAGES:
                    v = getattr(r, s)
                    if v is not None:
                        self.stages[s].add(float(v))

    def summary(self) -> dict:
        wall = max(time.time() - self.started, 1e-9)
        return {
            "this_invocation": {
                "wall_s": wall,
                "ok": self.counts["ok"], "failed": self.counts["failed"], "rejected": self.counts["rejected"],
                "images_per_second": self.counts["ok"] / wall,
            },
            "timings_s": {s: r.percentiles() for s, r in self.stages.items()},
            "reasons": dict(self.reasons),
            "recoveries": {k: self.events[k] for k in
                           ("workers_lost", "workers_replaced", "shard_timeouts", "shard_attempts_failed")},
        }
