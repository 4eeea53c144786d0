"""The render driver: plan -> lock -> dispatch -> collect -> commit -> finalize.

Only this process commits (manifest part, then the create-once marker). Every worker call is
treated as at-least-once: a lost result or a dead worker means the shard is rendered again,
to the same keys with the same bytes.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Optional

from . import __version__
from .config import RunConfig, storage_options_for, diff_output_defining, output_defining, redacted
from .faults import FaultPlan
from .manifest import (RowRecord, ShardResult, commit_path, commit_shard, committed_shards, read_commit,
                       read_run_info, read_success, write_manifest_part, write_run_info, write_success)
from .progress import Progress
from .rows import read_shard_rows
from .run_lock import LockError, RunLock
from .shards import Shard, diff_fingerprints, plan_shards
from .stats import RunStats
from .storage import RunStore, StorageError, open_filesystem

log = logging.getLogger("cogview_ray.driver")

FAILED_DIR = "failed"
FAILED_SUMMARY = "_FAILED.json"
FORWARDED_ENV = ("COGVIEW_RAY_FAULTS", "COGVIEW_RAY_CACHE")


class RunError(RuntimeError):
    """The run cannot start or cannot go on; the message says why in one sentence."""


@dataclass
class RunOutcome:
    run_id: str
    run_uri: str
    shards_total: int
    shards_skipped: int  # committed before this invocation
    shards_committed: int  # committed by this invocation
    shards_failed: int
    rows_rendered: int
    totals: dict = field(default_factory=dict)
    workers_replaced: int = 0

    @property
    def exit_code(self) -> int:
        return 1 if self.shards_failed else 0


def default_run_id(cfg: RunConfig, fingerprint: dict) -> str:
    """A run id that depends only on what defines the output, so a rerun finds its run."""
    blob = json.dumps({"settings": output_defining(cfg), "input": fingerprint}, sort_keys=True)
    return "run-" + hashlib.sha256(blob.encode()).hexdigest()[:12]


@dataclass
class _Task:
    shard: Shard
    attempt: int
    submitted_at: float


@dataclass
class _Slot:
    index: int
    generation: int
    actor: object
    worker_id: str
    ready_ref: object = None  # info() of a replacement until it has loaded; no shards before that
    dead: bool = False
    inflight: dict = field(default_factory=dict)  # ObjectRef -> _Task, in submission order
    head_started: float = 0.0  # when the oldest in-flight shard started (actor tasks run in order)


class Driver:
    def __init__(self, cfg: RunConfig, *, lock_stale_s: float = 120.0, heartbeat_s: float = 15.0,
                 out=None):
        self.cfg = cfg
        self.lock_stale_s, self.heartbeat_s = lock_stale_s, heartbeat_s
        self.out = out if out is not None else sys.stderr  # looked up now: tests and tools swap sys.stderr
        self.store: Optional[RunStore] = None
        self.lock: Optional[RunLock] = None
        self.faults = FaultPlan.from_env()

    # -- planning, run identity, lock -----------------------------------------------------

    def plan(self):
        cfg = self.cfg
        fs, _ = open_filesystem(cfg.dataset.uri, storage_options_for(cfg.dataset.uri, cfg))
        shards, fingerprint = plan_shards(cfg.dataset, fs)
        run_id = cfg.output.run_id or default_run_id(cfg, fingerprint)
        return shards, fingerprint, run_id

    def _check_resume(self, fingerprint: dict) -> None:
        info = read_run_info(self.store)
        settings = output_defining(self.cfg)
        if info is None:
            write_run_info(self.store, {
                "run_id": self.store.run_id, "config": redacted(self.cfg), "output_defining": settings,
                "fingerprint": fingerprint, "versions": _versions(), "created_at": time.time()})
            return
        changes = diff_output_defining(info.get("output_defining", {}), settings)
        changes += diff_fingerprints(info.get("fingerprint", {}), fingerprint)
        if changes and self.cfg.resume != "force":
            raise RunError(
                f"run {self.store.url()} was made with other settings or input ({'; '.join(changes[:5])}); "
                f"use a new output.run_id, or resume=force to continue it anyway")
        if changes:
            self._say(f"resuming despite changes (resume=force): {'; '.join(changes[:5])}")

    # -- main loop ---------------------------------------------------------------------------

    def run(self) -> RunOutcome:
        import ray

        cfg = self.cfg
        shards, fingerprint, run_id = self.plan()
        self.store = store = RunStore(cfg.output.uri, run_id, cfg.output.storage_options)
        self.lock = RunLock(store, stale_s=self.lock_stale_s, heartbeat_s=self.heartbeat_s, say=self._say)
        try:
            self.lock.acquire(takeover=cfg.takeover_lock)
        except LockError as e:
            raise RunError(str(e)) from None
        except StorageError as e:
            raise RunError(f"could not take the run lock: {e}") from None
        try:
            self._check_resume(fingerprint)
            done = self._scan_committed()
            todo = deque(s for s in shards if s.shard_id not in done)
            outcome = RunOutcome(run_id, store.url(), len(shards), len(shards) - len(todo), 0, 0, 0)
            if not todo and read_success(store) is not None:
                self._say(f"run {store.url()} is already complete; nothing to render")
                outcome.totals = read_success(store).get("totals", {})
                return outcome
            stats = RunStats()
            try:
                if todo:
                    _ensure_ray(ray)
                    self._dispatch(todo, stats, outcome)
                self._finalize(shards, stats, outcome)
            except StorageError as e:
                raise RunError(f"{e}; the {outcome.shards_skipped + outcome.shards_committed} shard(s) committed "
                               f"so far are kept, rerun the same command to resume") from None
            except LockError as e:
                raise RunError(str(e)) from None
            return outcome
        finally:
            self.lock.release()

    def _scan_committed(self) -> set[str]:
        """Committed shard ids; shards committed as failed are uncommitted here so they run again."""
        store = self.store
        committed = committed_shards(store)
        failed = {n[:-5] for n in store.list(FAILED_DIR) if n.endswith(".json")}
        for shard_id in sorted(failed & committed):
            store.delete(f"commits/{shard_id}.json")
            store.delete(f"{FAILED_DIR}/{shard_id}.json")
        for shard_id in sorted(failed - committed):
            # a marker whose commit is gone (a driver stopped between the two deletes above, or
            # between writing it and committing): drop it, or it would uncommit a later success
            store.delete(f"{FAILED_DIR}/{shard_id}.json")
        return committed - failed

    def _dispatch(self, todo: deque, stats: RunStats, outcome: RunOutcome) -> None:
        import ray

        cfg = self.cfg
        n_workers = min(resolve_num_workers(cfg, ray.cluster_resources()), len(todo))
        slots: list[_Slot] = []
        try:
            slots.extend(self._start_worker(i, 0) for i in range(n_workers))
            self._await_ready(slots)
            self._dispatch_loop(slots, todo, stats, outcome)
        finally:
            # on success and on every error: no actor outlives the dispatch
            for slot in slots:
                _kill(ray, slot.actor)

    def _dispatch_loop(self, slots: list[_Slot], todo: deque, stats: RunStats, outcome: RunOutcome) -> None:
        import ray
        from ray.exceptions import RayActorError, RayError, RayTaskError

        cfg = self.cfg
        attempts: dict[str, int] = {}
        pending: dict = {}  # ObjectRef -> slot index
        replacements, max_replacements = 0, len(slots) * cfg.workers.max_attempts + 4
        progress = Progress(total_rows=sum(s.num_rows for s in todo), workers=len(slots), out=self.out)

        def requeue(task: _Task, error: Optional[str]) -> None:
            if error is None:
                todo.appendleft(task.shard)
                return
            n = attempts[task.shard.shard_id] = attempts.get(task.shard.shard_id, 0) + 1
            stats.note("shard_attempts_failed")
            if n >= cfg.workers.max_attempts:
                self._commit_failed(task.shard, n, error, stats, outcome)
                progress.advance(task.shard.num_rows, ok=0)
            else:
                self._say(f"shard {task.shard.shard_id} attempt {n} failed ({error}); retrying")
                todo.append(task.shard)

        def lose_worker(slot: _Slot, error: str) -> None:
            nonlocal replacements
            tasks = list(slot.inflight.values())
            for ref in slot.inflight:
                pending.pop(ref, None)
            slot.inflight.clear()
            slot.dead, slot.ready_ref = True, None
            _kill(ray, slot.actor)
            stats.note("workers_lost")
            for i, task in enumerate(tasks):
                # only the shard that was running is charged; those queued behind it were innocent
                requeue(task, error if i == 0 else None)
            replacements += 1
            if replacements > max_replacements:
                raise RunError(f"workers died {replacements} times ({error}); giving up")
            progress.workers_alive = sum(1 for s in slots if not s.dead)

        while todo or pending:
            self.lock.check()
            for i, slot in enumerate(slots):
                if slot.dead and todo:
                    slots[i] = self._start_worker(slot.index, slot.generation + 1, replacement=True)
                    outcome.workers_replaced += 1
                    stats.note("workers_replaced")
                    progress.workers_alive = sum(1 for s in slots if not s.dead)
            for slot in slots:
                # not to a replacement still loading its pipeline: queued there, shards would wait
                # for it while ready workers run out of work
                if slot.dead or slot.ready_ref is not None:
                    continue
                while todo and len(slot.inflight) < cfg.workers.max_in_flight:
                    shard = todo.popleft()
                    task = _Task(shard, attempts.get(shard.shard_id, 0) + 1, time.time())
                    ref = slot.actor.render_shard.remote(shard, task.attempt, task.submitted_at)
                    if not slot.inflight:
                        slot.head_started = time.time()
                    slot.inflight[ref] = task
                    pending[ref] = slot.index
            loading = [s.ready_ref for s in slots if s.ready_ref is not None]
            if not pending and not loading:
                continue  # nothing to wait for: the next pass replaces dead workers
            ready, _ = ray.wait(list(pending) + loading, num_returns=1, timeout=1.0)
            for ref in ready:
                index = pending.pop(ref, None)
                if index is None:
                    continue
                slot = slots[index]
                try:
                    result: ShardResult = ray.get(ref)
                except RayActorError as e:
                    # every in-flight shard of a dead actor fails; the oldest one was running
                    lose_worker(slot, f"worker_died: {_first_line(e)}")
                    continue
                except RayTaskError as e:
                    task = slot.inflight.pop(ref)
                    slot.head_started = time.time()
                    requeue(task, f"worker_error: {_cause(e)}")
                    continue
                except RayError as e:  # a lost result: the worker's state is unknown, replace it
                    lose_worker(slot, f"worker_lost: {_first_line(e)}")
                    continue
                task = slot.inflight.pop(ref)
                slot.head_started = time.time()
                try:
                    self._commit(task.shard, result, stats, outcome)
                    progress.advance(task.shard.num_rows, ok=result.counts()["ok"])
                except ValueError as e:  # a result that does not account for its shard
                    requeue(task, f"bad_result: {e}")
            now = time.time()
            for slot in slots:
                if slot.dead:
                    continue
                if slot.ready_ref is not None:
                    # a replacement's clock starts once it has loaded, not while it loads
                    done, _ = ray.wait([slot.ready_ref], num_returns=1, timeout=0)
                    if not done:
                        continue
                    try:
                        ray.get(done[0])
                    except RayError as e:
                        lose_worker(slot, f"worker_died: could not start: {_cause(e)}")
                        continue
                    slot.ready_ref = None
                    continue
                if slot.inflight and now - slot.head_started > cfg.workers.shard_timeout_s:
                    head = next(iter(slot.inflight.values()))
                    self._say(f"shard {head.shard.shard_id} exceeded {cfg.workers.shard_timeout_s:g}s "
                              f"on {slot.worker_id}; replacing the worker")
                    stats.note("shard_timeouts")
                    lose_worker(slot, f"timeout: no result within {cfg.workers.shard_timeout_s:g}s")
            progress.tick()
        progress.close()

    def _start_worker(self, index: int, generation: int, replacement: bool = False) -> _Slot:
        import ray

        from .worker import RenderWorker

        cfg = self.cfg
        gpus = cfg.workers.gpus_per_worker if ray.cluster_resources().get("GPU", 0) > 0 else 0
        env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        opts = dict(num_cpus=cfg.workers.cpus_per_worker, num_gpus=gpus, max_restarts=0, max_task_retries=0)
        if env:
            opts["runtime_env"] = {"env_vars": env}
        worker_id = f"w{index:02d}.{generation}"
        actor = ray.remote(RenderWorker).options(**opts).remote(cfg, self.store.run_id, worker_id)
        slot = _Slot(index, generation, actor, worker_id)
        if replacement:
            self._say(f"starting worker {worker_id} to replace a lost one")
            slot.ready_ref = actor.info.remote()
        return slot

    def _await_ready(self, slots: list[_Slot]) -> None:
        """Fail fast when the pipeline cannot load: the loader's error, not endless restarts."""
        import ray
        from ray.exceptions import RayActorError

        refs = [slot.actor.info.remote() for slot in slots]
        for slot, ref in zip(slots, refs):
            try:
                info = ray.get(ref)
            except RayActorError as e:
                raise RunError(f"worker {slot.worker_id} could not start: {_cause(e)}") from None
            self._say(f"worker {info['worker_id']} ready on {info['node']} ({info['device']}): "
                      f"load {info['load_s']:.1f}s, compile+warm-up {info['compile_s']:.1f}s")

    # -- commits --------------------------------------------------------------------------

    def _commit(self, shard: Shard, result: ShardResult, stats: RunStats, outcome: RunOutcome) -> None:
        if len(result.records) != shard.num_rows:
            raise ValueError(f"{len(result.records)} records for {shard.num_rows} rows")
        self.lock.check(read=True)
        if self.store.exists(commit_path(shard.shard_id)):
            # only after a lock takeover raced with this driver's last check: the first commit stands
            self._say(f"shard {shard.shard_id} was committed by another driver meanwhile; keeping that commit")
            return
        self.faults.at_driver("before_manifest", shard.shard_id)
        write_manifest_part(self.store, shard.shard_id, result.records)
        self.faults.at_driver("after_manifest", shard.shard_id)
        summary = {"rows": shard.num_rows, "status": "ok", "attempt": result.attempt,
                   "worker_id": result.worker_id, "committed_at": time.time(),
                   "lock_id": self.lock.lock_id}
        if not commit_shard(self.store, shard.shard_id, summary):
            log.warning("shard %s was already committed; keeping the first commit", shard.shard_id)
        stats.add(result.records)
        outcome.shards_committed += 1
        outcome.rows_rendered += sum(1 for r in result.records if r.status != "rejected")

    def _commit_failed(self, shard: Shard, attempts: int, error: str, stats: RunStats, outcome: RunOutcome):
        """A shard out of attempts: every row is recorded (rejections stay rejections) and the
        shard is marked failed, so a later run retries it."""
        records = failed_records(self.cfg, self.store.run_id, shard, attempts, error)
        self.lock.check(read=True)
        write_manifest_part(self.store, shard.shard_id, records)
        self.store.write(f"{FAILED_DIR}/{shard.shard_id}.json",
                         json.dumps({"shard_id": shard.shard_id, "error": error, "attempts": attempts}).encode())
        commit_shard(self.store, shard.shard_id, {"rows": shard.num_rows, "status": "failed", "error": error,
                                                  "attempt": attempts, "committed_at": time.time(),
                                                  "lock_id": self.lock.lock_id})
        stats.add(records, failed_shard=(shard.shard_id, error))
        outcome.shards_failed += 1
        self._say(f"shard {shard.shard_id} failed after {attempts} attempts: {error}")

    def _finalize(self, shards: list[Shard], stats: RunStats, outcome: RunOutcome) -> None:
        store = self.store
        totals = {"rows": 0, "ok": 0, "failed": 0, "rejected": 0, "shards": len(shards), "failed_shards": 0}
        failures = []
        for shard in shards:
            marker = read_commit(store, shard.shard_id)
            for k in ("ok", "failed", "rejected"):
                totals[k] += int(marker.get(k, 0))
            totals["rows"] += int(marker["rows"])
            if marker.get("status") == "failed":
                totals["failed_shards"] += 1
                failures.append({"shard_id": shard.shard_id, "error": marker.get("error")})
        outcome.totals = totals
        summary = {"run_id": store.run_id, "totals": totals, **stats.summary(), "failed_shards": failures,
                   "finished_at": time.time()}
        if failures:
            store.write(FAILED_SUMMARY, json.dumps(summary, indent=2, sort_keys=True).encode())
            self._say(f"run {store.url()} finished with {len(failures)} failed shard(s); rerun to retry them")
        else:
            write_success(store, summary)
            store.delete(FAILED_SUMMARY)  # left by an earlier invocation whose failures are now redone
            self._say(f"run {store.url()} complete: {totals['ok']} ok, {totals['failed']} failed, "
                      f"{totals['rejected']} rejected of {totals['rows']} rows")

    def _say(self, msg: str) -> None:
        print(f"[cogview-ray] {msg}", file=self.out, flush=True)


def failed_records(cfg: RunConfig, run_id: str, shard: Shard, attempts: int, error: str) -> list[RowRecord]:
    fs, _ = open_filesystem(cfg.dataset.uri, storage_options_for(cfg.dataset.uri, cfg))
    try:
        rows = read_shard_rows(shard, cfg.dataset, cfg.render, fs)
    except Exception:
        rows = None
    out = []
    for i in range(shard.num_rows):
        r = rows[i] if rows else None
        rejected = r is not None and r.status == "rejected"
        out.append(RowRecord(
            run_id=run_id, shard_id=shard.shard_id, id=r.row_id if r else None, file=shard.file,
            row_index=shard.row_start + i, prompt=r.prompt if r else None,
            negative_prompt=r.negative_prompt if r else None, seed=r.seed if r else None,
            height=r.height if r else None, width=r.width if r else None,
            num_inference_steps=r.num_inference_steps if r else None,
            guidance_scale=r.guidance_scale if r else None, status="rejected" if rejected else "failed",
            reason=r.reason if rejected else error[:300], attempt=attempts, model_path=cfg.model.path))
    return out


def resolve_num_workers(cfg: RunConfig, resources: dict) -> int:
    n = cfg.workers.num_workers
    if str(n) != "auto":
        return int(n)
    gpus = resources.get("GPU", 0)
    if gpus > 0:
        return max(1, int(gpus // max(cfg.workers.gpus_per_worker, 1e-9)))
    spare = resources.get("CPU", 1) - 1  # leave a core for the driver and I/O
    return max(1, int(spare // max(cfg.workers.cpus_per_worker, 1e-9)))


def _kill(ray, actor) -> None:
    try:
        ray.kill(actor, no_restart=True)
    except Exception:
        pass


def _ensure_ray(ray) -> None:
    if not ray.is_initialized():
        address = os.environ.get("RAY_ADDRESS") or None
        ray.init(address=address, log_to_driver=True, include_dashboard=False if address is None else None)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__


def _cause(e: BaseException) -> str:
    """The original exception's type and message from a Ray error (not the whole traceback)."""
    cause = getattr(e, "cause", None)
    if cause is not None and not isinstance(cause, type(e)):
        return f"{type(cause).__name__}: {_first_line(cause)}"
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ":" in ln and not ln.startswith(("File ", "Traceback", "ray::", "The actor")):
            return ln[:300]
    return _first_line(e)


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
