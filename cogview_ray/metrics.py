"""Prometheus metrics of a run through `ray.util.metrics`: each Ray node's metrics agent exports
them as `ray_cogview_*` (counters end in `_total`). Where Ray is not initialised every call is a no-op."""
from __future__ import annotations

import sys
from typing import Any, Optional

PREFIX = "ray_"  # what Ray's exporter puts before every application metric name

# name -> (kind, description, tag keys besides run_id); names as given to ray.util.metrics
DEFINITIONS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "cogview_rows": ("counter", "Rows committed, by status (ok, failed, rejected).", ("status",)),
    "cogview_shards": ("counter", "Shards committed, by status (ok, failed).", ("status",)),
    "cogview_images_per_second": ("gauge", "Images rendered per second over the last minute.", ()),
    "cogview_rows_queued": ("gauge", "Rows not yet handed to a worker (ETA = this / row rate).", ()),
    "cogview_shards_queued": ("gauge", "Shards not yet handed to a worker.", ()),
    "cogview_shards_in_flight": ("gauge", "Shards handed to workers and not yet back.", ()),
    "cogview_workers": ("gauge", "Render workers by state (ready, loading: pending or starting).", ("state",)),
    "cogview_worker_replacements": ("counter", "Workers started to replace lost ones.", ()),
    "cogview_shard_latency_seconds": ("histogram", "Seconds from handing a shard out to committing it.", ()),
    "cogview_worker_device_memory_bytes": (
        "gauge", "Peak device memory of a worker (CUDA: max allocated; CPU: peak resident set).",
        ("worker_id", "device")),
}
LATENCY_BOUNDARIES_S = [1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1200, 3600]


def exported_name(name: str) -> str:
    """The name Prometheus sees: `ray_` first, and `_total` after a counter's name."""
    kind = DEFINITIONS[name][0]
    return PREFIX + name + ("_total" if kind == "counter" else "")


def ray_running() -> bool:
    """True inside a Ray driver or worker; never imports Ray (a process without it stays light)."""
    ray = sys.modules.get("ray")
    return ray is not None and bool(getattr(ray, "is_initialized", lambda: False)())


def _make(name: str) -> Any:
    from ray.util import metrics as m

    kind, description, tags = DEFINITIONS[name]
    keys = ("run_id",) + tags
    if kind == "counter":
        return m.Counter(name, description=description, tag_keys=keys)
    if kind == "gauge":
        return m.Gauge(name, description=description, tag_keys=keys)
    return m.Histogram(name, description=description, boundaries=LATENCY_BOUNDARIES_S, tag_keys=keys)


class RunMetrics:
    """The driver's metrics for one run; `update` is called once per dispatch loop pass."""

    def __init__(self, run_id: str, enabled: Optional[bool] = None):
        self.run_id = run_id
        self.enabled = ray_running() if enabled is None else enabled
        self._m = {n: _make(n) for n in DEFINITIONS if n != "cogview_worker_device_memory_bytes"} \
            if self.enabled else {}
        self._rows: dict[str, int] = {}  # statuses already counted
        self._shards: dict[str, int] = {}
        self._replaced = 0

    def _tags(self, **extra) -> dict:
        return {"run_id": self.run_id, **extra}

    def update(self, *, row_counts: dict, shard_counts: dict, replaced: int, rows_queued: int,
               shards_queued: int, in_flight: int, ready: int, loading: int, images_per_s: float) -> None:
        """Counters advance by what changed since the last call (`*_counts` and `replaced` are
        this invocation's running totals); gauges take the values as they are now."""
        if not self.enabled:
            return
        m = self._m
        for status, n in row_counts.items():
            if n > self._rows.get(status, 0):
                m["cogview_rows"].inc(n - self._rows.get(status, 0), tags=self._tags(status=status))
                self._rows[status] = n
        for status, n in shard_counts.items():
            if n > self._shards.get(status, 0):
                m["cogview_shards"].inc(n - self._shards.get(status, 0), tags=self._tags(status=status))
                self._shards[status] = n
        if replaced > self._replaced:
            m["cogview_worker_replacements"].inc(replaced - self._replaced, tags=self._tags())
            self._replaced = replaced
        m["cogview_rows_queued"].set(rows_queued, tags=self._tags())
        m["cogview_shards_queued"].set(shards_queued, tags=self._tags())
        m["cogview_shards_in_flight"].set(in_flight, tags=self._tags())
        m["cogview_workers"].set(ready, tags=self._tags(state="ready"))
        m["cogview_workers"].set(loading, tags=self._tags(state="loading"))
        m["cogview_images_per_second"].set(images_per_s, tags=self._tags())

    def shard_latency(self, seconds: float) -> None:
        if self.enabled:
            self._m["cogview_shard_latency_seconds"].observe(max(0.0, seconds), tags=self._tags())


_device_gauge: Any = None


def record_device_memory(run_id: str, worker_id: str, device: Any) -> None:
    """Called by a worker after each shard: its peak device memory, as a gauge. Never raises
    (metrics must not fail a shard)."""
    global _device_gauge
    if not ray_running():
        return
    try:
        kind = getattr(device, "type", str(device))
        if kind == "cuda":
            import torch

            used = torch.cuda.max_memory_allocated(device)
        else:
            import resource

            used = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
        if _device_gauge is None:
            _device_gauge = _make("cogview_worker_device_memory_bytes")
        _device_gauge.set(float(used), tags={"run_id": run_id, "worker_id": worker_id, "device": kind})
    except Exception:
        pass
