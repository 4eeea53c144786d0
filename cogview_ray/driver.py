"""The render driver: plan -> lock -> dispatch -> collect -> commit -> finalize.

Only this process commits (commits.py). Every worker call is treated as at-least-once: a lost
result or a dead worker means the shard is rendered again, to the same keys with the same bytes.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from typing import Optional

from . import __version__
from .commits import Committer, RunOutcome, check_coverage
from .config import RunConfig
from .credentials import redact_text, redacted, storage_options_for, strip_userinfo
from .errors import RunError, RunRefused
from .hooks import FORWARDED_ENV, load_hooks
from .identity import diff_output_defining, output_defining
from .manifest import committed_generations, read_commits, read_run_info, read_success, write_run_info
from .metrics import RunMetrics
from .pool import Done, Errored, Event, Loaded, Lost, RayBackend, WorkerPool, WorkersExhausted
from .progress import Progress
from .rows import read_shard_rows
from .run_lock import RunLock
from .run_logs import DriverLog
from .runtime_check import check_runtime
from .shard_queue import ShardQueue, Task
from .shards import diff_fingerprints, plan_shards
from .size_survey import survey_sizes
from .stats import RunStats
from .storage import RunStore, StorageError, open_filesystem

__all__ = ["Driver", "RunError", "RunOutcome", "run_render", "default_run_id", "resolve_num_workers"]

RESIZE_EVERY_S = 5.0  # how often workers.num_workers=auto re-reads the cluster's resources (one GCS call)


def default_run_id(cfg: RunConfig, fingerprint: dict) -> str:
    """A run id that depends only on what defines the output, so a rerun finds its run."""
    blob = json.dumps({"settings": output_defining(cfg), "input": fingerprint}, sort_keys=True)
    return "run-" + hashlib.sha256(blob.encode()).hexdigest()[:12]


class Driver:
    def __init__(self, cfg: RunConfig, *, lock_stale_s: float = 120.0, heartbeat_s: float = 15.0,
                 out=None):
        self.cfg = cfg
        self.lock_stale_s, self.heartbeat_s = lock_stale_s, heartbeat_s
        self.out = out if out is not None else sys.stderr  # looked up now: tests and tools swap sys.stderr
        self.hooks = load_hooks()  # first: a test hook may register a filesystem the plan reads
        self.store: Optional[RunStore] = None
        self.lock: Optional[RunLock] = None
        self.limits = None  # the pipeline's size limits, once a worker has loaded
        self.metrics = RunMetrics("", enabled=False)  # the run's own once dispatch starts
        self.log = DriverLog(err=self.out)  # written into the run's _logs/ once the lock is ours

    # -- planning, run identity, lock -----------------------------------------------------

    def plan(self):
        cfg = self.cfg
        fs, _ = open_filesystem(cfg.dataset.uri, storage_options_for(cfg.dataset.uri, cfg))
        shards, fingerprint = plan_shards(cfg.dataset, fs)
        run_id = cfg.output.run_id or default_run_id(cfg, fingerprint)
        return shards, fingerprint, run_id

    def _check_resume(self, fingerprint: dict) -> None:
        """Create `_run.json` once, or refuse a run whose settings or input differ from it."""
        info = read_run_info(self.store)
        settings = output_defining(self.cfg)
        if info is None:
            self.lock.check(read=True)
            if write_run_info(self.store, {
                    "run_id": self.store.run_id, "config": redacted(self.cfg), "output_defining": settings,
                    "fingerprint": fingerprint, "versions": _versions(), "created_at": time.time()}):
                return
            info = read_run_info(self.store) or {}  # another driver created it first: compare with it
        changes = diff_output_defining(info.get("output_defining", {}), settings)
        changes += diff_fingerprints(info.get("fingerprint", {}), fingerprint)
        if changes and self.cfg.resume != "force":
            raise RunRefused(
                f"run {self.store.url()} was made with other settings or input ({'; '.join(changes[:5])}); "
                f"use a new output.run_id, or resume=force to continue it anyway")
        if changes:
            self._say(f"resuming despite changes (resume=force): {'; '.join(changes[:5])}")

    def _already_complete(self, shards: list, fingerprint: dict) -> Optional[RunOutcome]:
        """The outcome of a run found complete, read without taking the lock (a complete run is
        written once, so a rerun writes nothing); None if anything is left to do."""
        store = self.store
        store.invalidate()
        success = read_success(store)
        if success is None or read_run_info(store) is None:
            return None
        self._check_resume(fingerprint)  # refuses changed settings; writes nothing: _run.json exists
        generations = committed_generations(store)  # one listing: each shard's current marker
        committed = set(generations)
        markers = read_commits(store, sorted(committed), generations)
        check_coverage(store, markers, shards)
        if any(s.shard_id not in committed or markers[s.shard_id].get("status") != "ok" for s in shards):
            return None
        self._say(f"run {store.url()} is already complete; nothing to render")
        outcome = RunOutcome(store.run_id, store.url(), len(shards), len(shards))
        outcome.totals = success.get("totals", {})
        return outcome

    # -- main loop ---------------------------------------------------------------------------

    def run(self) -> RunOutcome:
        cfg = self.cfg
        shards, fingerprint, run_id = self.plan()
        self.store = store = RunStore(cfg.output.uri, run_id, cfg.output.storage_options)
        store.prove_create_once()  # a store that overwrites cannot hold a lock or a commit
        if (complete := self._already_complete(shards, fingerprint)) is not None:
            return complete
        self.lock = RunLock(store, stale_s=self.lock_stale_s, heartbeat_s=self.heartbeat_s, say=self._say)
        self.lock.acquire(takeover=cfg.takeover_lock)
        try:
            self._say(f"driver log: {self.log.attach(store, cfg.output.storage_options)}")
            self._check_resume(fingerprint)
            stats = RunStats()
            outcome = RunOutcome(run_id, store.url(), len(shards), 0)
            committer = Committer(store, self.lock, self.hooks, stats, outcome, self._say,
                                  model_path=strip_userinfo(cfg.model.path))
            done = committer.scan(shards)
            queue = ShardQueue((s for s in shards if s.shard_id not in done), cfg.workers.max_attempts)
            outcome.shards_skipped = len(shards) - len(queue)
            if not queue and (success := read_success(store)) is not None:
                self._say(f"run {store.url()} is already complete; nothing to render")
                outcome.totals = success.get("totals", {})
                return outcome
            try:
                if queue:
                    self._dispatch(queue, committer, [s for s in shards if s.shard_id not in done])
                committer.finalize(shards)
            except StorageError as e:
                raise RunError(f"{e}; the {outcome.shards_skipped + outcome.shards_committed} shard(s) committed "
                               f"so far are kept, rerun the same command to resume") from None
            self.log.add(f"[cogview-ray] run finished: totals {json.dumps(outcome.totals, sort_keys=True)}")
            return outcome
        except BaseException as e:  # the log outlives the cluster: say there why the run ended
            self.log.add(f"[cogview-ray] run failed: {type(e).__name__}: {e}")
            raise
        finally:
            self.lock.release()
            self.log.close()

    def _dispatch(self, queue: ShardQueue, committer: Committer, pending: list) -> None:
        import ray

        _ensure_ray(ray)
        cfg = self.cfg
        size = min(resolve_num_workers(cfg, ray.cluster_resources()), len(queue))
        backend = RayBackend(_render_worker_class(), self._actor_options(ray), (cfg, self.store.run_id),
                             {"input_sizes": self._input_sizes(pending)})
        progress = Progress(total_rows=queue.rows, workers=size, out=self.out)
        self.metrics = RunMetrics(self.store.run_id)
        with WorkerPool(backend, size, max_in_flight=cfg.workers.max_in_flight,
                        shard_timeout_s=cfg.workers.shard_timeout_s,
                        max_replacements=size * cfg.workers.max_attempts + 4) as pool:
            self._loop(pool, queue, committer, progress, ray.cluster_resources)
        progress.close()

    def _input_sizes(self, pending: list) -> list:
        """With compiling on, the per-row sizes the pending rows ask for (read at planning from two
        columns), so workers compile them before they are ready rather than run them eagerly."""
        cfg = self.cfg
        if cfg.model.compile == "none":
            return []
        fs, _ = open_filesystem(cfg.dataset.uri, storage_options_for(cfg.dataset.uri, cfg))
        sizes = survey_sizes(pending, cfg.render, fs)
        if sizes:
            self._say(f"input rows ask for {len(sizes)} more size(s) to compile at worker start: "
                      f"{', '.join(f'{h}x{w}' for h, w in sizes)}")
        return sizes

    def _loop(self, pool: WorkerPool, queue: ShardQueue, committer: Committer, progress: Progress,
              resources, resize_every_s: float = RESIZE_EVERY_S) -> None:
        """Dispatch until every shard is back. Work starts with the first ready worker; workers
        the cluster has no room for wait (Ray keeps them pending) and start when a node joins."""
        cfg = self.cfg
        next_resize = pool.clock() + resize_every_s
        while queue or pool.in_flight:
            self.lock.check()
            if queue:
                self._replace_dead(pool, committer)
                if str(cfg.workers.num_workers) == "auto" and pool.clock() >= next_resize:
                    next_resize = pool.clock() + resize_every_s
                    self._grow(pool, resolve_num_workers(cfg, resources()), len(queue))
                self._check_starved(pool, resources)
            pool.submit(queue)
            for event in pool.poll(timeout_s=1.0):
                self._handle(event, queue, committer, progress)
            progress.workers, progress.workers_alive = len(pool.slots), pool.ready
            progress.tick()
            self._update_metrics(pool, queue, committer, progress)

    def _grow(self, pool: WorkerPool, target: int, queued: int) -> None:
        """`auto`: one more worker per new GPU (or spare CPU), while it has queued shards to take."""
        started = pool.grow(min(target, pool.alive + queued))
        if started:
            pool.max_replacements += len(started) * self.cfg.workers.max_attempts
            self._say(f"the cluster grew: starting worker(s) {', '.join(started)}")

    def _check_starved(self, pool: WorkerPool, resources) -> None:
        """One sentence when no worker has been ready for workers.startup_timeout_s."""
        w = self.cfg.workers
        if pool.starved_s() <= w.startup_timeout_s:
            return
        what = "no worker could load" if not pool.ever_ready else "no worker was ready (all were lost)"
        last = f"; last load failure: {pool.last_load_error}" if pool.last_load_error else ""
        have = {k: v for k, v in sorted(resources().items()) if k in ("CPU", "GPU")}
        raise RunError(f"{what} within workers.startup_timeout_s={w.startup_timeout_s:g}s: {pool.loading} "
                       f"worker(s) still waiting for resources (each needs {w.cpus_per_worker:g} CPU, "
                       f"{w.gpus_per_worker:g} GPU; the cluster has {have}){last}.")

    def _update_metrics(self, pool: WorkerPool, queue: ShardQueue, committer: Committer, progress: Progress) -> None:
        outcome = committer.outcome
        self.metrics.update(
            row_counts={k: committer.stats.counts[k] for k in ("ok", "failed", "rejected")},
            shard_counts={"ok": outcome.shards_committed, "failed": outcome.shards_failed},
            replaced=committer.stats.events["workers_replaced"], rows_queued=queue.rows,
            shards_queued=len(queue), in_flight=pool.in_flight, ready=pool.ready, loading=pool.loading,
            images_per_s=progress.rates()[1])

    def _replace_dead(self, pool: WorkerPool, committer: Committer) -> None:
        try:
            started = pool.replace_dead()
        except WorkersExhausted as e:
            raise RunError(f"{e}; giving up (see the worker errors above)") from None
        for worker_id in started:
            self._say(f"starting worker {worker_id} to replace a lost one")
            committer.stats.note("workers_replaced")
            committer.outcome.workers_replaced += 1

    def _handle(self, event: Event, queue: ShardQueue, committer: Committer, progress: Progress) -> None:
        if isinstance(event, Loaded):
            i = event.info
            self.limits = i.get("limits")
            self._say(f"worker {i['worker_id']} ready on {i['node']} ({i['device']}): "
                      f"load {i['load_s']:.1f}s, compile+warm-up {i['compile_s']:.1f}s")
            check_runtime(self.store, i, self.cfg.resume == "force", self._say)  # refused before it renders
        elif isinstance(event, Done):
            self.metrics.shard_latency(time.time() - event.task.submitted_at)
            try:
                committer.commit(event.task.shard, event.result)
                progress.advance(event.task.shard.num_rows, ok=event.result.counts()["ok"])
            except ValueError as e:  # a result that does not account for its shard
                self._retry(event.task, "bad_result", str(e), queue, committer, progress)
        elif isinstance(event, Errored):
            self._retry(event.task, event.reason, event.error, queue, committer, progress)
        elif isinstance(event, Lost):
            if event.fatal:  # the checkpoint's or the config's fault: every other worker would fail too
                raise RunError(f"worker {event.worker_id} {event.error}")
            committer.stats.note("workers_lost")
            if not event.ever_loaded:
                self._say(f"worker {event.worker_id} {event.error}; starting another")
            if event.reason == "timeout":
                committer.stats.note("shard_timeouts")
                self._say(f"shard {event.running.shard.shard_id} exceeded {self.cfg.workers.shard_timeout_s:g}s "
                          f"on {event.worker_id}; replacing the worker")
            for task in event.queued:  # innocent: they only waited behind the running shard
                queue.requeue(task, charged=False)
            if event.running is not None:
                self._retry(event.running, event.reason, event.error, queue, committer, progress)

    def _retry(self, task: Task, reason: str, error: str, queue: ShardQueue, committer: Committer,
               progress: Progress) -> None:
        """A charged failure: back into the queue, or committed as failed once out of attempts
        (at once for changed input: no retry reads the planned version again)."""
        committer.stats.note("shard_attempts_failed")
        if reason == "input_changed":
            self._say(f"shard {task.shard.shard_id}: {error}")
            committer.commit_failed(task.shard, None, task.attempt, reason, error)
            progress.advance(task.shard.num_rows, ok=0)
            return
        if queue.requeue(task, charged=True):
            self._say(f"shard {task.shard.shard_id} attempt {queue.failures(task.shard.shard_id)} failed "
                      f"({reason}: {error}); retrying")
            return
        shard, cfg = task.shard, self.cfg
        fs, _ = open_filesystem(cfg.dataset.uri, storage_options_for(cfg.dataset.uri, cfg))
        try:
            rows = read_shard_rows(shard, cfg.dataset, cfg.render, fs, self.limits)
        except Exception:  # unreadable input: rows then carry only their place
            rows = None
        committer.commit_failed(shard, rows, queue.failures(shard.shard_id), reason, error)
        progress.advance(shard.num_rows, ok=0)

    def _actor_options(self, ray) -> dict:
        cfg = self.cfg
        # a GPU run on a cluster whose GPU nodes have not joined yet still asks for GPUs (it waits)
        wants_gpu = ray.cluster_resources().get("GPU", 0) > 0 or cfg.model.device == "cuda"
        gpus = cfg.workers.gpus_per_worker if wants_gpu else 0
        env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        opts = dict(num_cpus=cfg.workers.cpus_per_worker, num_gpus=gpus, max_restarts=0, max_task_retries=0)
        if env:
            opts["runtime_env"] = {"env_vars": env}
        return opts

    def _say(self, msg: str) -> None:
        line = f"[cogview-ray] {redact_text(msg)}"
        print(line, file=self.out, flush=True)
        self.log.add(line)


def resolve_num_workers(cfg: RunConfig, resources: dict) -> int:
    """Workers to run: the number asked for, or for `auto` what the cluster's resources hold now
    (re-read while the run goes on, so workers follow GPUs as they join)."""
    n = cfg.workers.num_workers
    if str(n) != "auto":
        return int(n)
    gpus = resources.get("GPU", 0)
    if gpus > 0 or cfg.model.device == "cuda":
        return max(1, int(gpus // max(cfg.workers.gpus_per_worker, 1e-9)))
    spare = resources.get("CPU", 1) - 1  # leave a core for the driver and I/O
    return max(1, int(spare // max(cfg.workers.cpus_per_worker, 1e-9)))


def _render_worker_class():
    from .worker import RenderWorker  # torch loads only when a run renders

    return RenderWorker


def _ensure_ray(ray) -> None:
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS") or None
        ray.init(address=address, log_to_driver=True, include_dashboard=False if address is None else None)


def _versions() -> dict:
    import platform

    out = {"cogview_ray": __version__, "python": platform.python_version()}
    for mod in ("torch", "ray", "transformers", "pyarrow", "fsspec"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:
            out[mod] = None
    return out


def run_render(cfg: RunConfig, out=None) -> RunOutcome:
    return Driver(cfg, out=out).run()
