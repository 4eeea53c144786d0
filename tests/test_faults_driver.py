"""Driver faults on a real local Ray cluster (issue 4, faults 2, 3 and 10): the `cogview-ray render`
process SIGKILLed mid-run or dying between a shard's images, manifest part and marker, then
resumed; two drivers on one run and the lock rules."""
import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

pytest.register_assert_rewrite("tests.reliability")

from cogview_ray import layout  # noqa: E402
from cogview_ray.driver import Driver  # noqa: E402
from cogview_ray.errors import LockLost, RunLocked  # noqa: E402
from cogview_ray.run_lock import lock_staleness, read_lock  # noqa: E402
from cogview_ray.storage import RunStore  # noqa: E402
from tests.reliability import (  # noqa: E402, F401 (tally is a fixture)
    check_invariants, check_rerendered, check_rerun_renders_nothing, check_resources_released, faults_env,
    make_cfg, overrides, read_trace, set_faults, start_render, tally, write_prompts)

pytest_plugins = ["tests.reliability"]
pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

SLOW = {"match": "", "action": "slow", "seconds": 0.3}  # every batch: runs last long enough to interrupt


def _commits(run_dir: Path) -> set[str]:
    return {p.stem for p in (run_dir / "commits").glob("*.json")}


def _started_shards(trace_dir) -> set[str]:
    return {e["shard"] for e in read_trace(trace_dir) if e["event"] == "shard"}


def _summary(log_dir: Path, name: str) -> dict:
    return json.loads((log_dir / f"{name}.out").read_text().strip().splitlines()[-1])


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_driver_sigkill_then_the_same_command_resumes(ray_cluster, tiny_checkpoint, tmp_path, tally):
    data = write_prompts(tmp_path / "prompts.parquet", n=24)  # 6 shards
    config = tmp_path / "cfg.yaml"
    config.write_text("{}\n")
    args = [str(config), *overrides(tiny_checkpoint, data, tmp_path / "out", "drv")]
    env = faults_env(tmp_path, rules=[SLOW])
    trace, run_dir = tmp_path / "trace", tmp_path / "out" / "drv"

    first = start_render(args, tmp_path, "first", env)
    tally.runs += 1
    deadline = time.time() + 120
    while not _commits(run_dir):
        assert first.poll() is None, (tmp_path / "first.err").read_text()
        assert time.time() < deadline, "no shard was committed in time"
        time.sleep(0.05)
    tally.kill(first.pid)
    assert first.wait(timeout=30) == -signal.SIGKILL
    check_resources_released()  # its actors died with it
    committed = _commits(run_dir)
    inflight = _started_shards(trace) - committed
    assert 0 < len(committed) < 6 and len(inflight) <= 2 * 2  # workers x max_in_flight
    store = RunStore(str(tmp_path / "out"), "drv")
    check_invariants(tally, store, {data: 24}, complete=False)
    assert read_lock(store)["pid"] == first.pid  # left behind by the killed driver

    second = start_render(args, tmp_path, "second", env)
    tally.runs += 1
    assert second.wait(timeout=180) == 0, (tmp_path / "second.err").read_text()
    summary = _summary(tmp_path, "second")
    assert summary["shards_skipped"] == len(committed) and summary["shards_committed"] == 6 - len(committed)
    assert f"taking over a stale run lock left by pid {first.pid}" in (tmp_path / "second.err").read_text()
    rows = check_invariants(tally, store, {data: 24})
    assert all(r["status"] == "ok" for r in rows)
    check_rerendered(tally, store, read_trace(trace), inflight)
    check_resources_released()
    check_rerun_renders_nothing(tally, make_cfg(tiny_checkpoint, data, tmp_path / "out", "drv"), store, trace)


def test_driver_killed_between_images_manifest_and_marker_redoes_the_shard(ray_cluster, tiny_checkpoint,
                                                                            tmp_path, monkeypatch, tally):
    """Run 1 dies at its first commit, after the manifest part and before the marker; run 2 dies
    at its first commit, after the images and before the manifest part; run 3 finishes. The
    orphan part is never trusted, and redone shards get the same image bytes. (Run 3 is in this
    process; test_driver_sigkill_then_the_same_command_resumes reruns the CLI itself.)"""
    data = write_prompts(tmp_path / "prompts.parquet", n=12)  # 3 shards
    config = tmp_path / "cfg.yaml"
    config.write_text("{}\n")
    args = [str(config), *overrides(tiny_checkpoint, data, tmp_path / "out", "steps")]
    trace, run_dir = tmp_path / "trace", tmp_path / "out" / "steps"
    store = RunStore(str(tmp_path / "out"), "steps")

    def parts() -> set[str]:  # shards with a manifest part (manifest/{shard}/{token}.parquet)
        return {p.parent.name for p in (run_dir / "manifest").glob("*/*.parquet")}

    def rendered_shards() -> set[str]:  # shards whose 4 images are all written
        return {d.name for d in (run_dir / "images").iterdir() if len(list(d.glob("*.png"))) == 4}

    inflight, images_before = set(), {}
    for n, point in enumerate(["after_manifest", "before_manifest"]):
        parts_before, commits_before = (parts(), _commits(run_dir)) if n else (set(), set())
        proc = start_render(args, tmp_path, f"run{n}", faults_env(tmp_path, rules=[{"point": point}]))
        tally.runs += 1
        assert proc.wait(timeout=180) == 137, (tmp_path / f"run{n}.err").read_text()
        tally.kills += 1
        check_resources_released()
        if point == "after_manifest":
            orphans = parts() - _commits(run_dir)
            assert len(orphans) == 1  # a manifest part without its marker
        else:
            # died before writing any manifest part: nothing new is committed or described
            assert (parts(), _commits(run_dir)) == (parts_before, commits_before)
            orphans = rendered_shards() - _commits(run_dir)
            assert orphans  # images without a manifest part
        for shard in orphans:
            images_before.update({p.name: _sha(p) for p in (run_dir / "images" / shard).glob("*.png")})
        check_invariants(tally, store, {data: 12}, complete=False)  # the orphans are not trusted
        inflight |= _started_shards(trace) - _commits(run_dir)
        assert not orphans & _commits(run_dir)

    (tmp_path / "last").mkdir()
    trace_last = set_faults(monkeypatch, tmp_path / "last")
    cfg = make_cfg(tiny_checkpoint, data, tmp_path / "out", "steps")
    assert tally.run(cfg, out=io.StringIO()).exit_code == 0
    rows = check_invariants(tally, store, {data: 12})
    assert all(r["status"] == "ok" for r in rows)
    for name, sha in images_before.items():
        assert _sha(next(run_dir.glob(f"images/*/{name}"))) == sha  # redone: same bytes, same key
    check_rerendered(tally, store, read_trace(trace) + read_trace(trace_last), inflight)
    check_resources_released()
    check_rerun_renders_nothing(tally, cfg, store)


def _run_in_thread(driver: Driver) -> tuple[threading.Thread, dict]:
    result = {}

    def target():
        try:
            result["outcome"] = driver.run()
        except Exception as e:  # noqa: BLE001 - handed to the test
            result["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, result


def _wait_for(predicate, what: str, timeout_s: float = 120) -> None:
    deadline = time.time() + timeout_s
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_second_driver_refuses_then_takes_over_explicitly_and_the_old_one_stops(
        ray_cluster, tiny_checkpoint, tmp_path, monkeypatch, tally):
    import dataclasses

    data = write_prompts(tmp_path / "prompts.parquet", n=16)
    set_faults(monkeypatch, tmp_path, rules=[SLOW])
    cfg = make_cfg(tiny_checkpoint, data, tmp_path / "out", "two")
    run_dir = tmp_path / "out" / "two"
    old = Driver(cfg, heartbeat_s=0.3, out=io.StringIO())
    thread, result = _run_in_thread(old)
    tally.runs += 1
    _wait_for(lambda: _commits(run_dir), "the first driver's first commit")
    # the heartbeat rewrites the holder's own heartbeat object, never the epoch object
    beat = run_dir / layout.lock_heartbeat(1)
    _wait_for(lambda: beat.exists() and json.loads(beat.read_text())["beat"] >= 2, "a heartbeat", timeout_s=10)
    assert json.loads(beat.read_text())["lock_id"] == old.lock.lock_id == read_lock(
        RunStore(str(tmp_path / "out"), "two"))["lock_id"]
    # a second driver refuses: the lock is held by a live driver (this very process)
    with pytest.raises(RunLocked, match=rf"is locked by another driver \(pid {os.getpid()} on host "
                                        rf"{socket.gethostname()}, heartbeat \d+s ago\); if that driver is "
                                        rf"gone, rerun with takeover_lock=true"):
        tally.run(cfg, out=io.StringIO())
    assert thread.is_alive()  # the refusal did not disturb the running driver
    # an explicit takeover: the new driver goes on, the old one notices and stops
    log = io.StringIO()
    outcome = tally.run(dataclasses.replace(cfg, takeover_lock=True), out=log)
    thread.join(timeout=60)
    assert not thread.is_alive()
    assert isinstance(result.get("error"), LockLost) and "taken over by another driver" in str(result["error"])
    assert outcome.exit_code == 0 and outcome.shards_skipped >= 1
    assert f"taking over the run lock held by pid {os.getpid()}" in log.getvalue()
    store = RunStore(str(tmp_path / "out"), "two")
    check_invariants(tally, store, {data: 16})
    owners = {json.loads(store.read(f"commits/{s}.json"))["lock_id"] for s in _commits(run_dir)}
    assert old.lock.lock_id in owners and len(owners) == 2
    assert read_lock(store) is None  # the new driver released its lock (epoch 2) ...
    assert not store.exists(layout.lock_release(1))  # ... and the old one, having lost it, wrote nothing
    check_resources_released()


def test_lock_rules(tmp_path, tiny_checkpoint, tally):
    """Stale (taken over without asking): the holder ran on this host and its pid is gone, or
    its heartbeat is older than lock_stale_s. Anything else is refused without takeover_lock."""
    now = time.time()
    here = socket.gethostname()
    gone = subprocess.Popen(["true"])
    gone.wait()
    assert "no process" in lock_staleness({"host": here, "pid": gone.pid, "heartbeat_at": now}, 120)
    assert "heartbeat is 600s old" in lock_staleness({"host": "elsewhere", "pid": 1, "heartbeat_at": now - 600}, 120)
    assert lock_staleness({"host": "elsewhere", "pid": 1, "heartbeat_at": now - 5}, 120) is None
    assert lock_staleness({"host": here, "pid": os.getpid(), "heartbeat_at": now - 5}, 120) is None

    # refused before anything is written (no Ray, no workers); here the holder is an earlier
    # release's `_LOCK`, live because the store wrote it just now
    data = write_prompts(tmp_path / "prompts.parquet", n=8)
    cfg = make_cfg(tiny_checkpoint, data, tmp_path / "out", "held")
    store = RunStore(str(tmp_path / "out"), "held")
    store.write("_LOCK", json.dumps({"host": "elsewhere", "pid": 4242, "started_at": now,
                                     "heartbeat_at": time.time(), "lock_id": "theirs"}).encode())
    with pytest.raises(RunLocked, match="pid 4242 on host elsewhere.*takeover_lock=true"):
        tally.run(cfg, out=io.StringIO())
    assert store.list("") == ["_LOCK"] and json.loads(store.read("_LOCK"))["lock_id"] == "theirs"
