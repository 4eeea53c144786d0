"""The driver's handling of pool events, without Ray: retries, failed commits, fail-fast loads."""
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cogview_ray.config import load_config
from cogview_ray.driver import Driver
from cogview_ray.errors import RunError
from cogview_ray.pool import Errored, Lost
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


def test_a_first_worker_that_cannot_load_fails_the_run_but_a_replacement_does_not(setup):
    driver, _, committer, progress, _ = setup
    queue = ShardQueue([], max_attempts=2)
    with pytest.raises(RunError, match="worker w00.0 could not start: CheckpointError: bad"):
        driver._handle(Lost("w00.0", "worker_died", "could not start: CheckpointError: bad", None, [], False),
                       queue, committer, progress)
    driver._handle(Lost("w00.3", "worker_died", "could not start: OSError: x", None, [], False),
                   queue, committer, progress)
    assert committer.stats.events["workers_lost"] == 1
