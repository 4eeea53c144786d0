"""WorkerPool and ShardQueue without Ray: a scripted backend plays the workers."""
import pytest

from cogview_ray.pool import (Done, Errored, Loaded, Lost, ResultLost, SlotState, TaskFailed, WorkerDied,
                              WorkerPool, WorkersExhausted, is_deterministic_load_error)
from cogview_ray.shard_queue import ShardQueue, Task
from cogview_ray.shards import Shard


def shard(i: int, rows: int = 4) -> Shard:
    return Shard(shard_id=f"f00000-{i:06d}", file="p.parquet", file_index=0, row_start=i * rows,
                 row_stop=(i + 1) * rows)


class FakeBackend:
    """Workers whose calls finish when the test says so: `finish(ref, value or exception)`."""

    def __init__(self):
        self.outcomes, self.started, self.killed, self.calls, self.settled = {}, [], [], [], set()
        self._n = 0

    def _ref(self, what):
        self._n += 1
        ref = (what, self._n)
        self.calls.append(ref)
        return ref

    def start(self, worker_id):
        self.started.append(worker_id)
        return worker_id

    def info(self, actor):
        return self._ref(("info", actor))

    def render(self, actor, task):
        return self._ref(("render", actor, task.shard.shard_id, task.attempt))

    def finish(self, ref, outcome):
        self.outcomes[ref] = outcome
        self.settled.add(ref)

    def wait(self, refs, timeout_s):
        return [r for r in refs if r in self.outcomes][:1]

    def get(self, ref):
        out = self.outcomes.pop(ref)
        if isinstance(out, Exception):
            raise out
        return out

    def kill(self, actor):
        self.killed.append(actor)

    def pending(self, kind):
        return [r for r in self.calls if r[0][0] == kind and r not in self.settled]


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def make_pool(size=2, max_in_flight=2, timeout=60.0, max_replacements=3):
    backend, clock = FakeBackend(), Clock()
    pool = WorkerPool(backend, size, max_in_flight=max_in_flight, shard_timeout_s=timeout,
                      max_replacements=max_replacements, clock=clock)
    return pool, backend, clock


def load_all(pool, backend):
    for ref in backend.pending("info"):
        backend.finish(ref, {"worker_id": ref[0][1]})
    events = []
    for _ in range(len(pool.slots)):
        events += pool.poll(0)
    assert all(s.state is SlotState.READY for s in pool.slots)
    return events


def test_queue_charged_failures_go_back_and_run_out():
    q = ShardQueue([shard(0), shard(1)], max_attempts=2)
    t = q.pop()
    assert (t.shard.shard_id, t.attempt) == ("f00000-000000", 1)
    assert q.requeue(t, charged=True)
    assert [q.pop().shard.shard_id, q.pop().shard.shard_id] == ["f00000-000001", "f00000-000000"]
    assert q.requeue(Task(shard(0), 2), charged=True) is False  # second failure of two allowed
    assert not q and q.failures("f00000-000000") == 2


def test_queue_uncharged_requeue_goes_first_and_keeps_attempt():
    q = ShardQueue([shard(0), shard(1), shard(2)], max_attempts=3)
    t = q.pop()
    assert q.requeue(t, charged=False)
    again = q.pop()
    assert (again.shard.shard_id, again.attempt) == ("f00000-000000", 1)
    assert q.rows == 8


def test_no_shards_before_a_worker_has_loaded():
    pool, backend, _ = make_pool()
    q = ShardQueue([shard(i) for i in range(5)], max_attempts=3)
    pool.submit(q)
    assert len(q) == 5 and not backend.pending("render")
    events = load_all(pool, backend)
    assert sorted(type(e).__name__ for e in events) == ["Loaded", "Loaded"]
    pool.submit(q)
    assert len(q) == 1 and len(backend.pending("render")) == 4  # 2 workers x max_in_flight 2
    assert (pool.ready, pool.loading, pool.in_flight) == (2, 0, 4)


def test_done_and_errored_events_carry_the_task():
    pool, backend, _ = make_pool(size=1, max_in_flight=2)
    load_all(pool, backend)
    q = ShardQueue([shard(0), shard(1)], max_attempts=3)
    pool.submit(q)
    first, second = backend.pending("render")
    backend.finish(first, "result-0")
    (event,) = pool.poll(0)
    assert isinstance(event, Done) and event.result == "result-0" and event.task.shard.shard_id == "f00000-000000"
    backend.finish(second, TaskFailed("RuntimeError: boom"))
    (event,) = pool.poll(0)
    assert isinstance(event, Errored) and (event.reason, event.error) == ("worker_error", "RuntimeError: boom")
    assert event.task.shard.shard_id == "f00000-000001" and pool.alive == 1 and pool.in_flight == 0


@pytest.mark.parametrize("error,reason", [(WorkerDied("gone"), "worker_died"), (ResultLost("lost"), "worker_lost")])
def test_a_lost_worker_charges_only_its_running_shard(error, reason):
    pool, backend, _ = make_pool(size=1, max_in_flight=3)
    load_all(pool, backend)
    q = ShardQueue([shard(i) for i in range(3)], max_attempts=3)
    pool.submit(q)
    refs = backend.pending("render")
    backend.finish(refs[1], error)  # any of its refs reports the death
    (event,) = pool.poll(0)
    assert isinstance(event, Lost) and event.reason == reason and event.ever_loaded
    assert event.running.shard.shard_id == "f00000-000000"
    assert [t.shard.shard_id for t in event.queued] == ["f00000-000001", "f00000-000002"]
    assert pool.alive == 0 and backend.killed == ["w00.0"]
    assert pool.replace_dead() == ["w00.1"] and pool.slots[0].state is SlotState.LOADING


def test_a_shard_past_its_timeout_loses_the_worker():
    pool, backend, clock = make_pool(size=1, timeout=10.0)
    load_all(pool, backend)
    pool.submit(ShardQueue([shard(0)], max_attempts=3))
    clock.t += 5
    assert pool.poll(0) == []
    clock.t += 6
    (event,) = pool.poll(0)
    assert isinstance(event, Lost) and event.reason == "timeout" and "10s" in event.error
    assert event.running.shard.shard_id == "f00000-000000"


def test_the_timeout_clock_restarts_for_each_shard_in_turn():
    pool, backend, clock = make_pool(size=1, max_in_flight=2, timeout=10.0)
    load_all(pool, backend)
    pool.submit(ShardQueue([shard(0), shard(1)], max_attempts=3))
    first, _ = backend.pending("render")
    clock.t += 9
    backend.finish(first, "r0")
    assert [type(e) for e in pool.poll(0)] == [Done]
    clock.t += 9  # the second shard has run 9 s, not 18
    assert pool.poll(0) == []


def test_a_worker_that_cannot_load_is_lost_as_never_loaded():
    pool, backend, _ = make_pool(size=2)
    a, b = backend.pending("info")
    backend.finish(a, WorkerDied("CheckpointError: bad weights"))
    (event,) = pool.poll(0)
    assert isinstance(event, Lost) and not event.ever_loaded and "could not start" in event.error
    assert event.running is None and pool.alive == 1 and event.fatal
    backend.finish(b, WorkerDied("The actor died unexpectedly before finishing this task.\n\tip: 10.0.0.7"))
    (event,) = pool.poll(0)
    assert not event.fatal and pool.last_load_error.startswith("w01.0 could not start: The actor died")


@pytest.mark.parametrize("error,fatal", [
    ("cogview_ray.model.loading.CheckpointError: /m is not a diffusers checkpoint folder", True),
    ("ConfigError: render.height and render.width (65x64) must be multiples of 16 px", True),
    ("OSError: [Errno 28] No space left on device", False),
    ("The actor died because its node has died. Node Id: 1f3a", False),
    ("RuntimeError: no CheckpointErrors here", False),
])
def test_only_checkpoint_and_config_errors_are_deterministic(error, fatal):
    assert is_deterministic_load_error(error) is fatal


def test_replacements_are_capped():
    pool, backend, _ = make_pool(size=1, max_replacements=1)
    for _ in range(2):
        (ref,) = backend.pending("info")
        backend.finish(ref, WorkerDied("x"))
        pool.poll(0)
        if pool.replacements == 1:
            with pytest.raises(WorkersExhausted, match="lost 2 times"):
                pool.replace_dead()
            return
        pool.replace_dead()
    raise AssertionError("the cap was never reached")


def test_shutdown_kills_every_worker():
    pool, backend, _ = make_pool(size=3)
    with pool:
        load_all(pool, backend)
    assert sorted(backend.killed) == ["w00.0", "w01.0", "w02.0"] and pool.alive == 0
    assert isinstance(Loaded("w", {}), Loaded)


def test_work_starts_with_the_first_ready_worker_and_a_late_one_takes_its_own_block():
    pool, backend, _ = make_pool(size=2, max_in_flight=2)
    q = ShardQueue([shard(i) for i in range(8)], max_attempts=3)
    a, b = backend.pending("info")
    backend.finish(a, {"worker_id": "w00.0"})
    pool.poll(0)
    pool.submit(q)  # w01.0 is still pending (no resources): w00.0 starts anyway
    assert [r[0][2] for r in backend.pending("render")] == ["f00000-000000", "f00000-000001"]
    assert (pool.ready, pool.loading, pool.starved_s()) == (1, 1, 0.0)
    backend.finish(b, {"worker_id": "w01.0"})  # its node joined
    pool.poll(0)
    pool.submit(q)
    # the late worker starts in the middle of what is left, not right behind w00.0
    late = [r[0][2] for r in backend.pending("render") if r[0][1] == "w01.0"]
    assert late == ["f00000-000005", "f00000-000006"]


def test_grow_adds_slots_and_never_shrinks():
    pool, backend, _ = make_pool(size=1)
    assert pool.grow(3) == ["w01.0", "w02.0"] and len(backend.pending("info")) == 3
    assert pool.grow(2) == [] and len(pool.slots) == 3 and pool.loading == 3


def test_starved_counts_from_the_start_and_from_the_last_ready_worker_lost():
    pool, backend, clock = make_pool(size=2)
    clock.t += 30
    assert pool.starved_s() == 30 and not pool.ever_ready  # pending workers are not failures
    a, b = backend.pending("info")
    backend.finish(a, {"worker_id": "w00.0"})
    pool.poll(0)
    assert pool.starved_s() == 0 and pool.ever_ready
    pool.submit(ShardQueue([shard(0)], max_attempts=3))
    (ref,) = backend.pending("render")
    backend.finish(ref, WorkerDied("node lost"))
    clock.t += 7
    pool.poll(0)
    clock.t += 5
    assert pool.starved_s() == 5 and pool.loading == 1  # w01.0 still waits for resources
