"""`ShardQueue`: the shards left to render, how often each has failed, and the retry rule.

No Ray and no I/O: the driver feeds it what the worker pool reports.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Iterable

from .shards import Shard


@dataclass
class Task:
    """One attempt at one shard, as handed to a worker."""

    shard: Shard
    attempt: int  # 1 for the first try; failed (charged) attempts before it + 1
    submitted_at: float = 0.0  # unix seconds; set by whoever submits it


class ShardQueue:
    """Shards in planning order; a charged failure sends a shard to the back, an uncharged one
    (it only waited behind a failure) to the front, so it runs next."""

    def __init__(self, shards: Iterable[Shard], max_attempts: int):
        self.max_attempts = max_attempts
        self._todo: deque[Shard] = deque(shards)
        self._failures: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._todo)

    def __bool__(self) -> bool:
        return bool(self._todo)

    @property
    def rows(self) -> int:
        return sum(s.num_rows for s in self._todo)

    def pop(self) -> Task:
        shard = self._todo.popleft()
        return Task(shard, self._failures.get(shard.shard_id, 0) + 1)

    def requeue(self, task: Task, charged: bool) -> bool:
        """Put a shard back; False (and not queued) once its charged failures reach max_attempts."""
        if not charged:
            self._todo.appendleft(task.shard)
            return True
        n = self._failures[task.shard.shard_id] = self._failures.get(task.shard.shard_id, 0) + 1
        if n >= self.max_attempts:
            return False
        self._todo.append(task.shard)
        return True

    def failures(self, shard_id: str) -> int:
        return self._failures.get(shard_id, 0)
