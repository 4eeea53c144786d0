"""`RenderWorker`: a Ray actor that owns one device and one pipeline and renders whole shards.

Workers write images (deterministic keys, same bytes on every attempt) but never a manifest
or a commit marker: only the driver commits.
"""
from __future__ import annotations

import json
import os
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

from . import layout
from .config import RunConfig
from .credentials import storage_options_for, strip_userinfo
from .errors import ConfigError, first_line
from .hooks import load_hooks
from .identity import runtime_identity
from .model_cache import resolve_model_path
from .model.loading import CheckpointError
from .records import Reason, RowRecord, ShardResult, Status
from .rows import RowSpec, SizeLimits, group_for_render, read_shard_rows
from .shards import Shard
from .sinks import encode_image, make_sink, sha256_hex
from .storage import RunStore, open_filesystem


@dataclass
class _Rendered:
    row: RowSpec
    image: object  # uint8 HWC array, or None
    status: Status
    reason: Optional[Reason]
    truncated: bool
    timings: dict


class RenderWorker:
    """Loads, compiles and warms up the pipeline once; then renders shards on request."""

    def __init__(self, cfg: RunConfig, run_id: str, worker_id: str):
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
        self.model_hash = self.pipe.identity["config_hash"]
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
        self.store = RunStore(cfg.output.uri, run_id, cfg.output.storage_options)
        self.fs, _ = open_filesystem(cfg.dataset.uri, storage_options_for(cfg.dataset.uri, cfg))
        self.hooks.worker_ready(worker_id)

    def info(self) -> dict:
        return {"worker_id": self.worker_id, "node": self.node, "device": self.device_name,
                "pid": os.getpid(), "load_s": self.load_s, "compile_s": self.compile_s,
                "family": self.pipe.identity["family"], "limits": self.limits, "runtime": self.runtime}

    # -- one shard ------------------------------------------------------------------------

    def render_shard(self, shard: Shard, attempt: int, submitted_at: float) -> ShardResult:
        started = time.time()
        queue_s = max(0.0, started - submitted_at)
        cfg = self.cfg
        self.hooks.shard_started(shard.shard_id, attempt)
        rows = read_shard_rows(shard, cfg.dataset, cfg.render, self.fs, self.limits)
        if cfg.dataset.id_column:
            rows = [self._claim(shard, r) for r in rows]
        self.hooks.before_shard(shard.shard_id, rows)
        rendered: list[_Rendered] = [
            _Rendered(r, None, "rejected", r.reason, False, {}) for r in rows if r.status == "rejected"]
        written: dict[int, tuple[str, int, str, float, float]] = {}
        # The sink closes (uploads) when the block succeeds and discards its local spool when
        # anything in it raises; the writer thread has stopped before either happens.
        with make_sink(cfg.output.format, self.store, shard.shard_id, cfg.output.image_format) as sink, \
                ThreadPoolExecutor(max_workers=1) as writer:
            futures = []
            try:
                for (h, w, steps, guidance), group in group_for_render(rows).items():
                    bs = cfg.render.batch_size
                    for i in range(0, len(group), bs):
                        for out in self._render_batch(group[i:i + bs], h, w, steps, guidance):
                            rendered.append(out)
                            if out.status == "ok":
                                # encoding and upload overlap the next batch's rendering
                                futures.append(writer.submit(self._encode_and_add, sink, out))
                for f in futures:
                    row_index, entry = f.result()
                    written[row_index] = entry
            except BaseException:
                writer.shutdown(wait=True, cancel_futures=True)  # a lost attempt encodes no more
                raise
        records = [self._record(shard, out, attempt, queue_s, written.get(out.row.row_index)) for out in rendered]
        records.sort(key=lambda r: r.row_index)
        return ShardResult(shard.shard_id, attempt, self.worker_id, self.node, self.device_name, records,
                           started_at=started, finished_at=time.time(), load_s=self.load_s)

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

    def _encode_and_add(self, sink, out: _Rendered):
        cfg = self.cfg.output
        t0 = time.perf_counter()
        data = encode_image(out.image, cfg.image_format, cfg.quality)
        t1 = time.perf_counter()
        r = out.row
        # the container's per-sample metadata: id and render parameters (sorted by meta_json)
        key = sink.add(r.key, data, {"id": r.row_id, **r.render_params()})
        return r.row_index, (key, len(data), sha256_hex(data), t1 - t0, time.perf_counter() - t1)

    def _record(self, shard: Shard, out: _Rendered, attempt: int, queue_s: float, written) -> RowRecord:
        t, reason, image = out.timings, out.reason, {}
        if written is not None:
            key, n_bytes, sha256, encoding_s, writing_s = written
            image = dict(key=key, bytes=n_bytes, sha256=sha256, image_encoding_s=encoding_s, writing_s=writing_s)
            if out.truncated:
                reason = Reason.PROMPT_TRUNCATED
        return RowRecord.from_spec(
            out.row, run_id=self.run_id, shard_id=shard.shard_id, status=out.status, reason=reason,
            queue_s=queue_s, text_encoding_s=t.get("text_encoding"), denoising_s=t.get("denoising"),
            decoding_s=t.get("decoding"), worker_id=self.worker_id, node=self.node, device=self.device_name,
            attempt=attempt, model_path=strip_userinfo(self.cfg.model.path), model_hash=self.model_hash,
            prompt_truncated=out.truncated, error=out.row.error, **image)


def _replace(row: RowSpec, **changes) -> RowSpec:
    import dataclasses

    return dataclasses.replace(row, **changes)

