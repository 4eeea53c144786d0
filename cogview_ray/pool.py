"""`WorkerPool`: render workers in slots with an explicit state (loading, ready, dead), shards
handed to ready ones, and what one wait brought back as events (`Loaded`, `Done`, `Errored`,
`Lost`). The pool is elastic: it hands out work as soon as one worker is ready, a worker waiting
for resources just stays loading, and `grow` adds slots. Ray is reached only through a small
backend, so the pool is testable without it.
"""
from __future__ import annotations

import enum
import re
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


# A worker whose load raises one of these would fail the same way on any node (the checkpoint
# or the settings are wrong): the run fails fast rather than replace it. Anything else (a node
# lost while loading, a process killed) is replaced.
DETERMINISTIC_LOAD_ERRORS = ("CheckpointError", "ConfigError")
_DETERMINISTIC = re.compile(r"\b(?:%s):" % "|".join(DETERMINISTIC_LOAD_ERRORS))


def is_deterministic_load_error(error: str) -> bool:
    return _DETERMINISTIC.search(error) is not None


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
    fatal: bool = False  # its load failed deterministically (is_deterministic_load_error)


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
    """`size` slots, all started at once (a worker the cluster has no room for yet stays loading
    until a node joins); `grow` adds slots. `submit` fills ready workers from a queue, `poll`
    waits and reports events, `replace_dead` restarts lost workers (at most `max_replacements`
    over the pool's life), `starved_s` says how long no worker has been ready."""

    def __init__(self, backend: "Backend", size: int, *, max_in_flight: int, shard_timeout_s: float,
                 max_replacements: int, clock: Callable[[], float] = time.time):
        self.backend, self.max_in_flight, self.shard_timeout_s = backend, max_in_flight, shard_timeout_s
        self.max_replacements, self.clock = max_replacements, clock
        self.slots: list[Slot] = []
        self.replacements = 0
        self.ever_ready = False
        self.last_load_error: Optional[str] = None
        self._unready_since: Optional[float] = clock()  # None while some worker is ready
        self.grow(size)

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
    def ready(self) -> int:
        return sum(1 for s in self.slots if s.state is SlotState.READY)

    @property
    def loading(self) -> int:
        """Workers starting: waiting for resources, or loading their pipeline."""
        return sum(1 for s in self.slots if s.state is SlotState.LOADING)

    @property
    def in_flight(self) -> int:
        """Shards handed out and not yet back: while any are, the run is not over (a worker
        still loading is not worth waiting for once the queue is empty)."""
        return sum(len(s.inflight) for s in self.slots)

    def starved_s(self) -> float:
        """Seconds since the pool last had a ready worker (since it started, if none ever
        loaded); 0 while one is ready."""
        return 0.0 if self._unready_since is None else max(0.0, self.clock() - self._unready_since)

    def _mark_unready(self) -> None:
        if self._unready_since is None and not self.ready:
            self._unready_since = self.clock()

    # -- actions -----------------------------------------------------------------------------

    def grow(self, size: int) -> list[str]:
        """Add fresh slots up to `size` in all (never shrinks); the new workers' ids."""
        started = []
        while len(self.slots) < size:
            self.slots.append(self._start(len(self.slots), 0))
            started.append(self.slots[-1].worker_id)
        return started

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
        loading: queued there, shards would wait while ready workers run dry, and a worker the
        cluster has no room for may never start). Work starts with the first ready worker; the
        queue deals each worker its own block of consecutive shards, so an early worker takes
        the head of the plan, not the whole of a small run."""
        for slot in self.slots:
            while slot.state is SlotState.READY and queue and len(slot.inflight) < self.max_in_flight:
                task = queue.pop(slot.index)
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
                self.last_load_error = f"{slot.worker_id} could not start: {e}"
                lost = self._lose(slot, "worker_died", f"could not start: {e}")
                lost.fatal = is_deterministic_load_error(str(e))
                return lost
            slot.state, slot.ready_ref = SlotState.READY, None
            self.ever_ready, self._unready_since = True, None
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
        self._mark_unready()
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
    """Actors of `RenderWorker`, created with `options`, `args` plus the worker id, and `kwargs`."""

    def __init__(self, actor_cls, options: dict, args: tuple, kwargs: Optional[dict] = None):
        import ray

        self.ray, self.remote_cls, self.args = ray, ray.remote(actor_cls).options(**options), args
        self.kwargs = kwargs or {}

    def start(self, worker_id: str):
        return self.remote_cls.remote(*self.args, worker_id, **self.kwargs)

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
            # `pkg.module.SomeError: msg` -> `SomeError: msg`, as when Ray hands the cause over
            return re.sub(r"^(?:[A-Za-z_][\w]*\.)+(?=[A-Za-z_]\w*: )", "", ln)[:300]
    return first_line(e)
