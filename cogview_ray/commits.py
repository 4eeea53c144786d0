"""The driver's side of the commit protocol: which shards are committed (and whether they are the
shards planned now), committing a worker's result or a shard out of attempts, and the run's closing
summary (`_SUCCESS.json` or `_FAILED.json`). Every write checks the run lock first, every part
has an attempt-unique name and no marker is ever deleted (a failed shard is retried under the next
marker generation, created once): a driver that lost the lock changes nothing a commit points to.
"""
from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Optional

from . import layout
from .errors import RunRefused
from .hooks import Hooks
from .manifest import (commit_shard, committed_generations, part_of, read_commits, read_success,
                       write_manifest_part, write_success)
from .records import ShardResult, Status, failed_records
from .rows import RowSpec
from .run_lock import RunLock
from .shards import Shard
from .stats import RunStats
from .storage import RunStore

log = logging.getLogger("cogview_ray.commits")

_SHOWN_MISMATCHES = 3


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


def check_coverage(store: RunStore, markers: dict[str, dict], shards: list[Shard]) -> None:
    """RunRefused unless every committed marker covers exactly the planned shard of its id (same
    file, same row range). A resume is then exact whatever `resume` says; otherwise (say
    dataset.shard_size changed under resume=force) skipping by id would lose or repeat rows."""
    planned = {s.shard_id: s for s in shards}
    problems = []
    for shard_id in sorted(markers):
        m, shard = markers[shard_id], planned.get(shard_id)
        got = (m.get("file"), m.get("row_start"), m.get("row_stop"))
        if not isinstance(got[0], str) or not all(isinstance(v, int) for v in got[1:]):
            problems.append(f"{shard_id} records no row range (an earlier release's marker)")
        elif shard is None:
            problems.append(f"{shard_id} covers rows [{got[1]}, {got[2]}) of {got[0]}, a shard this plan lacks")
        elif got != (shard.file, shard.row_start, shard.row_stop):
            problems.append(f"{shard_id} covers rows [{got[1]}, {got[2]}) of {got[0]}, planned now as rows "
                            f"[{shard.row_start}, {shard.row_stop}) of {shard.file}")
    if problems:
        more = f" and {len(problems) - _SHOWN_MISMATCHES} more" if len(problems) > _SHOWN_MISMATCHES else ""
        raise RunRefused(
            f"run {store.url()} cannot resume: its committed shards do not match this plan "
            f"({'; '.join(problems[:_SHOWN_MISMATCHES])}{more}), so skipping them would lose or repeat rows "
            f"whatever `resume` says; render into a new output.run_id")


class Committer:
    """Commits shards of one run for the driver that holds its lock."""

    def __init__(self, store: RunStore, lock: RunLock, hooks: Hooks, stats: RunStats, outcome: RunOutcome,
                 say: Callable[[str], None], model_path: str):
        self.store, self.lock, self.hooks, self.stats, self.outcome, self.say = store, lock, hooks, stats, outcome, say
        self.model_path = model_path  # as the manifest shows it: without credentials
        # the marker generation this driver commits each shard under: 0 unless `scan` found the
        # shard committed as failed at generation N, then N + 1
        self._generation: dict[str, int] = {}

    def scan(self, shards: list[Shard]) -> set[str]:
        """Ids of shards committed ok, once every current marker is proven to cover its planned
        shard. A shard committed as failed (generation N) stays so on the store; it is left out
        here, so it runs again, and its next commit creates generation N + 1. Nothing is deleted:
        a driver that paused after this scan can only lose the race for N + 1."""
        generations = committed_generations(self.store)
        markers = read_commits(self.store, sorted(generations), generations)
        check_coverage(self.store, markers, shards)
        redo = {s for s, marker in markers.items() if marker.get("status") == "failed"}
        self._generation = {s: generations[s] + 1 for s in redo}
        return set(markers) - redo

    def generation(self, shard_id: str) -> int:
        """The marker generation this driver's next commit of the shard creates."""
        return self._generation.get(shard_id, 0)

    def commit(self, shard: Shard, result: ShardResult) -> None:
        """Manifest part, then the create-once marker; ValueError for a result that does not
        account for every row of its shard."""
        if len(result.records) != shard.num_rows:
            raise ValueError(f"{len(result.records)} records for {shard.num_rows} rows")
        self.lock.check(read=True)
        if self.store.exists(layout.commit_marker(shard.shard_id, self.generation(shard.shard_id))):
            # only after a lock takeover raced with this driver's last check: the first commit stands
            self.say(f"shard {shard.shard_id} was committed by another driver meanwhile; keeping that commit")
            return
        self.hooks.at_driver("before_manifest", shard.shard_id)
        part = self._write_part(shard, result.records)
        self.hooks.at_driver("after_manifest", shard.shard_id)
        if not self._commit(shard, part, self._summary(shard, "ok", result.attempt, worker_id=result.worker_id)):
            return
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
        part = self._write_part(shard, records)
        detail = f"{reason}: {error}"
        if not self._commit(shard, part, self._summary(shard, "failed", attempts, error=detail)):
            return
        self.stats.add(records)
        self.outcome.shards_failed += 1
        self.say(f"shard {shard.shard_id} failed after {attempts} attempts: {detail}")

    def _write_part(self, shard: Shard, records) -> str:
        """The part under a name no other attempt uses (this epoch, a fresh uuid): a driver that
        wakes late can only add an orphan, never change the part a marker points to."""
        token = f"{self.lock.epoch or 0:010d}-{uuid.uuid4().hex[:12]}"
        write_manifest_part(self.store, shard.shard_id, records, token=token)
        return layout.manifest_part(shard.shard_id, token)

    def _commit(self, shard: Shard, part: str, summary: dict) -> bool:
        self.lock.check(read=True)  # the last look before the marker: a paused driver stops here
        if commit_shard(self.store, shard.shard_id, summary, part=part, generation=self.generation(shard.shard_id)):
            return True
        self.say(f"shard {shard.shard_id} was committed by another driver meanwhile; keeping that commit")
        return False

    def _summary(self, shard: Shard, status: str, attempt: int, **extra) -> dict:
        # the row range makes coverage checkable by range, not by shard id alone
        return {"rows": shard.num_rows, "status": status, "attempt": attempt, "file": shard.file,
                "row_start": shard.row_start, "row_stop": shard.row_stop, "committed_at": time.time(),
                "lock_id": self.lock.lock_id, "lock_epoch": self.lock.epoch, **extra}

    def _prune_parts(self, markers: dict) -> None:
        """Delete manifest parts no marker points to (attempts that were never committed), so a
        complete run's `manifest/` folder holds exactly one part per shard for any Parquet reader."""
        keep = {part_of(marker, shard_id) for shard_id, marker in markers.items()}
        orphans = [rel for rel in self.store.find(layout.MANIFEST_DIR) if rel.endswith(".parquet") and rel not in keep]
        self.lock.check(read=True)
        for rel in orphans:
            self.store.delete(rel)

    def finalize(self, shards: list[Shard]) -> None:
        """`_SUCCESS.json` (created once) when every shard is committed ok, else `_FAILED.json`."""
        store, outcome = self.store, self.outcome
        totals = {"rows": 0, "ok": 0, "failed": 0, "rejected": 0, "shards": len(shards), "failed_shards": 0}
        failures = []
        markers = read_commits(store, [s.shard_id for s in shards])
        check_coverage(store, markers, shards)  # a late driver's marker must still fit the plan
        for shard in shards:
            marker = markers[shard.shard_id]
            for k in ("ok", "failed", "rejected"):
                totals[k] += int(marker.get(k, 0))
            totals["rows"] += int(marker["rows"])
            if marker.get("status") == "failed":
                totals["failed_shards"] += 1
                failures.append({"shard_id": shard.shard_id, "error": marker.get("error")})
        outcome.totals = totals
        summary = {"run_id": store.run_id, "totals": totals, **self.stats.summary(), "failed_shards": failures,
                   "finished_at": time.time(), "lock_id": self.lock.lock_id, "lock_epoch": self.lock.epoch}
        self.lock.check(read=True)
        if failures:
            store.write(layout.FAILED_SUMMARY, json.dumps(summary, indent=2, sort_keys=True).encode())
            if read_success(store) is not None:
                # written late (this driver paused after its check while another completed the run):
                # the complete run supersedes it, and no driver writes _FAILED.json once _SUCCESS.json
                # exists, so this delete can only remove a stale summary
                store.delete(layout.FAILED_SUMMARY)
            self.say(f"run {store.url()} finished with {len(failures)} failed shard(s); rerun to retry them")
            return
        self._prune_parts(markers)
        if not write_success(store, summary):
            self.say(f"run {store.url()} already has its {layout.SUCCESS} from an earlier finalize; keeping it")
        store.delete(layout.FAILED_SUMMARY)  # left by an earlier invocation whose failures are now redone
        self.say(f"run {store.url()} complete: {totals['ok']} ok, {totals['failed']} failed, "
                 f"{totals['rejected']} rejected of {totals['rows']} rows")
