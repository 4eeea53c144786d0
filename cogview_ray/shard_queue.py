"""`ShardQueue`: the shards left to render, how often each has failed, the retry rule, and which
shard each worker gets next (consecutive shards per worker, so Parquet pages are read about once).

No Ray and no I/O: the driver feeds it what the worker pool reports.
"""
from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass
from typing import Hashable, Iterable, Optional

from .shards import Shard


@dataclass
class Task:
    """One attempt at one shard, as handed to a worker."""

    shard: Shard
    attempt: int  # 1 for the first try; failed (charged) attempts before it + 1
    submitted_at: float = 0.0  # unix seconds; set by whoever submits it


class ShardQueue:
    """Shards in planning order, dealt so that each worker walks forward through its own block.

    A Parquet data page holds ~20k short prompts, many shards' worth, and a worker keeps the pages
    it decoded last (pages.py): dealt round robin, 8 workers would each read every page. So
    `pop(worker)` gives a worker the successor (same file) of the shard it got last while that is
    queued; otherwise it splits the longest run of consecutive queued shards and takes the start
    of its second half (the start itself when no worker is walking into the run: the very first
    pop takes the first shard). Workers thus start far apart and meet only at block ends.

    A charged failure sends a shard to the back (after every fresh shard), an uncharged one (it
    only waited behind a failure) to the front, so whichever worker asks next runs it. `pop()`
    without a worker takes the front shard in planning order, as a plain FIFO queue would.
    Every pop is O(log n): runs live in dicts by their ends, heaps find the longest and the first.
    """

    def __init__(self, shards: Iterable[Shard], max_attempts: int):
        self.max_attempts = max_attempts
        self._order: list[Shard] = list(shards)
        self._index: dict[str, int] = {s.shard_id: i for i, s in enumerate(self._order)}
        self._failures: dict[str, int] = {}
        self._front: deque[Shard] = deque()  # uncharged requeues: taken next, by anyone
        self._back: deque[Shard] = deque()  # charged requeues: taken once no fresh shard is left
        # fresh shards still queued, as runs [start, stop) of planning-order indices
        self._stop_of: dict[int, int] = {}
        self._longest: list[tuple[int, int, int]] = []  # (-length, start, stop); stale entries skipped
        self._starts: list[int] = []  # run starts, for FIFO pops; stale entries skipped
        self._fresh = len(self._order)
        self._rows = sum(s.num_rows for s in self._order)
        self._last: dict[Hashable, int] = {}  # worker -> index of the shard it got last
        self._walker: dict[int, Hashable] = {}  # that index -> the worker, to see who walks into a run
        if self._order:
            self._add_run(0, len(self._order))

    def __len__(self) -> int:
        return self._fresh + len(self._front) + len(self._back)

    def __bool__(self) -> bool:
        return len(self) > 0

    @property
    def rows(self) -> int:
        return self._rows

    def pop(self, worker: Optional[Hashable] = None) -> Task:
        """The next task for `worker` (any hashable id of a worker slot; None: FIFO order).
        IndexError when empty."""
        if self._front:
            shard = self._front.popleft()
        elif self._fresh:
            shard = self._order[self._take_fresh(worker)]
        elif self._back:
            shard = self._back.popleft()
        else:
            raise IndexError("pop from an empty ShardQueue")
        self._rows -= shard.num_rows
        if worker is not None:
            self._walk(worker, self._index.get(shard.shard_id))
        return Task(shard, self._failures.get(shard.shard_id, 0) + 1)

    def requeue(self, task: Task, charged: bool) -> bool:
        """Put a shard back; False (and not queued) once its charged failures reach max_attempts."""
        if not charged:
            self._front.appendleft(task.shard)
            self._rows += task.shard.num_rows
            return True
        n = self._failures[task.shard.shard_id] = self._failures.get(task.shard.shard_id, 0) + 1
        if n >= self.max_attempts:
            return False
        self._back.append(task.shard)
        self._rows += task.shard.num_rows
        return True

    def failures(self, shard_id: str) -> int:
        return self._failures.get(shard_id, 0)

    # -- fresh shards: runs of consecutive indices ------------------------------------------------

    def _add_run(self, start: int, stop: int) -> None:
        if start < stop:
            self._stop_of[start] = stop
            heapq.heappush(self._longest, (start - stop, start, stop))
            heapq.heappush(self._starts, start)

    def _take_fresh(self, worker: Optional[Hashable]) -> int:
        """Remove one fresh index from its run and return it (see the class docstring)."""
        if worker is None:
            while self._starts[0] not in self._stop_of:
                heapq.heappop(self._starts)
            start = self._starts[0]
            return self._cut(start, self._stop_of[start], start)
        last = self._last.get(worker)
        if last is not None and last + 1 in self._stop_of \
                and self._order[last + 1].file == self._order[last].file:
            return self._cut(last + 1, self._stop_of[last + 1], last + 1)
        while True:
            _, start, stop = self._longest[0]
            if self._stop_of.get(start) == stop:
                break
            heapq.heappop(self._longest)
        walked_into = start > 0 and start - 1 in self._walker and self._order[start - 1].file == self._order[start].file
        return self._cut(start, stop, start + (stop - start) // 2 if walked_into else start)

    def _cut(self, start: int, stop: int, i: int) -> int:
        """Take index `i` out of the run [start, stop), leaving [start, i) and [i + 1, stop)."""
        del self._stop_of[start]
        self._fresh -= 1
        self._add_run(start, i)
        self._add_run(i + 1, stop)
        return i

    def _walk(self, worker: Hashable, index: Optional[int]) -> None:
        """Record that `worker` got the shard at `index` (None: a shard from outside the plan)."""
        old = self._last.pop(worker, None)
        if old is not None and self._walker.get(old) == worker:
            del self._walker[old]
        if index is not None:
            self._last[worker] = index
            self._walker[index] = worker
