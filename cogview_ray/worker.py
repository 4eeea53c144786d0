"""`RenderWorker`: a Ray actor that owns one device and one pipeline and renders whole shards.

Workers write images (deterministic keys, same bytes on every attempt) but never a manifest
or a commit marker: only the driver commits.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
import traceback
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterable, Optional

from . import layout
from .config import RunConfig
from .credentials import redact_text, storage_options_for, strip_userinfo
from .errors import ConfigError, first_line
from .hooks import load_hooks
from .identity import family_name, runtime_identity
from .metrics import record_device_memory
from .model_cache import resolve_model_path
from .model.loading import CheckpointError
from .compile_cache import use_node_compile_cache
from .records import Reason, RowRecord, ShardResult, Status
from .rows import RowSpec, SizeLimits, group_for_render, read_shard_rows
from .run_logs import worker_error, worker_load_error
from .shards import Shard, shard_id_for
from .sinks import encode_image, make_sink, sha256_hex
from .storage import RunStore, open_filesystem

CLAIM_THREADS = 16  # a claim is one small create-once PUT: latency-bound, so many go at once
WRITER_THREADS = 4  # encode + write of finished images, overlapping the next batches' rendering
WRITE_TRIES = 3  # per image (format=files), on top of the store's own retries of transient errors
WRITE_BACKOFF_S = 0.5  # before the second try; doubled before each later one
MAX_WRITE_FAILED_ROWS = 4  # beyond this many rows whose write failed, the store is down: the shard fails


@dataclass
class _Rendered:
    row: RowSpec
    image: object  # uint8 HWC array, or None
    status: Status
    reason: Optional[Reason]
    truncated: bool
    timings: dict


@dataclass
class _Written:
    """One image's write: where it went, or (`error`) why it could not be written."""

    key: Optional[str] = None
    n_bytes: int = 0
    sha256: Optional[str] = None
    encoding_s: float = 0.0
    writing_s: float = 0.0
    error: Optional[str] = None


class _InOrder:
    """Lets numbered tasks through one at a time in their numbers' order (container members are
    added in row order, whichever writer thread finished encoding first)."""

    def __init__(self, enabled: bool):
        self.enabled, self._next, self._cond = enabled, 0, threading.Condition()

    @contextmanager
    def turn(self, n: int):
        if not self.enabled:
            yield
            return
        # no deadlock: an executor starts tasks in submission order, so n - 1 has started
        with self._cond:
            self._cond.wait_for(lambda: self._next == n)
        try:
            yield
        finally:
            with self._cond:
                self._next = n + 1
                self._cond.notify_all()


class _FailedWrites:
    """Counts a shard's rows whose write failed for good. A few are those rows' failures; past
    MAX_WRITE_FAILED_ROWS the store is at fault, and the shard fails (and is retried) as a whole
    rather than spend every row's retries on it."""

    def __init__(self):
        self.count, self._lock = 0, threading.Lock()

    def add(self, error: str) -> None:
        with self._lock:
            self.count += 1
            if self.count > MAX_WRITE_FAILED_ROWS:
                raise RuntimeError(f"image writes failed for {self.count} rows of the shard, the last with {error}")


class _Prefetch:
    """The rows of the shard expected next on this worker, read in the background."""

    def __init__(self, shard: Shard, future: Future):
        self.shard, self.future = shard, future

    def take(self, shard: Shard) -> Optional[list[RowSpec]]:
        """The rows if `shard` is exactly the predicted one (same file, rows and planned version)
        and the read succeeded; else None (the caller reads them itself, errors and all)."""
        try:  # waited for even when unused: two reads never share the page cache at once
            rows = self.future.result()
        except Exception:
            return None
        return rows if shard == self.shard else None


class RenderWorker:
    """Loads, compiles and warms up the pipeline once; then renders shards on request."""

    def __init__(self, cfg: RunConfig, run_id: str, worker_id: str, input_sizes: Iterable = ()):
        """`input_sizes`: per-row (height, width) pairs the input asks for (size_survey), compiled
        at start besides the run's own; those the pipeline cannot render are skipped (their rows
        are rejected as bad_size)."""
        use_node_compile_cache()  # before anything compiles: the next worker on this node reuses it
        try:
            self._start(cfg, run_id, worker_id, input_sizes)
        except Exception:  # kept in the run's _logs/ (if the store is reachable): it outlives the cluster
            worker_load_error(cfg.output.uri, run_id, cfg.output.storage_options, worker_id,
                              traceback.format_exc())
            raise

    def _start(self, cfg: RunConfig, run_id: str, worker_id: str, input_sizes: Iterable) -> None:
        import torch

        from .model import load_pipeline

        import transformers

        transformers.utils.logging.disable_progress_bar()
        t0 = time.perf_counter()
        self.cfg, self.run_id, self.worker_id = cfg, run_id, worker_id
        # first: a test's hooks register the filesystems (faulty://) that the rest opens
        self.hooks = load_hooks()
        self.hooks.worker_started(worker_id)
        threads = max(1, int(cfg.workers.cpus_per_worker))
        torch.set_num_threads(threads)
        local = resolve_model_path(cfg.model.path, storage_options_for(cfg.model.path, cfg))
        try:
            self.pipe = load_pipeline(
                local, device=cfg.model.device, dtype=cfg.model.dtype, compile=cfg.model.compile,
                attention=cfg.model.attention)
        except CheckpointError:
            raise
        except Exception as e:  # e.g. a corrupt safetensors file: say which checkpoint
            raise CheckpointError(f"Checkpoint {strip_userinfo(cfg.model.path)} could not be loaded "
                                  f"({type(e).__name__}: {first_line(e)}).") from None
        self.pipe = self.hooks.wrap_pipeline(self.pipe)
        self.limits = SizeLimits.of(self.pipe)
        r = cfg.render
        if not (self.limits.allows(r.height) and self.limits.allows(r.width)):
            raise ConfigError(f"render.height and render.width ({r.height}x{r.width}) must be multiples of "
                              f"{self.limits.multiple_px} px up to {self.limits.max_px} px for "
                              f"{self.pipe.identity['family']}.")
        sizes = list(dict.fromkeys([(r.height, r.width)] + [(int(h), int(w)) for h, w in r.sizes]))
        for h, w in sizes[1:]:
            if not (self.limits.allows(h) and self.limits.allows(w)):
                raise ConfigError(f"render.sizes entry [{h}, {w}] must be multiples of {self.limits.multiple_px} px "
                                  f"up to {self.limits.max_px} px for {self.pipe.identity['family']}.")
        allowed = [(int(h), int(w)) for h, w in input_sizes if self.limits.allows(h) and self.limits.allows(w)]
        sizes = list(dict.fromkeys(sizes + allowed))
        self.model_hash = self.pipe.identity["config_hash"]
        self.model_path = strip_userinfo(cfg.model.path)  # as recorded on every manifest row
        self.load_s = time.perf_counter() - t0
        self.compile_s = 0.0
        if cfg.model.compile != "none":
            # every size compiles here, before the worker reports ready: never against shard_timeout_s
            for h, w in sizes:
                self.compile_s += self.pipe.warmup(h, w, r.batch_size, num_inference_steps=2,
                                                   guidance_scale=r.guidance_scale,
                                                   max_sequence_length=r.max_sequence_length)
            seal = getattr(self.pipe, "seal_compiled", None)
            if seal is not None:  # other sizes now run eagerly rather than compile mid-shard
                seal()
        self.node = socket.gethostname()
        dev = self.pipe.device
        self.device_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
        cudnn = torch.backends.cudnn.version() if dev.type == "cuda" else None
        self.runtime = runtime_identity(self.pipe.identity, torch.__version__, self.device_name, cudnn)
        self.family = family_name(self.pipe.identity["family"])  # both as recorded on every manifest row
        self.attention = self.pipe.identity.get("attention")
        self.store = RunStore(cfg.output.uri, run_id, cfg.output.storage_options)
        self.fs, _ = open_filesystem(cfg.dataset.uri, storage_options_for(cfg.dataset.uri, cfg))
        self._claims = ThreadPoolExecutor(max_workers=CLAIM_THREADS, thread_name_prefix="claim")
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch")
        self._prefetch: Optional[_Prefetch] = None
        self.write_backoff_s = WRITE_BACKOFF_S
        self.hooks.worker_ready(worker_id)

    def info(self) -> dict:
        return {"worker_id": self.worker_id, "node": self.node, "device": self.device_name,
                "pid": os.getpid(), "load_s": self.load_s, "compile_s": self.compile_s,
                "family": self.pipe.identity["family"], "limits": self.limits, "runtime": self.runtime}

    # -- one shard ------------------------------------------------------------------------

    def render_shard(self, shard: Shard, attempt: int, submitted_at: float) -> ShardResult:
        try:
            result = self._render_shard(shard, attempt, submitted_at)
        except Exception:  # the traceback goes to the run's _logs/; the driver retries the shard
            worker_error(self.store, self.worker_id, shard.shard_id, attempt, traceback.format_exc(),
                         self.cfg.output.storage_options)
            raise
        record_device_memory(self.run_id, self.worker_id, self.pipe.device)  # Prometheus gauge
        return result

    def _render_shard(self, shard: Shard, attempt: int, submitted_at: float) -> ShardResult:
        started = time.time()
        queue_s = max(0.0, started - submitted_at)
        cfg = self.cfg
        self.hooks.shard_started(shard.shard_id, attempt)
        rows = self._rows(shard)
        self._prefetch_successor(shard)  # read while this shard renders
        if cfg.dataset.id_column:
            rows = self._claim_all(shard, rows)
        self.hooks.before_shard(shard.shard_id, rows)
        rendered: list[_Rendered] = [
            _Rendered(r, None, "rejected", r.reason, False, {}) for r in rows if r.status == "rejected"]
        written: dict[int, _Written] = {}
        # Containers take their members in row order (files: each image is its own object, written
        # in parallel). The sink closes (uploads) when the block succeeds and discards its local
        # spool when anything in it raises; the writer threads have stopped before either happens.
        order, failed_writes = _InOrder(enabled=cfg.output.format != "files"), _FailedWrites()
        with make_sink(cfg.output.format, self.store, shard.shard_id, cfg.output.image_format) as sink, \
                ThreadPoolExecutor(max_workers=WRITER_THREADS, thread_name_prefix="writer") as writer:
            futures = []
            try:
                for (h, w, steps, guidance), group in group_for_render(rows).items():
                    bs = cfg.render.batch_size
                    for i in range(0, len(group), bs):
                        for out in self._render_batch(group[i:i + bs], h, w, steps, guidance):
                            rendered.append(out)
                            if out.status == "ok":
                                # encoding and upload overlap the next batch's rendering
                                futures.append((out.row.row_index, writer.submit(
                                    self._encode_and_add, sink, out, order, len(futures), failed_writes)))
                for row_index, f in futures:
                    written[row_index] = f.result()
            except BaseException:
                writer.shutdown(wait=True, cancel_futures=True)  # a lost attempt encodes no more
                raise
        records = [self._record(shard, out, attempt, queue_s, written.get(out.row.row_index)) for out in rendered]
        records.sort(key=lambda r: r.row_index)
        return ShardResult(shard.shard_id, attempt, self.worker_id, self.node, self.device_name, records,
                           started_at=started, finished_at=time.time(), load_s=self.load_s)

    def _rows(self, shard: Shard) -> list[RowSpec]:
        """The shard's rows: prefetched when the last call predicted this very shard, else read."""
        prefetch, self._prefetch = self._prefetch, None
        rows = prefetch.take(shard) if prefetch is not None else None
        if rows is None:
            rows = read_shard_rows(shard, self.cfg.dataset, self.cfg.render, self.fs, self.limits)
        return rows

    def _prefetch_successor(self, shard: Shard) -> None:
        """Start reading the next shard of the same file (the queue deals a worker consecutive
        shards). Only a full shard has a successor in its file; a wrong guess costs one read."""
        size = int(self.cfg.dataset.shard_size)
        if shard.num_rows != size or shard.row_start % size:
            return
        # planning numbers a file's shards by row_start // shard_size (shards.plan_shards)
        nxt = Shard(shard_id_for(shard.file_index, shard.row_stop // size), shard.file, shard.file_index,
                    shard.row_stop, shard.row_stop + size, shard.file_version)
        # the planned version is checked as on any read (read_shard_rows -> open_planned)
        self._prefetch = _Prefetch(nxt, self._reader.submit(
            read_shard_rows, nxt, self.cfg.dataset, self.cfg.render, self.fs, self.limits))

    def _claim_all(self, shard: Shard, rows: list[RowSpec]) -> list[RowSpec]:
        """`_claim` of every row, results in row order, the PUTs issued concurrently. A key met
        twice in one shard is claimed again only after its first claim settled (as in series)."""
        seen: set[str] = set()
        first, again = [], []
        for i, r in enumerate(rows):
            if r.status == "pending":
                (again if r.key in seen else first).append(i)
                seen.add(r.key)
        out = list(rows)
        for i, claimed in zip(first, self._claims.map(lambda i: self._claim(shard, rows[i]), first)):
            out[i] = claimed
        for i in again:
            out[i] = self._claim(shard, rows[i])
        return out

    def _claim(self, shard: Shard, row: RowSpec) -> RowSpec:
        """Across shards, the first claimant of an output key keeps it; later rows are duplicates."""
        if row.status != "pending":
            return row
        owner = json.dumps({"id": row.row_id, "file": shard.file, "row_index": row.row_index},
                           sort_keys=True).encode()
        rel = layout.claim(row.key)
        if self.store.create_once(rel, owner) or self.store.read(rel) == owner:
            return row
        return _replace(row, status="rejected", reason="duplicate_id")

    def _render_batch(self, batch: list[RowSpec], h: int, w: int, steps: int, guidance: float) -> list[_Rendered]:
        """Render one batch; on device OOM split it in halves, down to single rows."""
        import torch

        from .model import to_uint8_hwc

        # no padding of a partial batch: the pipeline runs one item per forward, so the compiled
        # graphs see the same shapes whatever the batch size
        n = len(batch)
        try:
            self.hooks.before_batch(batch)
            res = self.pipe.generate([r.prompt for r in batch], [r.seed for r in batch], h, w,
                                     num_inference_steps=steps, guidance_scale=guidance,
                                     negative_prompt=[r.negative_prompt for r in batch],
                                     max_sequence_length=self.cfg.render.max_sequence_length)
        except (torch.cuda.OutOfMemoryError, MemoryError):
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if n == 1:
                return [_Rendered(batch[0], None, "failed", "out_of_memory", False, {})]
            half = n // 2
            return (self._render_batch(batch[:half], h, w, steps, guidance)
                    + self._render_batch(batch[half:], h, w, steps, guidance))
        self.hooks.after_batch(batch)
        images = to_uint8_hwc(res.images[:n])
        finite = res.finite[:n]
        share = {k: v / n for k, v in res.timings_s.items()}
        out = []
        for i, r in enumerate(batch):
            ok = finite[i]
            out.append(_Rendered(r, images[i] if ok else None, "ok" if ok else "failed",
                                 None if ok else "nonfinite_output", res.truncated[i], share))
        return out

    def _encode_and_add(self, sink, out: _Rendered, order: _InOrder, seq: int,
                        failed_writes: _FailedWrites) -> _Written:
        cfg = self.cfg.output
        r = out.row
        try:
            t0 = time.perf_counter()
            data = encode_image(out.image, cfg.image_format, cfg.quality)
            t1 = time.perf_counter()
        except BaseException:
            with order.turn(seq):  # pass the turn on: later members still get theirs
                raise
        with order.turn(seq):
            # the container's per-sample metadata: id and render parameters (sorted by meta_json)
            meta = {"id": r.row_id, **r.render_params()}
            if cfg.format != "files":  # a container upload failing fails the shard, as before
                key = sink.add(r.key, data, meta)
            else:
                key, error = self._add_with_retries(sink, r, data, meta)
                if key is None:
                    failed_writes.add(error)
                    return _Written(encoding_s=t1 - t0, error=error)
        return _Written(key, len(data), sha256_hex(data), t1 - t0, time.perf_counter() - t1)

    def _add_with_retries(self, sink, r: RowSpec, data: bytes, meta: dict) -> tuple[Optional[str], Optional[str]]:
        """(key, None) once the image is written, or (None, the last error) after WRITE_TRIES:
        then only this row fails (`write_failed`), not the shard's other images."""
        for attempt in range(WRITE_TRIES):
            try:
                return sink.add(r.key, data, meta), None
            except Exception as e:  # noqa: BLE001 - any write failure is the row's, said in `error`
                error = redact_text(f"{type(e).__name__}: {first_line(e)}")
                if attempt + 1 < WRITE_TRIES:
                    time.sleep(self.write_backoff_s * 2 ** attempt)
        return None, error

    def _record(self, shard: Shard, out: _Rendered, attempt: int, queue_s: float, written) -> RowRecord:
        t, status, reason, error, image = out.timings, out.status, out.reason, out.row.error, {}
        if written is not None and written.error is not None:
            status, reason, error = Status.FAILED, Reason.WRITE_FAILED, written.error
            image = dict(image_encoding_s=written.encoding_s)
        elif written is not None:
            image = dict(key=written.key, bytes=written.n_bytes, sha256=written.sha256,
                         image_encoding_s=written.encoding_s, writing_s=written.writing_s)
            if out.truncated:
                reason = Reason.PROMPT_TRUNCATED
        return RowRecord.from_spec(
            out.row, run_id=self.run_id, shard_id=shard.shard_id, status=status, reason=reason,
            queue_s=queue_s, text_encoding_s=t.get("text_encoding"), denoising_s=t.get("denoising"),
            decoding_s=t.get("decoding"), worker_id=self.worker_id, node=self.node, device=self.device_name,
            attempt=attempt, model_path=self.model_path, model_hash=self.model_hash,
            prompt_truncated=out.truncated, error=error, family=self.family,
            attention=self.attention, **image)


def _replace(row: RowSpec, **changes) -> RowSpec:
    import dataclasses

    return dataclasses.replace(row, **changes)

