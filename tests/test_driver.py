"""The driver's handling of pool events, without Ray: retries, failed commits, fail-fast loads."""
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cogview_ray.config import load_config
from cogview_ray.commits import RunOutcome
from cogview_ray.driver import Driver, resolve_num_workers
from cogview_ray.errors import RunError
from cogview_ray.pool import Errored, Lost, WorkerDied, WorkerPool
from cogview_ray.progress import Progress
from cogview_ray.shard_queue import ShardQueue, Task
from cogview_ray.shards import plan_shards
from cogview_ray.stats import RunStats

pytestmark = pytest.mark.timeout(120)


class FakeCommitter:
    def __init__(self):
        self.failed, self.stats = [], RunStats()

    def commit_failed(self, shard, rows, attempts, reason, error):
        self.failed.append((shard.shard_id, None if rows is None else len(rows), attempts, reason, error))


class FakeProgress:
    def __init__(self):
        self.rows = 0

    def advance(self, n, ok):
        self.rows += n


@pytest.fixture
def setup(tmp_path):
    pq.write_table(pa.table({"prompt": [f"p{i}" for i in range(8)]}), str(tmp_path / "p.parquet"))
    cfg = load_config(None, [f"dataset.uri={tmp_path}/p.parquet", "dataset.shard_size=4", "model.path=x",
                             f"output.uri={tmp_path}/out", "workers.max_attempts=2"])
    shards, _ = plan_shards(cfg.dataset, None)
    out = []
    driver = Driver(cfg, out=type("W", (), {"write": lambda self, s: out.append(s), "flush": lambda self: None})())
    return driver, shards, FakeCommitter(), FakeProgress(), out


def test_changed_input_fails_the_shard_at_once_without_reading_it(setup):
    driver, shards, committer, progress, out = setup
    queue = ShardQueue(shards[1:], max_attempts=2)
    driver._handle(Errored("w00.0", Task(shards[0], 1), "input_changed", "InputChanged: p.parquet changed"),
                   queue, committer, progress)
    assert committer.failed == [("f00000-000000", None, 1, "input_changed", "InputChanged: p.parquet changed")]
    assert len(queue) == 1 and progress.rows == 4  # not requeued
    assert any("p.parquet changed" in line for line in out)


def test_errors_are_retried_then_committed_failed_with_the_rows(setup):
    driver, shards, committer, progress, _ = setup
    queue = ShardQueue(shards, max_attempts=2)
    task = queue.pop()
    driver._handle(Errored("w00.0", task, "worker_error", "RuntimeError: boom"), queue, committer, progress)
    assert committer.failed == [] and len(queue) == 2
    queue.pop()  # the other shard
    again = queue.pop()
    assert (again.shard.shard_id, again.attempt) == ("f00000-000000", 2)
    driver._handle(Errored("w00.0", again, "worker_error", "RuntimeError: boom"), queue, committer, progress)
    assert committer.failed == [("f00000-000000", 4, 2, "worker_error", "RuntimeError: boom")]
    assert committer.stats.events["shard_attempts_failed"] == 2


def test_a_lost_worker_charges_its_running_shard_only(setup):
    driver, shards, committer, progress, _ = setup
    queue = ShardQueue([], max_attempts=2)
    lost = Lost("w00.1", "worker_died", "gone", Task(shards[0], 1), [Task(shards[1], 1)], ever_loaded=True)
    driver._handle(lost, queue, committer, progress)
    assert [queue.pop().shard.shard_id, queue.pop().shard.shard_id] == ["f00000-000001", "f00000-000000"]
    assert queue.failures("f00000-000000") == 1 and queue.failures("f00000-000001") == 0


def test_a_deterministic_load_failure_fails_the_run_but_a_lost_loading_worker_does_not(setup):
    driver, _, committer, progress, out = setup
    queue = ShardQueue([], max_attempts=2)
    with pytest.raises(RunError, match="worker w00.0 could not start: CheckpointError: bad"):
        driver._handle(Lost("w00.0", "worker_died", "could not start: CheckpointError: bad", None, [], False,
                            fatal=True), queue, committer, progress)
    # a node lost while its first worker loaded: replaced, not fatal (generation 0 or not)
    driver._handle(Lost("w01.0", "worker_died", "could not start: node died", None, [], False),
                   queue, committer, progress)
    assert committer.stats.events["workers_lost"] == 1
    assert any("w01.0 could not start: node died; starting another" in line for line in out)


# -- the dispatch loop against a scripted cluster (no Ray) --------------------------------------


class Result:
    def __init__(self, task, worker):
        self.task, self.worker_id = task, worker

    def counts(self):
        return {"ok": self.task.shard.num_rows, "failed": 0, "rejected": 0}


class Cluster:
    """A scripted Ray: `capacity(t)` workers fit at time t; a worker loads once it fits (in start
    order), a shard renders in a second; a wait with nothing to return moves the clock by its timeout."""

    def __init__(self, capacity=lambda t: 1, load_errors=None):
        self.t, self.capacity, self.load_errors = 0.0, capacity, dict(load_errors or {})
        self.running, self.killed, self.results, self._n = [], [], {}, 0

    def clock(self):
        return self.t

    def start(self, worker_id):
        return worker_id

    def info(self, actor):
        return ("info", actor)

    def render(self, actor, task):
        self._n += 1
        ref = ("render", actor, self._n)
        self.results[ref] = Result(task, actor)
        return ref

    def wait(self, refs, timeout_s):
        for ref in refs:  # load one worker that fits
            if ref[0] == "info" and len([a for a in self.running if a not in self.killed]) < self.capacity(self.t):
                self.running.append(ref[1])
                return [ref]
        for ref in refs:
            if ref[0] == "render":
                self.t += 1.0  # a shard takes a second
                return [ref]
        self.t += timeout_s
        return []

    def get(self, ref):
        if ref[0] == "info":
            if ref[1] in self.load_errors:
                raise WorkerDied(self.load_errors.pop(ref[1]))
            return {"worker_id": ref[1], "node": "n", "device": "cpu", "load_s": 0.0, "compile_s": 0.0}
        return self.results.pop(ref)

    def kill(self, actor):
        self.killed.append(actor)


class LoopCommitter(FakeCommitter):
    def __init__(self):
        super().__init__()
        self.committed, self.outcome = [], RunOutcome("r", "u", 0, 0)

    def commit(self, shard, result):
        self.committed.append((shard.shard_id, result.worker_id))
        self.outcome.shards_committed += 1


def loop(tmp_path, cluster, *extra, n_shards=12, resources=lambda: {"CPU": 1.0}):
    pq.write_table(pa.table({"prompt": [f"p{i}" for i in range(4 * n_shards)]}), str(tmp_path / "p.parquet"))
    cfg = load_config(None, [f"dataset.uri={tmp_path}/p.parquet", "dataset.shard_size=4", "model.path=x",
                             f"output.uri={tmp_path}/out", "workers.max_in_flight=1", *extra])
    shards, _ = plan_shards(cfg.dataset, None)
    out = []
    driver = Driver(cfg, out=type("W", (), {"write": lambda self, s: out.append(s), "flush": lambda self: None})())
    driver.lock = type("L", (), {"check": lambda self, read=False: None})()
    queue, committer = ShardQueue(shards, cfg.workers.max_attempts), LoopCommitter()
    size = min(resolve_num_workers(cfg, resources()), len(queue))
    pool = WorkerPool(cluster, size, max_in_flight=1, shard_timeout_s=600, max_replacements=8, clock=cluster.clock)
    progress = Progress(total_rows=queue.rows, workers=size, out=driver.out, clock=cluster.clock)
    driver._loop(pool, queue, committer, progress, resources, resize_every_s=2.0)
    return pool, committer, "".join(out)


def test_dispatch_starts_with_one_worker_and_a_late_node_adds_the_second(tmp_path):
    cluster = Cluster(capacity=lambda t: 1 if t < 3 else 2)
    pool, committer, out = loop(tmp_path, cluster, "workers.num_workers=2")
    by_worker = Counter(w for _, w in committer.committed)
    assert sorted(s for s, _ in committer.committed) == [f"f00000-{i:06d}" for i in range(12)]  # once each
    assert by_worker["w00.0"] >= 1 and by_worker["w01.0"] >= 1 and sum(by_worker.values()) == 12
    assert cluster.t >= 3  # w01.0 waited for the node: pending was not a failure
    assert "could not" not in out


def test_auto_follows_the_cluster_as_it_grows(tmp_path):
    cluster = Cluster(capacity=lambda t: 1 if t < 3 else 3)
    resources = lambda: {"CPU": 2.0} if cluster.t < 3 else {"CPU": 4.0}  # one spare core, then three
    pool, committer, out = loop(tmp_path, cluster, "workers.num_workers=auto", resources=resources, n_shards=30)
    assert [s.worker_id for s in pool.slots] == ["w00.0", "w01.0", "w02.0"]
    assert "the cluster grew: starting worker(s) w01.0, w02.0" in out
    assert {w for _, w in committer.committed} == {"w00.0", "w01.0", "w02.0"}
    assert len(committer.committed) == 30


def test_a_worker_lost_while_loading_is_replaced_and_the_run_goes_on(tmp_path):
    cluster = Cluster(capacity=lambda t: 1, load_errors={"w00.0": "The actor died because its node has died."})
    pool, committer, out = loop(tmp_path, cluster, "workers.num_workers=1", n_shards=3)
    assert {w for _, w in committer.committed} == {"w00.1"} and len(committer.committed) == 3
    assert committer.stats.events["workers_replaced"] == 1 and "replace a lost one" in out


def test_no_worker_within_the_startup_timeout_fails_with_one_sentence(tmp_path):
    cluster = Cluster(capacity=lambda t: 0, load_errors={})
    with pytest.raises(RunError) as e:
        loop(tmp_path, cluster, "workers.num_workers=2", "workers.startup_timeout_s=30",
             resources=lambda: {"CPU": 1.0})
    assert str(e.value) == ("no worker could load within workers.startup_timeout_s=30s: 2 worker(s) still "
                            "waiting for resources (each needs 1 CPU, 1 GPU; the cluster has {'CPU': 1.0}).")
    assert 30 < cluster.t <= 32  # not before the timeout, and not long after


def test_the_startup_timeout_names_the_last_load_failure(tmp_path):
    cluster = Cluster(load_errors={"w00.0": "node died"})
    cluster.capacity = lambda t: 0 if cluster.running else 1  # its node never comes back
    with pytest.raises(RunError, match=r"w00.0 could not start: node died\.$"):
        loop(tmp_path, cluster, "workers.num_workers=1", "workers.startup_timeout_s=10")
