"""Storage faults on a real local Ray cluster (issue 4, fault 4): transient errors, throttling and
timeouts on reads and writes in the driver and every worker are retried and the run completes;
a persistent failure stops the run with one clear sentence, and a later resume finishes.

Output goes to `faulty://` (cogview_ray.testing.FaultyFileSystem): a local folder with
object-store semantics whose failures are configured through COGVIEW_RAY_FAULTS, so they reach
every process (fsspec filesystems are instantiated per process)."""
import io
import os
from collections import Counter

import pytest

pytest.register_assert_rewrite("tests.reliability")

from cogview_ray.cli import main as cli_main  # noqa: E402
from cogview_ray.storage import RunStore  # noqa: E402
from cogview_ray.testing import ENV, FaultSpecError, FaultyFileSystem  # noqa: E402
from tests.reliability import (  # noqa: E402, F401 (tally is a fixture)
    check_invariants, check_rerun_renders_nothing, check_resources_released, make_cfg, overrides, read_trace,
    set_faults, tally, write_prompts)

pytest_plugins = ["tests.reliability"]
pytestmark = [pytest.mark.timeout(240)]


def test_faulty_filesystem_fails_as_configured(tmp_path, monkeypatch):
    set_faults(monkeypatch, tmp_path, storage={"every": 2, "ops": ["write", "read"]})
    fs = FaultyFileSystem()
    target = f"faulty://{tmp_path}/x/obj"
    outcomes = []
    for i in range(4):
        try:
            fs.pipe_file(target, b"v%d" % i)
            outcomes.append("ok")
        except (TimeoutError, ConnectionError, OSError) as e:
            outcomes.append(type(e).__name__)
    # every 2nd write fails; of those, one in two lands before its error (a lost response)
    assert outcomes == ["ok", "TimeoutError", "ok", "OSError"]
    assert fs.cat_file(target) == b"v2"  # the 4th write failed before storing anything
    with pytest.raises(FileExistsError):
        fs.pipe_file(target, b"again", mode="create")  # create-once, like a conditional PUT
    with pytest.raises(ConnectionError, match="SlowDown"):
        fs.cat_file(target)  # the 2nd read: throttled


@pytest.mark.parametrize("storage, message", [
    ({"evry": 2}, "storage has unknown key 'evry'"),
    ({"every": 2, "ops": ["write", "rename"]}, "'ops' has 'rename'"),
    ({"persistent_after": "2"}, "'persistent_after' must be an integer"),
])
def test_faulty_filesystem_refuses_a_malformed_storage_entry(tmp_path, monkeypatch, storage, message):
    # a typo must not leave the filesystem silently fault-free
    set_faults(monkeypatch, tmp_path, storage=storage)
    with pytest.raises(FaultSpecError, match=message):
        FaultyFileSystem().pipe_file(f"faulty://{tmp_path}/x/obj", b"v")
    assert not (tmp_path / "x" / "obj").exists()


@pytest.mark.ray
def test_transient_storage_errors_are_retried_and_the_run_completes(ray_cluster, tiny_checkpoint, tmp_path,
                                                                   monkeypatch, tally):
    data = write_prompts(tmp_path / "prompts.parquet", n=12)
    # every 2nd call of each operation (read, write, list, info, delete) fails, in every process
    trace = set_faults(monkeypatch, tmp_path, storage={"every": 2})
    out_uri = f"faulty://{tmp_path}/out"
    cfg = make_cfg(tiny_checkpoint, data, out_uri, "flaky")
    outcome = tally.run(cfg, out=io.StringIO())
    assert outcome.exit_code == 0 and outcome.workers_replaced == 0
    faults = [e for e in read_trace(trace) if e["event"] == "storage_fault"]
    by_pid = Counter(e["pid"] for e in faults)
    assert by_pid[os.getpid()] >= 5  # the driver's own reads and writes failed too
    assert len(by_pid) >= 2 and len(faults) >= 20  # ... and the workers'
    assert {e["op"] for e in faults} >= {"read", "write", "list", "info"}
    monkeypatch.delenv(ENV)
    store = RunStore(out_uri, "flaky")
    rows = check_invariants(tally, store, {data: 12})
    assert all(r["status"] == "ok" for r in rows)
    # nothing was committed twice or left half-written by a retried create-once
    assert sorted(store.list("commits")) == [f"f00000-00000{i}.json" for i in range(3)]
    check_resources_released()
    check_rerun_renders_nothing(tally, cfg, store)


@pytest.mark.ray
def test_persistent_storage_failure_stops_clearly_and_a_resume_finishes(ray_cluster, tiny_checkpoint, tmp_path,
                                                                        monkeypatch, capsys, tally):
    data = write_prompts(tmp_path / "prompts.parquet", n=16)  # 4 shards
    # after two manifest parts were written, every further manifest write fails
    set_faults(monkeypatch, tmp_path, storage={"persistent_after": 2, "ops": ["write"], "paths": ["/manifest/"]})
    out_uri = f"faulty://{tmp_path}/out"
    config = tmp_path / "cfg.yaml"
    config.write_text("{}\n")
    args = overrides(tiny_checkpoint, data, out_uri, "broken", "workers.num_workers=1")
    tally.runs += 1
    rc = cli_main(["render", str(config), *args])
    err = capsys.readouterr().err
    assert rc == 2
    assert "Traceback" not in err
    errors = [ln for ln in err.splitlines() if ln.startswith("cogview-ray: error:")]
    assert len(errors) == 1
    assert "/broken/manifest/f00000-" in errors[0] and "failed after 6 attempts" in errors[0]
    assert "injected persistent storage failure" in errors[0]
    assert errors[0].endswith("the 2 shard(s) committed so far are kept, rerun the same command to resume")
    check_resources_released()
    monkeypatch.setenv(ENV, "{}")  # no faults, but faulty:// stays known to the workers
    store = RunStore(out_uri, "broken")
    assert len(store.list("commits")) == 2
    check_invariants(tally, store, {data: 16}, complete=False)  # committed shards stay valid

    tally.runs += 1
    assert cli_main(["render", str(config), *args]) == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert '"shards_committed": 2' in summary and '"shards_skipped": 2' in summary
    check_invariants(tally, store, {data: 16})
    check_resources_released()
    check_rerun_renders_nothing(tally, make_cfg(tiny_checkpoint, data, out_uri, "broken"), store)
