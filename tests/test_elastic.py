"""Elastic workers and metrics on a real local Ray cluster: the head has room for one worker, a
second node joins mid-run and its worker takes shards; the run verifies exactly once, and the
head's Prometheus endpoint shows the run's counters moving."""
import re
import socket
import threading
import time
import urllib.request

import pytest

from cogview_ray.driver import Driver
from cogview_ray.manifest import read_manifest
from cogview_ray.metrics import exported_name
from cogview_ray.storage import RunStore
from cogview_ray.verify import verify_run
from tests.reliability import make_cfg, read_trace, set_faults, write_prompts

pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]

ROWS = 40
SHARDS = 20  # of 2 rows; 3 s a shard keeps the first worker alone busy for a minute while the second node starts


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int) -> str:
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    except OSError:
        return ""


def _sample(text: str, name: str, **labels) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    total = 0.0
    for m in re.finditer(rf"^{re.escape(name)}\{{([^}}]*)\}} (\S+)$", text, re.M):
        have = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        if all(have.get(k) == v for k, v in labels.items()):
            total += float(m.group(2))
    return total


def _until(check, timeout_s: float, what: str):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def one_worker_cluster():
    """A head with one CPU (one worker's worth) and a known metrics port; `add_node` adds a second."""
    import ray
    from ray.cluster_utils import Cluster

    port = _free_port()
    cluster = Cluster(initialize_head=True, head_node_args=dict(
        num_cpus=1, metrics_export_port=port, include_dashboard=False,
        _system_config={"metrics_report_interval_ms": 2000}))  # exports every 2 s, not 10
    ray.init(address=cluster.address, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    try:
        yield cluster, port
    finally:
        ray.shutdown()
        cluster.shutdown()


def test_a_node_joining_mid_run_gets_work_and_the_metrics_move(one_worker_cluster, tiny_checkpoint, tmp_path,
                                                                monkeypatch):
    cluster, port = one_worker_cluster
    run_id = "elastic"
    rows_ok = exported_name("cogview_rows")
    before = _sample(_scrape(port), rows_ok, run_id=run_id, status="ok")
    data = write_prompts(tmp_path / "prompts.parquet", n=ROWS)
    trace = set_faults(monkeypatch, tmp_path, [{"action": "slow", "scope": "shard", "seconds": 3.0}])
    cfg = make_cfg(tiny_checkpoint, data, tmp_path / "out", run_id, "workers.num_workers=2",
                   "workers.startup_timeout_s=120", f"dataset.shard_size={ROWS // SHARDS}")
    outcome, errors = [], []

    def run():
        try:
            outcome.append(Driver(cfg).run())
        except BaseException as e:  # reported by the assertion below
            errors.append(e)

    driver = threading.Thread(target=run, daemon=True)
    driver.start()
    # the run is under way on the head's one worker; w01.0 waits for resources, not failed
    _until(lambda: any(e["event"] == "shard" for e in read_trace(trace)) or errors, 90, "the first shard")
    assert not errors, errors
    cluster.add_node(num_cpus=1, metrics_export_port=_free_port())
    # a worker's gauge lives while its process does (Ray ages a dead process's series out after
    # two export intervals), so it is read while the run is under way
    gauge = exported_name("cogview_worker_device_memory_bytes")
    memory, deadline = 0.0, time.time() + 150
    while driver.is_alive() and time.time() < deadline:
        memory = max(memory, _sample(_scrape(port), gauge, run_id=run_id, worker_id="w00.0", device="cpu"))
        driver.join(timeout=0.5)
    assert not driver.is_alive() and not errors, errors
    assert outcome[0].exit_code == 0

    store = RunStore(str(tmp_path / "out"), run_id)
    table = read_manifest(store).to_pylist()
    assert sorted(r["row_index"] for r in table) == list(range(ROWS))  # exactly once
    by_worker = {w: sum(r["worker_id"] == w for r in table) for w in ("w00.0", "w01.0")}
    assert by_worker["w00.0"] > 0 and by_worker["w01.0"] > 0, by_worker
    report = verify_run(store.url(""), None)
    assert report.verified, report.summary()

    # the driver's counters reach the head's metrics agent within a few export intervals
    ok_rows = sum(r["status"] == "ok" for r in table)
    _until(lambda: _sample(_scrape(port), rows_ok, run_id=run_id, status="ok") - before == ok_rows, 30,
           f"{rows_ok} to reach {ok_rows}")
    text = _scrape(port)
    assert _sample(text, exported_name("cogview_shards"), run_id=run_id, status="ok") == SHARDS
    assert _sample(text, exported_name("cogview_shard_latency_seconds") + "_count", run_id=run_id) == SHARDS
    assert _sample(text, exported_name("cogview_rows_queued"), run_id=run_id) == 0
    # w00.0 runs on the head: its device-memory gauge was exported there during the run
    assert memory > 10 * 2**20  # a torch process's peak resident set: tens of MiB at least
