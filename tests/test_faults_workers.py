"""Worker faults on a real local Ray cluster (issue 4, faults 1 and 5-9): SIGKILLed workers, poison
shards, a hung worker, a pipeline that cannot load, non-finite output and device OOM."""
import io
import json
import shutil
import threading
import time
from pathlib import Path

import pytest

pytest.register_assert_rewrite("tests.reliability")

from cogview_ray.cli import main as cli_main  # noqa: E402
from cogview_ray.run_lock import read_lock
from cogview_ray.storage import RunStore  # noqa: E402
from tests.reliability import (  # noqa: E402, F401 (tally is a fixture)
    check_invariants, check_rerendered, check_rerun_renders_nothing, check_resources_released, make_cfg,
    overrides, pid_alive, read_trace, set_faults, tally, write_prompts)

pytest_plugins = ["tests.reliability"]
pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]


class Killer(threading.Thread):
    """SIGKILLs a worker once it has rendered its first batch of a shard (so mid-shard), on
    `kills` different shards; the pid comes from the worker's own trace of the shard."""

    def __init__(self, tally, trace_dir, kills: int):
        super().__init__(daemon=True)
        self.tally, self.trace_dir, self.kills = tally, trace_dir, kills
        self.killed: list[tuple[int, str]] = []  # (pid, shard)
        self.stop = threading.Event()

    def run(self):
        while not self.stop.is_set() and len(self.killed) < self.kills:
            current = {}  # pid -> shard it works on
            for e in read_trace(self.trace_dir):
                if e["event"] == "shard":
                    current[e["pid"]] = e["shard"]
                elif e["event"] == "rendered":
                    pid, shard = e["pid"], current.get(e["pid"])
                    done_pids = {p for p, _ in self.killed}
                    done_shards = {s for _, s in self.killed}
                    if shard and pid not in done_pids and shard not in done_shards:
                        self.tally.kill(pid)
                        self.killed.append((pid, shard))
                        break
            time.sleep(0.05)


def test_sigkilled_workers_are_replaced_and_the_run_completes_once(ray_cluster, tiny_checkpoint, tmp_path,
                                                                   monkeypatch, tally):
    """Three SIGKILLs on three shards: an original worker, then whichever runs next (a
    replacement among them); the same shard killed on every attempt is in test_faults_rows."""
    kills = 3
    data = write_prompts(tmp_path / "prompts.parquet", n=24)
    # every batch sleeps a little, so a kill after a shard's first batch lands mid-shard
    trace = set_faults(monkeypatch, tmp_path, rules=[{"match": "", "action": "slow", "seconds": 0.4}])
    cfg = make_cfg(tiny_checkpoint, data, tmp_path / "out", "kill")
    killer = Killer(tally, trace, kills)
    killer.start()
    try:
        outcome = tally.run(cfg, out=io.StringIO())
    finally:
        killer.stop.set()
        killer.join()
    assert len(killer.killed) == kills
    assert outcome.exit_code == 0 and outcome.shards_failed == 0
    assert outcome.workers_replaced == kills
    assert not any(pid_alive(pid) for pid, _ in killer.killed)
    store = RunStore(str(tmp_path / "out"), "kill")
    rows = check_invariants(tally, store, {data: 24})
    assert all(r["status"] == "ok" for r in rows)
    success = json.loads(store.read("_SUCCESS.json"))
    assert success["recoveries"]["workers_lost"] == kills
    killed_shards = {s for _, s in killer.killed}
    # every killed shard was finished by another worker process
    events = read_trace(trace)
    worker_of = {e["pid"]: e["worker_id"] for e in events if e["event"] == "init"}
    for pid, shard in killer.killed:
        assert worker_of[pid] not in {r["worker_id"] for r in rows if r["shard_id"] == shard}
    assert {r["shard_id"] for r in rows if r["attempt"] == 2} == killed_shards
    again = check_rerendered(tally, store, events, killed_shards)
    assert len(again) >= 2 * kills  # each kill came after a batch of 2 rows was rendered
    check_resources_released()
    check_rerun_renders_nothing(tally, cfg, store, trace)


def test_hung_worker_is_killed_and_replaced(ray_cluster, tiny_checkpoint, tmp_path, monkeypatch, tally):
    data = write_prompts(tmp_path / "prompts.parquet", n=8, prompts={1: "HANG here: a small house"})
    trace = set_faults(monkeypatch, tmp_path, rules=[{"match": "HANG", "action": "hang", "times": 1}])
    cfg = make_cfg(tiny_checkpoint, data, tmp_path / "out", "hang", "workers.shard_timeout_s=4")
    log = io.StringIO()
    t0 = time.time()
    outcome = tally.run(cfg, out=log)
    wall_s = time.time() - t0
    assert outcome.exit_code == 0 and outcome.workers_replaced == 1
    assert "f00000-000000 exceeded 4s" in log.getvalue()
    assert wall_s < 60
    events = read_trace(trace)
    hung_pid = next(e["pid"] for e in events if e["event"] == "fault" and e["action"] == "hang")
    assert not pid_alive(hung_pid)  # the timeout killed the hung process, not just forgot it
    tally.kills += 1
    store = RunStore(str(tmp_path / "out"), "hang")
    rows = check_invariants(tally, store, {data: 8})
    assert all(r["status"] == "ok" for r in rows)
    hung_rows = [r for r in rows if r["shard_id"] == "f00000-000000"]
    hung_worker = next(e["worker_id"] for e in events if e["event"] == "init" and e["pid"] == hung_pid)
    assert {r["attempt"] for r in hung_rows} == {2} and hung_worker not in {r["worker_id"] for r in hung_rows}
    success = json.loads(store.read("_SUCCESS.json"))
    assert success["recoveries"]["shard_timeouts"] == 1
    check_rerendered(tally, store, events, {"f00000-000000"})
    check_resources_released()


def _corrupt_checkpoint(src: str, dst: Path) -> str:
    shutil.copytree(src, dst)
    weights = sorted((dst / "transformer").glob("*.safetensors"))[0]
    weights.write_bytes(b"\xff" * 8 + b"not a safetensors header")
    return str(dst)


@pytest.mark.parametrize("case", ["missing_path", "corrupt_weights"])
def test_pipeline_that_cannot_load_fails_fast(ray_cluster, tiny_checkpoint, tmp_path, monkeypatch, capsys,
                                              tally, case):
    data = write_prompts(tmp_path / "prompts.parquet", n=8)
    if case == "missing_path":
        model, expected = str(tmp_path / "no-such-checkpoint"), "has no model_index.json"
    else:
        model, expected = _corrupt_checkpoint(tiny_checkpoint, tmp_path / "ckpt"), "CheckpointError: "
    trace = set_faults(monkeypatch, tmp_path)
    args = overrides(model, data, tmp_path / "out", "noload", "workers.num_workers=1")
    config = tmp_path / "cfg.yaml"
    config.write_text("{}\n")
    t0 = time.time()
    tally.runs += 1
    rc = cli_main(["render", str(config), *args])
    wall_s = time.time() - t0
    err = capsys.readouterr().err
    assert rc == 2
    message = [ln for ln in err.splitlines() if ln.startswith("cogview-ray: error:")]
    assert len(message) == 1 and "Traceback" not in err
    assert "could not start" in message[0] and expected in message[0] and model in message[0]
    if case == "corrupt_weights":  # the file is named, and the error's type without its module path
        assert "diffusion_pytorch_model.safetensors is not a safetensors file" in message[0]
        assert "cogview_ray.model" not in message[0]
    # failed fast: the worker started once, was not restarted or replaced, never got ready
    events = read_trace(trace)
    assert [e["worker_id"] for e in events if e["event"] == "init"] == ["w00.0"]
    assert not [e for e in events if e["event"] in ("ready", "shard")]
    assert wall_s < 60
    check_resources_released()
    store = RunStore(str(tmp_path / "out"), "noload")
    assert store.list("commits") == [] and read_lock(store) is None


def _cli(config: Path, args: list[str], capsys) -> tuple[int, str, str]:
    """`cogview-ray render` in this process: exit code, its JSON summary line, stderr."""
    rc = cli_main(["render", str(config), *args])
    captured = capsys.readouterr()
    # Ray itself may print to stdout (e.g. the raylet's note on a dead worker): the summary is last
    return rc, captured.out.strip().splitlines()[-1], captured.err


def test_poison_shards_fail_after_max_attempts_and_a_rerun_retries_only_them(
        ray_cluster, tiny_checkpoint, tmp_path, monkeypatch, capsys, tally):
    # shard 1 raises while rendering, shard 2 kills its worker process: on every attempt
    data = write_prompts(tmp_path / "prompts.parquet", n=16,
                         prompts={5: "POISON-RAISE a house", 10: "POISON-EXIT a house"})
    rules = [{"match": "POISON-RAISE", "action": "raise"}, {"match": "POISON-EXIT", "action": "exit"}]
    trace = set_faults(monkeypatch, tmp_path, rules=rules)
    config = tmp_path / "cfg.yaml"
    config.write_text("{}\n")
    args = overrides(tiny_checkpoint, data, tmp_path / "out", "poison", "workers.max_attempts=2")
    tally.runs += 1
    rc, out, err = _cli(config, args, capsys)
    assert rc == 1, err
    summary = json.loads(out)
    assert summary["shards_failed"] == 2 and summary["totals"]["failed_shards"] == 2
    assert "shard f00000-000001 failed after 2 attempts: worker_error: RuntimeError: injected fault" in err
    assert "shard f00000-000002 failed after 2 attempts: worker_died" in err
    store = RunStore(str(tmp_path / "out"), "poison")
    rows = check_invariants(tally, store, {data: 16}, succeeded=False)
    by_shard = {}
    for r in rows:
        by_shard.setdefault(r["shard_id"], set()).add((r["status"], (r["reason"] or "").split(":")[0]))
    assert by_shard["f00000-000001"] == {("failed", "worker_error")}
    assert by_shard["f00000-000002"] == {("failed", "worker_died")}
    assert by_shard["f00000-000000"] == by_shard["f00000-000003"] == {("ok", "")}
    events = read_trace(trace)
    attempts = [e["shard"] for e in events if e["event"] == "shard"]
    assert attempts.count("f00000-000001") == 2 and attempts.count("f00000-000002") == 2
    exits = [e for e in events if e["event"] == "fault" and e["action"] == "exit"]
    assert len(exits) == 2 and not any(pid_alive(e["pid"]) for e in exits)
    tally.kills += len(exits)  # worker processes that died mid-shard
    check_resources_released()

    # the poison is gone (fixed input row, or a flaky node replaced): only the failed shards run
    (tmp_path / "rerun").mkdir()
    trace = set_faults(monkeypatch, tmp_path / "rerun")
    tally.runs += 1
    rc, out, err = _cli(config, args, capsys)
    assert rc == 0, err
    summary = json.loads(out)
    assert (summary["shards_skipped"], summary["shards_committed"], summary["shards_failed"]) == (2, 2, 0)
    rerun_shards = sorted(e["shard"] for e in read_trace(trace) if e["event"] == "shard")
    assert rerun_shards == ["f00000-000001", "f00000-000002"]
    rows = check_invariants(tally, store, {data: 16})
    assert all(r["status"] == "ok" for r in rows)
    check_resources_released()
    check_rerun_renders_nothing(tally, make_cfg(tiny_checkpoint, data, tmp_path / "out", "poison"), store, trace)


def test_nonfinite_output_fails_the_row_and_writes_no_image(ray_cluster, tiny_checkpoint, tmp_path, monkeypatch,
                                                           tally):
    data = write_prompts(tmp_path / "prompts.parquet", n=8, prompts={2: "NANROW a house", 5: "NANROW again"})
    set_faults(monkeypatch, tmp_path, rules=[{"match": "NANROW", "action": "nan"}])
    cfg = make_cfg(tiny_checkpoint, data, tmp_path / "out", "nan", "workers.num_workers=1")
    outcome = tally.run(cfg, out=io.StringIO())
    assert outcome.exit_code == 0
    store = RunStore(str(tmp_path / "out"), "nan")
    rows = check_invariants(tally, store, {data: 8})
    failed = [r for r in rows if r["status"] == "failed"]
    assert [(r["id"], r["reason"], r["key"], r["bytes"]) for r in failed] == [
        ("item-002", "nonfinite_output", None, None), ("item-005", "nonfinite_output", None, None)]
    assert sum(r["status"] == "ok" for r in rows) == 6
    images = {p.name for p in (tmp_path / "out" / "nan" / "images").rglob("*.png")}
    assert len(images) == 6 and not images & {"item-002.png", "item-005.png"}
    check_resources_released()


def test_out_of_memory_batches_are_split_and_single_rows_fail(ray_cluster, tiny_checkpoint, tmp_path, monkeypatch,
                                                              tally):
    data = write_prompts(tmp_path / "prompts.parquet", n=8, prompts={6: "OOMROW a huge house"})
    rules = [{"match": "", "action": "oom", "batch_over": 1},  # any batch of more than one row
             {"match": "OOMROW", "action": "oom"}]  # this row even alone
    trace = set_faults(monkeypatch, tmp_path, rules=rules)
    cfg = make_cfg(tiny_checkpoint, data, tmp_path / "out", "oom", "render.batch_size=4",
                   "dataset.shard_size=8", "workers.num_workers=1")
    outcome = tally.run(cfg, out=io.StringIO())
    assert outcome.exit_code == 0 and outcome.workers_replaced == 0
    store = RunStore(str(tmp_path / "out"), "oom")
    rows = check_invariants(tally, store, {data: 8})
    assert [(r["id"], r["status"], r["reason"]) for r in rows if r["status"] != "ok"] == [
        ("item-006", "failed", "out_of_memory")]
    # the worker kept working: one worker, never replaced, rendered every other row one at a time
    assert {r["worker_id"] for r in rows} == {"w00.0"}
    events = read_trace(trace)
    assert sum(e["event"] == "fault" and e["action"] == "oom" for e in events) >= 3
    assert all(len(e["rows"]) == 1 for e in events if e["event"] == "rendered")
    assert sum(len(e["rows"]) for e in events if e["event"] == "rendered") == 7
    check_resources_released()
