"""The run lock `_LOCK`, its I/O and its policy: created once, refreshed by a heartbeat thread,
taken over only when stale or on request, and released only by the driver that holds it."""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Callable, Optional

from .errors import LockLost, RunLocked
from .layout import LOCK
from .storage import RunStore

log = logging.getLogger("cogview_ray.run_lock")

STALE_S = 120.0  # a driver whose heartbeat is older than this is taken to be gone
HEARTBEAT_S = 15.0


def read_lock(store: RunStore) -> Optional[dict]:
    """The current holder's owner dict (host, pid, started_at, heartbeat_at, lock_id), or None."""
    try:
        return json.loads(store.read(LOCK))
    except FileNotFoundError:
        return None


def _lock_bytes(content: dict) -> bytes:
    return (json.dumps(content, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def _create_lock(store: RunStore, owner: dict, takeover: bool = False) -> bool:
    """Create `_LOCK` once with a fresh lock_id; False if another driver holds it. `takeover`
    deletes the existing lock first: the old holder cannot be told, so that is a decision."""
    if takeover:
        store.delete(LOCK)
    # the lock_id makes these bytes this driver's own (create_once compares bytes on a retry)
    return store.create_once(LOCK, _lock_bytes(dict(owner, lock_id=uuid.uuid4().hex)))


def lock_staleness(holder: dict, stale_s: float, now: Optional[float] = None) -> Optional[str]:
    """Why a lock may be taken over without asking, or None while its driver may be alive.

    Stale: the holder ran on this host under a pid that no longer exists, or its heartbeat
    (refreshed every `heartbeat_s` by a thread of the holder) is older than `stale_s` at `now`
    (default: this host's clock). Anything else needs `takeover_lock=true`.
    """
    if not holder:
        return "the lock is unreadable"
    pid = holder.get("pid")
    if holder.get("host") == socket.gethostname() and isinstance(pid, int) and pid != os.getpid():
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return f"no process {pid} runs on this host"
        except PermissionError:
            pass
    age = (time.time() if now is None else now) - _heartbeat_at(holder)
    if age > stale_s:
        return f"its heartbeat is {age:.0f}s old (stale after {stale_s:g}s)"
    return None


def _heartbeat_at(holder: dict) -> float:
    try:
        return float(holder.get("heartbeat_at", 0))
    except (TypeError, ValueError):  # a hand-edited or foreign lock: as old as can be
        return 0.0


class RunLock:
    """One driver's hold on a run: `acquire`, then `check` often, then `release`."""

    def __init__(self, store: RunStore, *, stale_s: float = STALE_S, heartbeat_s: float = HEARTBEAT_S,
                 say: Callable[[str], None] = print):
        self.store, self.stale_s, self.heartbeat_s, self.say = store, stale_s, heartbeat_s, say
        self.owner: dict = {}  # what `_LOCK` holds while this driver has it, lock_id included
        self._lost: Optional[str] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @property
    def lock_id(self) -> Optional[str]:
        return self.owner.get("lock_id")

    def acquire(self, takeover: bool = False) -> None:
        """Create `_LOCK`; take over a stale one, or any one with `takeover`; else RunLocked."""
        store = self.store
        now = time.time()
        owner = {"host": socket.gethostname(), "pid": os.getpid(), "started_at": now, "heartbeat_at": now}
        if takeover:
            holder = read_lock(store)
            if holder:
                self.say(f"taking over the run lock held by pid {holder.get('pid')} on {holder.get('host')} "
                         f"(takeover_lock=true)")
        if not _create_lock(store, owner, takeover=takeover):
            holder = read_lock(store) or {}
            stale = lock_staleness(holder, self.stale_s)
            if stale is None:
                age = time.time() - _heartbeat_at(holder)
                raise RunLocked(
                    f"run {store.url()} is locked by another driver (pid {holder.get('pid')} on host "
                    f"{holder.get('host')}, heartbeat {age:.0f}s ago); if that driver is gone, rerun with "
                    f"takeover_lock=true")
            if holder:
                self.say(f"taking over a stale run lock left by pid {holder.get('pid')} on "
                         f"{holder.get('host')}: {stale}")
            if not _create_lock(store, owner, takeover=bool(holder)):
                holder = read_lock(store) or {}
                raise RunLocked(f"run {store.url()} was locked by another driver (pid {holder.get('pid')} on "
                                f"host {holder.get('host')}) while this one started")
        mine = read_lock(store) or {}
        if any(mine.get(k) != owner[k] for k in ("host", "pid", "started_at")):
            raise RunLocked(f"the run lock of {store.url()} was taken by another driver while this one started")
        self.owner = mine
        self._thread = threading.Thread(target=self._beat, name="cogview-ray-lock", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        """Rewrite `_LOCK` with the same lock_id and a fresh `heartbeat_at` every `heartbeat_s`
        (also while workers load); stop once another driver holds it."""
        while not self._stop.wait(self.heartbeat_s):
            try:
                if not self._still_mine():
                    return
                beat = dict(self.owner, heartbeat_at=time.time())
                self.store.write(LOCK, _lock_bytes(beat))
                self.owner = beat
            except Exception as e:  # a missed beat only makes the lock look older
                log.warning("could not refresh the run lock: %s", e)

    def _still_mine(self) -> bool:
        current = read_lock(self.store) or {}
        if current.get("lock_id") != self.lock_id:
            self._lost = (f"the run lock of {self.store.url()} was taken over by another driver "
                          f"(pid {current.get('pid')} on host {current.get('host')}); stopping")
        return self._lost is None

    def check(self, read: bool = False) -> None:
        """LockLost once another driver took the lock over; `read`: look at `_LOCK` now (before
        a commit) rather than trust the last heartbeat."""
        if read and self._lost is None:
            self._still_mine()
        if self._lost is not None:
            raise LockLost(self._lost)

    def release(self) -> None:
        """Stop the heartbeat and delete `_LOCK`, unless another driver holds it by now."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        try:
            if self.owner and (read_lock(self.store) or {}).get("lock_id") == self.lock_id:
                self.store.delete(LOCK)
        except Exception as e:  # the lock then looks stale to the next driver
            log.warning("could not release the run lock: %s", e)
