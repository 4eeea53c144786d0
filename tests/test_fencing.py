"""Fencing (issue 9): a driver or worker paused past the lock's staleness cannot change what a commit
points to, bring back its lock or remove its successor's, and a resume whose committed shards do not
match the plan is refused. Unit tests need no Ray; the `ray` ones share one module-scoped cluster."""
import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.register_assert_rewrite("tests.reliability")

from cogview_ray import layout  # noqa: E402
from cogview_ray import manifest as mf  # noqa: E402
from cogview_ray.cli import main as cli_main  # noqa: E402
from cogview_ray.commits import Committer, RunOutcome  # noqa: E402
from cogview_ray.driver import Driver  # noqa: E402
from cogview_ray.errors import LockLost, RunLocked, RunRefused  # noqa: E402
from cogview_ray.hooks import Hooks  # noqa: E402
from cogview_ray.records import ShardResult, failed_records  # noqa: E402
from cogview_ray.run_lock import RunLock, read_holder, read_lock  # noqa: E402
from cogview_ray.stats import RunStats  # noqa: E402
from cogview_ray.storage import RunStore  # noqa: E402
from cogview_ray.testing import ENV  # noqa: E402
from tests.reliability import (  # noqa: E402, F401 (tally is a fixture)
    check_invariants, check_resources_released, faults_env, make_cfg, overrides, read_trace, set_faults, tally,
    write_prompts)

pytest_plugins = ["tests.reliability"]
pytestmark = pytest.mark.timeout(300)

SLOW = {"match": "", "action": "slow", "seconds": 0.3}  # every batch: runs last long enough to interrupt


# ---------------------------------------------------------------- helpers (no Ray)


def _plan(tmp_path: Path, shard_size: int, *extra, n: int = 10):
    data = tmp_path / "prompts.parquet"
    if not data.exists():
        write_prompts(data, n=n)
    cfg = make_cfg("/no/checkpoint", str(data), tmp_path / "out", "run1", f"dataset.shard_size={shard_size}", *extra)
    shards, fingerprint, _ = Driver(cfg, out=io.StringIO()).plan()
    return cfg, shards, fingerprint


def _committer(store: RunStore, lock: RunLock, said: list) -> Committer:
    return Committer(store, lock, Hooks(), RunStats(), RunOutcome(store.run_id, store.url(), 0, 0), said.append,
                     model_path="/no/checkpoint")


def _result(store: RunStore, shard, attempt: int = 1) -> ShardResult:
    records = failed_records(shard, None, run_id=store.run_id, attempts=attempt, reason="worker_error",
                             error=f"attempt {attempt}", model_path="/no/checkpoint")
    return ShardResult(shard.shard_id, attempt, f"w00.{attempt}", "n0", "cpu", records)


def _points_to_its_part(store: RunStore, shard_id: str) -> dict:
    marker = mf.read_commit(store, shard_id)
    data = store.read(mf.part_of(marker, shard_id))
    assert hashlib.sha256(data).hexdigest() == marker["manifest_sha256"]
    return marker


def _render(args: list[str], capsys) -> tuple[int, str]:
    """`cogview-ray render ARGS`: its exit code and its one error line (asserted to be one)."""
    code = cli_main(["render", *args])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("cogview-ray: error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    return code, errors[0]


# ---------------------------------------------------------------- epoch locks and part naming (no Ray)


def test_a_late_heartbeat_or_release_never_brings_a_lock_back(tmp_path):
    store = RunStore(str(tmp_path / "out"), "run1")
    old = RunLock(store, heartbeat_s=0.05)
    old.acquire()
    new = RunLock(store, say=lambda _: None)
    new.acquire(takeover=True)
    # what a paused holder may still do on waking: beat into its own object, mark its own epoch released
    store.write(layout.lock_heartbeat(1), json.dumps({"epoch": 1, "lock_id": old.lock_id}).encode())
    store.create_once(layout.lock_release(1), b"{}")
    holder = read_holder(store)
    assert (holder.epoch, holder.info["lock_id"], holder.released) == (2, new.lock_id, False)
    with pytest.raises(RunLocked):  # the new holder still holds the run
        RunLock(store).acquire()
    with pytest.raises(LockLost, match="epoch 2"):
        old.check(read=True)
    old.release()
    assert read_lock(store)["lock_id"] == new.lock_id
    new.release()
    assert read_lock(store) is None


@pytest.mark.parametrize("data", [b"", b"{\"pid\": 1", b"[]"])
def test_an_unreadable_lock_is_refused_with_a_sentence_then_taken_over_on_request(tmp_path, data):
    store = RunStore(str(tmp_path / "out"), "run1")
    store.write(layout.lock_epoch(1), data)  # fresh: whoever wrote it may be alive
    with pytest.raises(RunLocked, match=r"^run .*/run1 has an unreadable lock object .*/_locks/0000000001.json "
                                        r"written \d+s ago; if no driver is running on this run, rerun with "
                                        r"takeover_lock=true$"):
        RunLock(store).acquire()
    said = []
    lock = RunLock(store, say=said.append)
    lock.acquire(takeover=True)
    assert lock.epoch == 2 and said == [
        "taking over the run lock held by an unreadable lock object _locks/0000000001.json (takeover_lock=true)"]
    lock.release()
    # old and unreadable (here an earlier release's _LOCK): stale, taken over without asking
    other = RunStore(str(tmp_path / "out"), "run2")
    other.write(layout.LEGACY_LOCK, data)
    os.utime(tmp_path / "out" / "run2" / "_LOCK", (time.time() - 600, time.time() - 600))
    said.clear()
    RunLock(other, say=said.append).acquire()
    assert said[0].startswith("taking over a stale run lock left by an unreadable lock object _LOCK: it is "
                              "unreadable and 6")


def test_staleness_is_judged_on_the_store_clock_not_the_holders_fields(tmp_path):
    store = RunStore(str(tmp_path / "out"), "run1")
    fresh = {"epoch": 1, "lock_id": "x", "host": "elsewhere", "pid": 7, "started_at": 0, "heartbeat_at": 0}
    assert store.create_once(layout.lock_epoch(1), json.dumps(fresh).encode())
    # its fields say 1970, but the store wrote it just now: live
    with pytest.raises(RunLocked, match=r"pid 7 on host elsewhere, heartbeat [01]s ago"):
        RunLock(store, stale_s=60).acquire()
    # its fields say "now", but the store's times of its object and heartbeat are 10 minutes old: stale
    store.write(layout.lock_heartbeat(1), json.dumps({"heartbeat_at": time.time() + 3600}).encode())
    for rel in (layout.lock_epoch(1), layout.lock_heartbeat(1)):
        os.utime(store.path(rel), (time.time() - 600, time.time() - 600))
    said = []
    lock = RunLock(store, stale_s=60, say=said.append)
    lock.acquire()
    lock.release()
    assert said == ["taking over a stale run lock left by pid 7 on host elsewhere: its heartbeat is 600s old "
                    "(stale after 60s)"]


def test_a_committed_part_is_never_written_again(tmp_path):
    """A driver paused after its last lock check (simulated: its checks pass) wakes after a successor
    committed the same shard: it writes only an orphan part, and the marker keeps pointing at the
    successor's part with the successor's epoch."""
    _, shards, _ = _plan(tmp_path, 4)
    store, old_store = RunStore(str(tmp_path / "out"), "run1"), RunStore(str(tmp_path / "out"), "run1")
    said = []
    old = RunLock(old_store)
    old.acquire()
    old_committer = _committer(old_store, old, said)
    new = RunLock(store, say=said.append)
    new.acquire(takeover=True)
    _committer(store, new, said).commit(shards[0], _result(store, shards[0], attempt=2))
    marker = _points_to_its_part(store, shards[0].shard_id)
    assert (marker["lock_epoch"], marker["lock_id"], marker["attempt"]) == (2, new.lock_id, 2)
    run_dir = tmp_path / "out" / "run1"
    committed = {p: (run_dir / p).read_bytes() for p in (marker["manifest"], "commits/f00000-000000.json")}

    with pytest.raises(LockLost):  # awake and checking: it stops before writing anything
        old_committer.commit(shards[1], _result(store, shards[1]))
    assert not store.exists(layout.commit_marker(shards[1].shard_id))
    assert store.list(f"{layout.MANIFEST_DIR}/{shards[1].shard_id}") == []

    old._lost = None
    old.check = lambda read=False: None  # paused right after its last successful look at the store
    old_store.exists = lambda rel: False
    old_committer.commit(shards[0], _result(store, shards[0], attempt=1))
    assert said[-1] == "shard f00000-000000 was committed by another driver meanwhile; keeping that commit"
    parts = store.list(f"{layout.MANIFEST_DIR}/{shards[0].shard_id}")
    assert len(parts) == 2 and all(p.endswith(".parquet") for p in parts)  # the successor's and an orphan
    assert {p: (run_dir / p).read_bytes() for p in committed} == committed
    assert mf.read_manifest(store, columns=["attempt"]).column("attempt").to_pylist() == [2] * 4
    new.release()


def test_a_complete_run_keeps_exactly_the_committed_parts(tmp_path):
    """Parts of attempts that were never committed are deleted before `_SUCCESS.json`, so a plain
    Parquet reader of `manifest/` sees one part per shard."""
    _, shards, _ = _plan(tmp_path, 4)
    store, said = RunStore(str(tmp_path / "out"), "run1"), []
    lock = RunLock(store)
    lock.acquire()
    committer = _committer(store, lock, said)
    mf.write_manifest_part(store, shards[0].shard_id, _result(store, shards[0]).records, token="0000000001-orphan")
    orphan = layout.manifest_part(shards[0].shard_id, "0000000001-orphan")
    assert orphan in store.find(layout.MANIFEST_DIR)
    for shard in shards:
        committer.commit(shard, _result(store, shard, attempt=2))
    committer.finalize(shards)
    parts = store.find(layout.MANIFEST_DIR)
    assert len(parts) == len(shards) and orphan not in parts
    assert parts == sorted(mf.part_of(mf.read_commit(store, s.shard_id), s.shard_id) for s in shards)
    assert mf.read_success(store)["totals"]["rows"] == 10
    lock.release()


def test_success_is_written_once_and_a_late_failed_summary_is_removed(tmp_path):
    _, shards, _ = _plan(tmp_path, 5)
    store = RunStore(str(tmp_path / "out"), "run1")
    said = []
    lock = RunLock(store)
    lock.acquire()
    committer = _committer(store, lock, said)
    for shard in shards:
        committer.commit(shard, _result(store, shard))
    committer.finalize(shards)
    success = store.read(layout.SUCCESS)
    assert json.loads(success)["lock_epoch"] == 1
    committer.finalize(shards)  # e.g. a late driver's finalize: the complete run is written once
    assert store.read(layout.SUCCESS) == success
    assert f"run {store.url()} already has its _SUCCESS.json from an earlier finalize; keeping it" in said
    # a driver that saw a failed shard and paused after its check writes _FAILED.json late: removed at once
    store.delete(layout.commit_marker(shards[1].shard_id))
    committer.commit_failed(shards[1], None, 3, "timeout", "no result")
    committer.finalize(shards)
    assert not store.exists(layout.FAILED_SUMMARY) and store.read(layout.SUCCESS) == success
    lock.release()


# ---------------------------------------------------------------- resume coverage (no Ray)


def _commit_some(tmp_path, shard_size: int, count: int, *, with_ranges: bool = True) -> RunStore:
    """A run whose first `count` shards were committed before its driver stopped."""
    cfg, shards, fingerprint = _plan(tmp_path, shard_size)
    driver = Driver(cfg, out=io.StringIO())
    driver.store = store = RunStore(cfg.output.uri, "run1")
    driver.lock = RunLock(store)
    driver.lock.acquire()
    driver._check_resume(fingerprint)
    committer = _committer(store, driver.lock, [])
    for shard in shards[:count]:
        if with_ranges:
            committer.commit(shard, _result(store, shard))
        else:  # an earlier release's marker: no file or row range
            part = committer._write_part(shard, _result(store, shard).records)
            mf.commit_shard(store, shard.shard_id, {"rows": shard.num_rows, "status": "ok"}, part=part)
    driver.lock.release()
    return store


def _args(tmp_path, *extra) -> list[str]:
    config = tmp_path / "cfg.yaml"
    config.write_text("{}\n")
    return [str(config), *overrides("/no/checkpoint", str(tmp_path / "prompts.parquet"), tmp_path / "out", "run1"),
            *extra]


def test_resume_force_with_another_shard_size_is_refused(tmp_path, capsys):
    """10 rows in shards of 4, two committed, driver gone; rerun with shards of 5 and resume=force:
    both new shard ids are committed, but for other rows, so nothing may be skipped by id."""
    store = _commit_some(tmp_path, 4, 2)
    before = sorted(p for p in (tmp_path / "out" / "run1").rglob("*") if p.is_file() and not {"_locks", "_logs"} & set(p.parts))
    code, err = _render(_args(tmp_path, "dataset.shard_size=5", "resume=force"), capsys)
    assert code == RunRefused.exit_code == 2
    data = tmp_path / "prompts.parquet"
    assert err == f"cogview-ray: error: run {store.url()} cannot resume: its committed shards do not match this " \
                  f"plan (f00000-000000 covers rows [0, 4) of {data}, planned now as rows [0, 5) of {data}; " \
                  f"f00000-000001 covers rows [4, 8) of {data}, planned now as rows [5, 10) of {data}), so skipping " \
                  f"them would lose or repeat rows whatever `resume` says; render into a new output.run_id"
    after = sorted(p for p in (tmp_path / "out" / "run1").rglob("*") if p.is_file() and not {"_locks", "_logs"} & set(p.parts))
    assert after == before and not store.exists(layout.SUCCESS)


def test_markers_without_ranges_or_outside_the_plan_are_refused(tmp_path, capsys):
    _commit_some(tmp_path, 4, 1, with_ranges=False)
    code, err = _render(_args(tmp_path), capsys)
    assert code == 2 and "(f00000-000000 records no row range (an earlier release's marker)), so skipping" in err
    store = RunStore(str(tmp_path / "out"), "run1")
    store.delete(layout.commit_marker("f00000-000000"))
    # a committed shard the plan lacks (shards of 4 leave f00000-000002; shards of 5 have two)
    _commit_some(tmp_path, 4, 3)
    store.delete(layout.commit_marker("f00000-000000"))
    store.delete(layout.commit_marker("f00000-000001"))
    code, err = _render(_args(tmp_path, "dataset.shard_size=5", "resume=force"), capsys)
    data = tmp_path / "prompts.parquet"
    assert code == 2 and f"(f00000-000002 covers rows [8, 10) of {data}, a shard this plan lacks)" in err


def test_unreadable_run_files_are_one_sentence(tmp_path, capsys):
    store = _commit_some(tmp_path, 4, 1)
    marker = store.read(layout.commit_marker("f00000-000000"))
    store.write(layout.commit_marker("f00000-000000"), marker[:20])
    code, err = _render(_args(tmp_path), capsys)
    assert code == 2 and err == (f"cogview-ray: error: {store.url('commits/f00000-000000.json')} is unreadable (not "
                                 f"a JSON object); restore or remove it, or write the run under a new output.run_id.")
    store.write(layout.RUN_INFO, b"")
    code, err = _render(_args(tmp_path), capsys)
    assert code == 2 and err.startswith(f"cogview-ray: error: {store.url('_run.json')} is unreadable")
    store.write(layout.lock_epoch(read_holder(store).epoch + 1), b"\x00garbage")
    code, err = _render(_args(tmp_path), capsys)
    assert code == 3 and "has an unreadable lock object" in err and err.endswith("rerun with takeover_lock=true")


# ---------------------------------------------------------------- paused processes on a real Ray cluster

# The first driver runs as `cogview-ray render` in its own process, with a fast heartbeat so that a
# pause, not a slow beat, is what makes it stale.
_FAST_DRIVER = """
import sys
from cogview_ray import cli, driver
driver.run_render = lambda cfg, out=None: driver.Driver(cfg, heartbeat_s=0.2, out=out).run()
sys.exit(cli.main(["render", *sys.argv[1:]]))
"""


def _commits(run_dir: Path) -> set[str]:
    return {p.stem for p in (run_dir / "commits").glob("*.json")}


def _contents(run_dir: Path) -> dict:
    """sha256 of every object but the first holder's heartbeat and its driver log (its own
    objects, which it may still touch: the log says it lost the lock) and temporary files."""
    skip = {run_dir / layout.lock_heartbeat(1)}
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in run_dir.rglob("*")
            if p.is_file() and p not in skip and not {".tmp", layout.LOGS_DIR} & set(p.relative_to(run_dir).parts)}


def _wait_for(predicate, what: str, timeout_s: float = 180) -> None:
    deadline = time.time() + timeout_s
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.ray
def test_a_driver_paused_past_staleness_wakes_to_LockLost_and_changes_nothing(ray_cluster, tiny_checkpoint,
                                                                             tmp_path, monkeypatch, tally):
    import ray

    data = write_prompts(tmp_path / "prompts.parquet", n=24)  # 6 shards
    run_dir = tmp_path / "out" / "paused"
    one_worker = "workers.num_workers=1"  # one CPU each: the paused driver's worker keeps its own
    config = tmp_path / "cfg.yaml"
    config.write_text("{}\n")
    env = {k: v for k, v in os.environ.items() if k != ENV}
    env.update(faults_env(tmp_path, rules=[SLOW]), RAY_ADDRESS=ray.get_runtime_context().gcs_address)
    args = [str(config), *overrides(tiny_checkpoint, data, tmp_path / "out", "paused", one_worker)]
    with open(tmp_path / "first.out", "w") as out, open(tmp_path / "first.err", "w") as err:
        first = subprocess.Popen([sys.executable, "-c", _FAST_DRIVER, *args], stdout=out, stderr=err, env=env)
    tally.runs += 1
    try:
        _wait_for(lambda: _commits(run_dir) or first.poll() is not None, "the first driver's first commit")
        assert first.poll() is None, (tmp_path / "first.err").read_text()
        os.kill(first.pid, signal.SIGSTOP)
        time.sleep(0.5)  # a commit under way when it stopped has landed or not; nothing moves now
        before_pause = _commits(run_dir)
        assert 0 < len(before_pause) < 6
        time.sleep(2.5)  # past lock_stale_s=2 on the store's clock

        log = io.StringIO()
        set_faults(monkeypatch, tmp_path, rules=[SLOW])
        second = Driver(make_cfg(tiny_checkpoint, data, tmp_path / "out", "paused", one_worker),
                        lock_stale_s=2.0, heartbeat_s=0.2, out=log)
        outcome = second.run()
        tally.runs += 1
        assert outcome.exit_code == 0 and outcome.shards_skipped == len(before_pause), log.getvalue()
        assert f"taking over a stale run lock left by pid {first.pid} on host {socket.gethostname()}: its " \
               f"heartbeat is " in log.getvalue()
        settled = _contents(run_dir)
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert first.wait(timeout=120) == 3
    err = (tmp_path / "first.err").read_text()
    assert f"cogview-ray: error: the run lock of {run_dir} was taken over by another driver (pid {os.getpid()} " \
           f"on host {socket.gethostname()}, epoch 2), so this driver stops without writing more" in err
    assert "Traceback" not in err
    assert _contents(run_dir) == settled  # the woken driver wrote nothing

    store = RunStore(str(tmp_path / "out"), "paused")
    rows = check_invariants(tally, store, {data: 24})  # verify_run included
    assert all(r["status"] == "ok" for r in rows)
    for shard in _commits(run_dir):
        marker = _points_to_its_part(store, shard)
        if shard in before_pause:
            assert marker["lock_epoch"] == 1
        else:  # the second driver's commits stand
            assert (marker["lock_epoch"], marker["lock_id"]) == (2, second.lock.lock_id)
    check_resources_released()


@pytest.mark.ray
def test_a_worker_paused_past_its_timeout_cannot_spoil_the_reassigned_commit(ray_cluster, tiny_checkpoint,
                                                                            tmp_path, monkeypatch, tally):
    data = write_prompts(tmp_path / "prompts.parquet", n=16)  # 4 shards
    # a second per batch: a stop after a shard's first batch lands well before its second
    trace = set_faults(monkeypatch, tmp_path, rules=[dict(SLOW, seconds=1.0)])
    cfg = make_cfg(tiny_checkpoint, data, tmp_path / "out", "stopped", "workers.shard_timeout_s=10")
    run_dir = tmp_path / "out" / "stopped"
    result = {}

    def drive():
        try:
            result["outcome"] = tally.run(cfg, out=io.StringIO())
        except Exception as e:  # noqa: BLE001 - handed to the test
            result["error"] = e

    thread = threading.Thread(target=drive, daemon=True)
    thread.start()
    stopped = {}

    def first_batch_done() -> bool:  # a worker that has rendered one batch of a shard: stop it mid-shard
        current = {}
        for e in read_trace(trace):
            if e["event"] == "shard":
                current[e["pid"]] = e["shard"]
            elif e["event"] == "rendered" and current.get(e["pid"]):
                stopped.update(pid=e["pid"], shard=current[e["pid"]])
                return True
        return not thread.is_alive()

    _wait_for(first_batch_done, "a worker's first batch")
    assert stopped, result
    os.kill(stopped["pid"], signal.SIGSTOP)
    tally.kills += 1
    assert stopped["shard"] not in _commits(run_dir)  # stopped mid-shard
    try:
        _wait_for(lambda: stopped["shard"] in _commits(run_dir) or not thread.is_alive(),
                  "the reassigned shard's commit")
        committed = (run_dir / "commits" / f"{stopped['shard']}.json").read_bytes()
    finally:
        try:
            os.kill(stopped["pid"], signal.SIGCONT)  # if the timeout's kill has not landed yet, it wakes
        except ProcessLookupError:
            pass
    thread.join(timeout=180)
    assert not thread.is_alive() and "error" not in result, result
    assert result["outcome"].exit_code == 0 and result["outcome"].workers_replaced >= 1
    time.sleep(1.0)  # room for anything the woken worker still had to write
    store = RunStore(str(tmp_path / "out"), "stopped")
    rows = check_invariants(tally, store, {data: 16})  # verify_run included
    assert all(r["status"] == "ok" for r in rows)
    marker = _points_to_its_part(store, stopped["shard"])
    assert (run_dir / "commits" / f"{stopped['shard']}.json").read_bytes() == committed
    worker_of = {e["pid"]: e["worker_id"] for e in read_trace(trace) if e["event"] == "init"}
    assert marker["attempt"] >= 2 and marker["worker_id"] != worker_of[stopped["pid"]]
    check_resources_released()
