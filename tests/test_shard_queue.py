"""ShardQueue dealing: consecutive shards per worker, block starts far apart, retries as before."""
import random

import pytest

from cogview_ray.shard_queue import ShardQueue, Task
from cogview_ray.shards import Shard


def shard(i: int, file_index: int = 0, rows: int = 4) -> Shard:
    return Shard(shard_id=f"f{file_index:05d}-{i:06d}", file=f"p{file_index}.parquet", file_index=file_index,
                 row_start=i * rows, row_stop=(i + 1) * rows)


def number(task: Task) -> int:
    return int(task.shard.shard_id.split("-")[1])


def test_workers_start_far_apart_and_walk_forward():
    q = ShardQueue([shard(i) for i in range(16)], max_attempts=2)
    starts = [number(q.pop(w)) for w in range(4)]
    # the first takes the first shard; each next one the start of the longest run's second half
    assert starts == [0, 8, 4, 12]
    assert [number(q.pop(w)) for w in range(4)] == [1, 9, 5, 13]
    assert len(q) == 8 and q.rows == 32


def test_a_worker_whose_block_is_done_splits_the_longest_run():
    q = ShardQueue([shard(i) for i in range(10)], max_attempts=2)
    assert [number(q.pop("a")), number(q.pop("b"))] == [0, 5]
    assert [number(q.pop("b")) for _ in range(4)] == [6, 7, 8, 9]
    # b's block is done: the longest run is [1, 5), walked into by a, so b takes 1 + 4 // 2
    assert number(q.pop("b")) == 3
    assert [number(q.pop("a")) for _ in range(2)] == [1, 2]
    assert number(q.pop("a")) == 4  # its successor 3 is taken: the only run left
    assert not q


def test_the_successor_must_be_in_the_same_file():
    q = ShardQueue([shard(0, 0), shard(1, 0), shard(2, 1), shard(3, 1)], max_attempts=2)
    assert [q.pop("a").shard.shard_id, q.pop("a").shard.shard_id] == ["f00000-000000", "f00000-000001"]
    # shard 2 starts another file: not a's successor, and a run nobody walks into, so taken at its start
    assert q.pop("a").shard.shard_id == "f00001-000002"


def test_every_shard_once_and_few_jumps_when_workers_finish_at_random():
    n, workers = 2000, 8
    q = ShardQueue([shard(i) for i in range(n)], max_attempts=2)
    rng = random.Random(0)
    last, taken, jumps = {}, [], 0
    while q:
        w = rng.randrange(workers)
        i = number(q.pop(w))
        jumps += last.get(w, -2) + 1 != i
        last[w] = i
        taken.append(i)
    assert sorted(taken) == list(range(n))
    # each worker jumps when its block meets the next one: O(workers * log n), not O(n)
    assert jumps <= workers * 12, jumps


def test_uncharged_requeues_go_first_to_anyone_and_charged_ones_last():
    q = ShardQueue([shard(i) for i in range(6)], max_attempts=2)
    t0, t3 = q.pop("a"), q.pop("b")
    assert (number(t0), number(t3)) == (0, 3)
    assert q.requeue(t3, charged=False)
    again = q.pop("a")  # taken next by whoever asks, attempt unchanged
    assert (number(again), again.attempt) == (3, 1)
    assert q.requeue(t0, charged=True)
    assert [number(q.pop("a")) for _ in range(4)] == [4, 5, 1, 2]  # a walks on from 3
    retry = q.pop("b")
    assert (number(retry), retry.attempt) == (0, 2) and not q
    assert q.requeue(retry, charged=True) is False and q.failures("f00000-000000") == 2
    with pytest.raises(IndexError):
        q.pop("a")


def test_pop_without_a_worker_is_planning_order():
    q = ShardQueue([shard(i) for i in range(5)], max_attempts=3)
    assert number(q.pop("a")) == 0 and number(q.pop("b")) == 3
    assert [number(q.pop()) for _ in range(3)] == [1, 2, 4]
    # shards from outside the plan (requeued by a caller) are dealt too
    q.requeue(Task(shard(9), 1), charged=False)
    assert number(q.pop("a")) == 9 and q.rows == 0
