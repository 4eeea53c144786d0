"""`WorkerPool`: render workers in slots with an explicit state (loading, ready, dead), shards
handed to ready ones, and what one wait brought back as events (`Loaded`, `Done`, `Errored`,
`Lost`). Ray is reached only through a small backend, so the pool is testable without it.
"""
from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from .errors import first_line
from .shard_queue import ShardQueue, Task


class WorkerDied(Exception):
    """The worker process is gone (or never started): every shard it held fails."""


class TaskFailed(Exception):
    """The shard raised inside a live worker; the worker goes on. `reason`: the exception's own
    reason code where it has one (e.g. input_changed), else worker_error."""

    def __init__(self, message: str, reason: str = "worker_error"):
        super().__init__(message)
        self.reason = reason


class ResultLost(Exception):
    """The result is gone but the worker's state is unknown: treat the worker as lost."""


class WorkersExhausted(RuntimeError):
    """Workers were lost more often than the pool may replace them."""


# -- events --------------------------------------------------------------------------------


@dataclass
class Loaded:
    worker_id: str
    info: dict


@dataclass
class Done:
    worker_id: str
    task: Task
    result: Any


@dataclass
class Errored:
    """The running shard failed; `reason` is a code, `error` the detail."""

    worker_id: str
    task: Task
    reason: str
    error: str


@dataclass
class Lost:
    """A worker is gone. `running` (charged) was on it; `queued` (uncharged) waited behind it."""

    worker_id: str
    reason: str
    error: str
    running: Optional[Task]
    queued: list[Task]
    ever_loaded: bool  # False: it failed while loading its pipeline


Event = Loaded | Done | Errored | Lost


# -- slots ---------------------------------------------------------------------------------


class SlotState(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    DEAD = "dead"


@dataclass
class Slot:
    index: int
    generation: int
    actor: Any
    state: SlotState = SlotState.LOADING
    ready_ref: Any = None  # the pending `info()` call while LOADING
    inflight: dict = field(default_factory=dict)  # ref -> Task, in submission order (actors run in order)
    head_started: float = 0.0  # when the oldest in-flight shard started running

    @property
    def worker_id(self) -> str:
        return f"w{self.index:02d}.{self.generation}"


class WorkerPool:
    """`size` slots; `submit` fills ready workers from a queue, `poll` waits and reports events,
    `replace_dead` restarts lost workers (at most `max_replacements` over the pool's life)."""

    def __init__(self, backend: "Backend", size: int, *, max_in_flight: int, shard_timeout_s: float,
                 max_replacements: int, clock: Callable[[], float] = time.time):
        self.backend, self.max_in_flight, self.shard_timeout_s = backend, max_in_flight, shard_timeout_s
        self.max_replacements, self.clock = max_replacements, clock
        self.slots = [self._start(i, 0) for i in range(size)]
        self.replacements = 0
        self._owner: dict = {}  # ref -> slot, for in-flight shards and loading calls

    def _start(self, index: int, generation: int) -> Slot:
        slot = Slot(index, generation, None)
        slot.actor = self.backend.start(slot.worker_id)
        slot.ready_ref = self.backend.info(slot.actor)
        return slot

    # -- state -------------------------------------------------------------------------------

    @property
    def alive(self) -> int:
        return sum(1 for s in self.slots if s.state is not SlotState.DEAD)

    @property
    def busy(self) -> bool:
        """Anything to wait for: shards in flight or workers loading."""
        return any(s.inflight or s.state is SlotState.LOADING for s in self.slots)

    # -- actions -----------------------------------------------------------------------------

    def replace_dead(self) -> list[str]:
        """Start a new worker in each dead slot; the new workers' ids."""
        started = []
        for i, slot in enumerate(self.slots):
            if slot.state is SlotState.DEAD:
                self.replacements += 1
                if self.replacements > self.max_replacements:
                    raise WorkersExhausted(f"workers were lost {self.replacements} times")
                self.slots[i] = self._start(slot.index, slot.generation + 1)
                started.append(self.slots[i].worker_id)
        return started

    def submit(self, queue: ShardQueue) -> None:
        """Hand queued shards to ready workers, up to `max_in_flight` each (never to one still
        loading: queued there, shards would wait while ready workers run dry). Nothing is handed
        out until every first worker has loaded or failed, so a fast loader does not take all
        the work of a small run."""
        if any(s.generation == 0 and s.state is SlotState.LOADING for s in self.slots):
            return
        for slot in self.slots:
            while slot.state is SlotState.READY and queue and len(slot.inflight) < self.max_in_flight:
                task = queue.pop()
                task.submitted_at = self.clock()
                if not slot.inflight:
                    slot.head_started = task.submitted_at
                slot.inflight[self.backend.render(slot.actor, task)] = task

    def poll(self, timeout_s: float) -> list[Event]:
        """Wait up to `timeout_s` for one result or load, then report it and any timeouts."""
        refs = [r for s in self.slots for r in s.inflight] + [
            s.ready_ref for s in self.slots if s.state is SlotState.LOADING]
        events: list[Event] = []
        if refs:
            owner = {r: s for s in self.slots for r in s.inflight}
            owner.update({s.ready_ref: s for s in self.slots if s.state is SlotState.LOADING})
            for ref in self.backend.wait(refs, timeout_s):
                slot = owner[ref]
                if slot.state is SlotState.DEAD:
                    continue  # lost earlier in this pass
                events.append(self._collect(slot, ref))
        now = self.clock()
        for slot in self.slots:
            if slot.state is SlotState.READY and slot.inflight and now - slot.head_started > self.shard_timeout_s:
                events.append(self._lose(slot, "timeout", f"no result within {self.shard_timeout_s:g}s"))
        return events

    def _collect(self, slot: Slot, ref) -> Event:
        if slot.state is SlotState.LOADING:
            try:
                info = self.backend.get(ref)
            except (WorkerDied, TaskFailed, ResultLost) as e:
                return self._lose(slot, "worker_died", f"could not start: {e}")
            slot.state, slot.ready_ref = SlotState.READY, None
            return Loaded(slot.worker_id, info)
        try:
            result = self.backend.get(ref)
        except WorkerDied as e:
            return self._lose(slot, "worker_died", str(e))
        except ResultLost as e:
            return self._lose(slot, "worker_lost", str(e))
        except TaskFailed as e:
            task = slot.inflight.pop(ref)
            slot.head_started = self.clock()  # the next shard starts now
            return Errored(slot.worker_id, task, e.reason, str(e))
        task = slot.inflight.pop(ref)
        slot.head_started = self.clock()
        return Done(slot.worker_id, task, result)

    def _lose(self, slot: Slot, reason: str, error: str) -> Lost:
        tasks = list(slot.inflight.values())
        ever_loaded = slot.state is not SlotState.LOADING
        slot.inflight.clear()
        slot.state, slot.ready_ref = SlotState.DEAD, None
        self.backend.kill(slot.actor)
        return Lost(slot.worker_id, reason, error, tasks[0] if tasks else None, tasks[1:], ever_loaded)

    def shutdown(self) -> None:
        """Kill every worker: no actor outlives the dispatch."""
        for slot in self.slots:
            self.backend.kill(slot.actor)
            slot.state = SlotState.DEAD

    def __enter__(self) -> "WorkerPool":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


class Backend:
    """What the pool needs from Ray; `RayBackend` is the real one, tests pass a fake."""

    def start(self, worker_id: str) -> Any: ...
    def info(self, actor) -> Any: ...
    def render(self, actor, task: Task) -> Any: ...
    def wait(self, refs: list, timeout_s: float) -> list: ...
    def get(self, ref) -> Any: ...  # raises WorkerDied, TaskFailed or ResultLost
    def kill(self, actor) -> None: ...


class RayBackend(Backend):
    """Actors of `RenderWorker`, created with `options` and `args` plus the worker id."""

    def __init__(self, actor_cls, options: dict, args: tuple):
        import ray

        self.ray, self.remote_cls, self.args = ray, ray.remote(actor_cls).options(**options), args

    def start(self, worker_id: str):
        return self.remote_cls.remote(*self.args, worker_id)

    def info(self, actor):
        return actor.info.remote()

    def render(self, actor, task: Task):
        return actor.render_shard.remote(task.shard, task.attempt, task.submitted_at)

    def wait(self, refs: list, timeout_s: float) -> list:
        ready, _ = self.ray.wait(refs, num_returns=1, timeout=timeout_s)
        return ready

    def get(self, ref):
        from ray.exceptions import RayActorError, RayError, RayTaskError

        try:
            return self.ray.get(ref)
        except RayActorError as e:
            raise WorkerDied(error_cause(e)) from None
        except RayTaskError as e:
            reason = getattr(getattr(e, "cause", None), "reason", None)
            raise TaskFailed(error_cause(e), reason if isinstance(reason, str) else "worker_error") from None
        except RayError as e:
            raise ResultLost(first_line(e)) from None

    def kill(self, actor) -> None:
        try:
            self.ray.kill(actor, no_restart=True)
        except Exception:  # already dead
            pass


def error_cause(e: BaseException) -> str:
    """The original exception's type and message from a Ray error (not the whole traceback)."""
    cause = getattr(e, "cause", None)
    if cause is not None and not isinstance(cause, type(e)):
        return f"{type(cause).__name__}: {first_line(cause)}"
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ":" in ln and not ln.startswith(("File ", "Traceback", "ray::", "The actor")):
            return ln[:300]
    return first_line(e)
