"""Commit markers by generation (issue 9, fencing): a shard committed as failed is retried by
creating the next generation once; no marker is ever deleted, the newest one counts, and a driver
paused with a stale view can lose the race for a generation but change nothing. No Ray."""
import json
from pathlib import Path

import pytest

from cogview_ray import layout
from cogview_ray import manifest as mf
from cogview_ray.commits import Committer, RunOutcome
from cogview_ray.hooks import Hooks
from cogview_ray.records import ShardResult, failed_records
from cogview_ray.run_lock import RunLock
from cogview_ray.shards import Shard
from cogview_ray.stats import RunStats
from cogview_ray.storage import RunStore
from cogview_ray.verify import verify_run

SHARDS = [Shard(f"f00000-{i:06d}", "prompts.parquet", 0, 4 * i, min(4 * i + 4, 10)) for i in range(3)]


# ---------------------------------------------------------------- naming and selection


def test_generation_zero_keeps_the_old_name_and_retries_are_tagged():
    assert layout.commit_marker("f00000-000001") == "commits/f00000-000001.json"
    assert layout.commit_marker("f00000-000001", 0) == "commits/f00000-000001.json"
    assert layout.commit_marker("f00000-000001", 12) == "commits/f00000-000001.g12.json"
    with pytest.raises(ValueError, match="ends like a commit marker generation"):
        layout.commit_marker("s.g3")
    with pytest.raises(ValueError, match="not a whole number"):
        layout.commit_marker("s", -1)


def test_the_newest_generation_of_each_shard_counts():
    names = ["a.json", "a.g1.json", "a.g10.json", "a.g2.json", "b.json", "c.g1.json", "notes.txt", ".json",
             "d.g0.json", "e.g01.json"]
    # c: its generation 0 was removed by hand, generation 1 still counts; "d.g0" and "e.g01" are
    # generation 0 of shards so named (generation tags have no leading zero)
    assert layout.newest_generations(names) == {"a": 10, "b": 0, "c": 1, "d.g0": 0, "e.g01": 0}
    assert set(layout.newest_generations(names)) == {"a", "b", "c", "d.g0", "e.g01"}


def test_readers_find_the_newest_marker(tmp_path):
    store = RunStore(str(tmp_path), "run1")
    with pytest.raises(FileNotFoundError, match="has no commit marker"):
        mf.read_commit(store, "s")
    assert mf.find_marker(store, "s") is None
    store.write("commits/s.json", json.dumps({"shard_id": "s", "status": "failed"}).encode())
    assert mf.read_commit(store, "s")["status"] == "failed"
    store.write("commits/s.g1.json", json.dumps({"shard_id": "s", "status": "failed", "generation": 1}).encode())
    store.write("commits/s.g2.json", json.dumps({"shard_id": "s", "status": "ok", "generation": 2}).encode())
    store.write("commits/t.json", json.dumps({"shard_id": "t", "status": "ok"}).encode())
    assert mf.find_marker(store, "s") == "commits/s.g2.json"
    assert mf.committed_generations(store) == {"s": 2, "t": 0} and mf.committed_shards(store) == {"s", "t"}
    assert mf.read_commit(store, "s")["generation"] == 2  # probed, no listing
    assert mf.read_commit(store, "s", 1)["generation"] == 1  # the one asked for
    assert {k: m["status"] for k, m in mf.read_commits(store, ["s", "t"]).items()} == {"s": "ok", "t": "ok"}


# ---------------------------------------------------------------- the retry protocol on a store


def _run(tmp_path: Path) -> RunStore:
    store = RunStore(str(tmp_path / "out"), "run1")
    mf.write_run_info(store, {"fingerprint": {"files": [{"path": "prompts.parquet", "num_rows": 10}]}})
    return store


def _committer(store: RunStore, lock: RunLock, said: list) -> Committer:
    return Committer(store, lock, Hooks(), RunStats(), RunOutcome(store.run_id, store.url(), 0, 0), said.append,
                     model_path="/no/checkpoint")


def _result(store: RunStore, shard: Shard, attempt: int) -> ShardResult:
    records = failed_records(shard, None, run_id=store.run_id, attempts=attempt, reason="worker_error",
                             error=f"attempt {attempt}", model_path="/no/checkpoint")
    return ShardResult(shard.shard_id, attempt, f"w00.{attempt}", "n0", "cpu", records)


def _first_run_fails_shard_1(store: RunStore) -> None:
    """A finished invocation: shards 0 and 2 committed ok, shard 1 committed as failed (generation 0);
    like an earlier release, it also left `failed/{shard}.json`."""
    lock = RunLock(store)
    lock.acquire()
    committer = _committer(store, lock, [])
    committer.scan(SHARDS)
    for shard in (SHARDS[0], SHARDS[2]):
        committer.commit(shard, _result(store, shard, 1))
    committer.commit_failed(SHARDS[1], None, 2, "worker_error", "boom")
    store.write(f"{layout.FAILED_DIR}/{SHARDS[1].shard_id}.json", b"{}")
    committer.finalize(SHARDS)
    assert store.exists(layout.FAILED_SUMMARY)
    lock.release()


def _files(store: RunStore, folder: str) -> dict[str, bytes]:
    return {rel: store.read(rel) for rel in store.find(folder)}


def test_a_failed_shard_is_retried_under_the_next_generation_and_nothing_is_deleted(tmp_path):
    store = _run(tmp_path)
    _first_run_fails_shard_1(store)
    before = _files(store, layout.COMMITS_DIR)
    assert sorted(before) == [layout.commit_marker(s.shard_id) for s in SHARDS]

    lock = RunLock(store)
    lock.acquire()
    committer = _committer(store, lock, [])
    assert committer.scan(SHARDS) == {SHARDS[0].shard_id, SHARDS[2].shard_id}
    assert committer.generation(SHARDS[1].shard_id) == 1 and committer.generation(SHARDS[0].shard_id) == 0
    assert _files(store, layout.COMMITS_DIR) == before  # the scan deleted nothing
    committer.commit(SHARDS[1], _result(store, SHARDS[1], 1))
    committer.finalize(SHARDS)
    lock.release()

    after = _files(store, layout.COMMITS_DIR)
    assert {k: v for k, v in after.items() if k in before} == before  # generation 0 is still there
    assert set(after) - set(before) == {"commits/f00000-000001.g1.json"}
    marker = mf.read_commit(store, SHARDS[1].shard_id)
    assert (marker["status"], marker["generation"], marker["lock_epoch"]) == ("ok", 1, 2)
    assert store.exists("failed/f00000-000001.json")  # an earlier release's leftover: never deleted
    # the complete run keeps one part per shard: the current markers' (the failed generation's is pruned)
    assert store.find(layout.MANIFEST_DIR) == sorted(
        mf.part_of(mf.read_commit(store, s.shard_id), s.shard_id) for s in SHARDS)
    assert mf.read_success(store)["totals"]["failed_shards"] == 0 and not store.exists(layout.FAILED_SUMMARY)
    report = verify_run(store.url(), store=store, check_objects=False)
    assert report.verified and report.totals["shards"] == 3 and report.totals["rows"] == 10, report.summary()
    # a third invocation finds every shard done
    lock = RunLock(store)
    lock.acquire()
    assert _committer(store, lock, []).scan(SHARDS) == {s.shard_id for s in SHARDS}
    lock.release()


def test_a_paused_driver_with_a_stale_view_loses_the_generation_and_deletes_nothing(tmp_path):
    """Driver A scans (shard 1 failed at generation 0, so it will commit generation 1) and pauses
    past the lock's staleness; driver B takes over, retries shard 1 and completes the run. A wakes
    still believing its view (its lock checks pass, the store looks as it did): its scan, commit and
    failed commit of shard 1 and its finalize change no marker, B's commit stands, verify is clean."""
    store = _run(tmp_path)
    _first_run_fails_shard_1(store)
    said = []
    a_store = RunStore(str(tmp_path / "out"), "run1")
    a_lock = RunLock(a_store)
    a_lock.acquire()
    a = _committer(a_store, a_lock, said)
    assert a.scan(SHARDS) == {SHARDS[0].shard_id, SHARDS[2].shard_id} and a.generation(SHARDS[1].shard_id) == 1

    b_lock = RunLock(store, say=said.append)
    b_lock.acquire(takeover=True)
    b = _committer(store, b_lock, said)
    b.scan(SHARDS)
    b.commit(SHARDS[1], _result(store, SHARDS[1], 3))
    b.finalize(SHARDS)
    b_marker = store.read("commits/f00000-000001.g1.json")
    settled = {**_files(store, layout.COMMITS_DIR), layout.SUCCESS: store.read(layout.SUCCESS)}

    # A wakes just after its last look at the store: its checks pass and it sees no new marker
    a_lock.check = lambda read=False: None
    a_store.exists = lambda rel: False
    a.commit(SHARDS[1], _result(store, SHARDS[1], 2))
    a.commit_failed(SHARDS[1], None, 2, "timeout", "no result")
    assert said[-2:] == ["shard f00000-000001 was committed by another driver meanwhile; keeping that commit"] * 2
    a.scan(SHARDS)  # where the earlier protocol deleted a failed generation's marker
    a.finalize(SHARDS)
    assert {**_files(store, layout.COMMITS_DIR), layout.SUCCESS: store.read(layout.SUCCESS)} == settled
    marker = mf.read_commit(store, SHARDS[1].shard_id)
    assert store.read(layout.commit_marker(SHARDS[1].shard_id, 1)) == b_marker
    assert (marker["status"], marker["lock_id"], marker["attempt"]) == ("ok", b_lock.lock_id, 3)
    report = verify_run(store.url(), store=store, check_objects=False)
    assert report.verified and report.totals["rows"] == 10, report.summary()
    # an earlier release's driver paused the same way deletes what it saw failed: generation 0 only
    store.delete(layout.commit_marker(SHARDS[1].shard_id))
    store.delete(f"{layout.FAILED_DIR}/{SHARDS[1].shard_id}.json")
    assert mf.read_commit(store, SHARDS[1].shard_id)["lock_id"] == b_lock.lock_id
    assert verify_run(store.url(), store=store, check_objects=False).verified
    b_lock.release()
