"""The driver's side of the commit protocol: which shards are committed, committing a worker's
result or a shard out of attempts, and the run's closing summary (`_SUCCESS.json` or
`_FAILED.json`). Every write checks the run lock first: a driver that lost it writes nothing.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from . import layout
from .hooks import Hooks
from .manifest import commit_shard, committed_shards, read_commit, write_manifest_part, write_success
from .records import ShardResult, Status, failed_records
from .rows import RowSpec
from .run_lock import RunLock
from .shards import Shard
from .stats import RunStats
from .storage import RunStore

log = logging.getLogger("cogview_ray.commits")


@dataclass
class RunOutcome:
    run_id: str
    run_uri: str
    shards_total: int
    shards_skipped: int  # committed before this invocation
    shards_committed: int = 0  # committed by this invocation
    shards_failed: int = 0
    rows_rendered: int = 0
    totals: dict = field(default_factory=dict)
    workers_replaced: int = 0

    @property
    def exit_code(self) -> int:
        return 1 if self.shards_failed else 0


class Committer:
    """Commits shards of one run for the driver that holds its lock."""

    def __init__(self, store: RunStore, lock: RunLock, hooks: Hooks, stats: RunStats, outcome: RunOutcome,
                 say: Callable[[str], None], model_path: str):
        self.store, self.lock, self.hooks, self.stats, self.outcome, self.say = store, lock, hooks, stats, outcome, say
        self.model_path = model_path  # as the manifest shows it: without credentials

    def scan(self) -> set[str]:
        """Committed shard ids; shards committed as failed are uncommitted here so they run again."""
        store = self.store
        committed = committed_shards(store)
        failed = layout.shard_ids(layout.FAILED_DIR, store.list(layout.FAILED_DIR))
        for shard_id in sorted(failed & committed):
            self.lock.check(read=True)
            store.delete(layout.commit_marker(shard_id))
            store.delete(layout.failed_marker(shard_id))
        for shard_id in sorted(failed - committed):
            # a marker whose commit is gone (a driver stopped between the two deletes above, or
            # between writing it and committing): drop it, or it would uncommit a later success
            store.delete(layout.failed_marker(shard_id))
        return committed - failed

    def commit(self, shard: Shard, result: ShardResult) -> None:
        """Manifest part, then the create-once marker; ValueError for a result that does not
        account for every row of its shard."""
        if len(result.records) != shard.num_rows:
            raise ValueError(f"{len(result.records)} records for {shard.num_rows} rows")
        self.lock.check(read=True)
        if self.store.exists(layout.commit_marker(shard.shard_id)):
            # only after a lock takeover raced with this driver's last check: the first commit stands
            self.say(f"shard {shard.shard_id} was committed by another driver meanwhile; keeping that commit")
            return
        self.hooks.at_driver("before_manifest", shard.shard_id)
        write_manifest_part(self.store, shard.shard_id, result.records)
        self.hooks.at_driver("after_manifest", shard.shard_id)
        if not commit_shard(self.store, shard.shard_id, self._summary(shard, "ok", result.attempt,
                                                                     worker_id=result.worker_id)):
            log.warning("shard %s was already committed; keeping the first commit", shard.shard_id)
        self.stats.add(result.records)
        self.outcome.shards_committed += 1
        self.outcome.rows_rendered += sum(1 for r in result.records if r.status != Status.REJECTED)

    def commit_failed(self, shard: Shard, rows: Optional[list[RowSpec]], attempts: int, reason: str,
                      error: str) -> None:
        """A shard out of attempts: every row is recorded (rejections stay rejections) and the
        shard is marked failed, so a later run retries it."""
        records = failed_records(shard, rows, run_id=self.store.run_id, attempts=attempts, reason=reason,
                                 error=error, model_path=self.model_path)
        self.lock.check(read=True)
        write_manifest_part(self.store, shard.shard_id, records)
        detail = f"{reason}: {error}"
        self.store.write(layout.failed_marker(shard.shard_id), json.dumps(
            {"shard_id": shard.shard_id, "reason": reason, "error": error, "attempts": attempts}).encode())
        commit_shard(self.store, shard.shard_id, self._summary(shard, "failed", attempts, error=detail))
        self.stats.add(records)
        self.outcome.shards_failed += 1
        self.say(f"shard {shard.shard_id} failed after {attempts} attempts: {detail}")

    def _summary(self, shard: Shard, status: str, attempt: int, **extra) -> dict:
        # the row range makes coverage checkable by range, not by shard id alone
        return {"rows": shard.num_rows, "status": status, "attempt": attempt, "file": shard.file,
                "row_start": shard.row_start, "row_stop": shard.row_stop, "committed_at": time.time(),
                "lock_id": self.lock.lock_id, **extra}

    def finalize(self, shards: list[Shard]) -> None:
        """`_SUCCESS.json` when every shard is committed ok, else `_FAILED.json`."""
        store, outcome = self.store, self.outcome
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
        summary = {"run_id": store.run_id, "totals": totals, **self.stats.summary(), "failed_shards": failures,
                   "finished_at": time.time()}
        self.lock.check(read=True)
        if failures:
            store.write(layout.FAILED_SUMMARY, json.dumps(summary, indent=2, sort_keys=True).encode())
            self.say(f"run {store.url()} finished with {len(failures)} failed shard(s); rerun to retry them")
        else:
            write_success(store, summary)
            store.delete(layout.FAILED_SUMMARY)  # left by an earlier invocation whose failures are now redone
            self.say(f"run {store.url()} complete: {totals['ok']} ok, {totals['failed']} failed, "
                     f"{totals['rejected']} rejected of {totals['rows']} rows")
