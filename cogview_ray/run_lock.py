"""The run lock `_LOCK`: created once, refreshed by a heartbeat thread, taken over only when stale
or on request, and released only by the driver that holds it."""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from typing import Callable, Optional

from .manifest import LOCK, acquire_lock, read_lock, release_lock
from .storage import RunStore

log = logging.getLogger("cogview_ray.run_lock")


class LockError(RuntimeError):
    """Another driver holds the lock, or took it over; the message names it in one sentence."""


def lock_staleness(holder: dict, stale_s: float) -> Optional[str]:
    """Why a lock may be taken over without asking, or None while its driver may be alive.

    Stale: the holder ran on this host under a pid that no longer exists, or its heartbeat
    (refreshed every `heartbeat_s` by a thread of the holder) is older than `stale_s`.
    Anything else needs `takeover_lock=true`.
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
    age = time.time() - float(holder.get("heartbeat_at", 0))
    if age > stale_s:
        return f"its heartbeat is {age:.0f}s old (stale after {stale_s:g}s)"
    return None


class RunLock:
    """One driver's hold on a run: `acquire`, then `check` often, then `release`."""

    def __init__(self, store: RunStore, *, stale_s: float = 120.0, heartbeat_s: float = 15.0,
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
        """Create `_LOCK`; take over a stale one, or any one with `takeover`; else LockError."""
        store = self.store
        now = time.time()
        owner = {"host": socket.gethostname(), "pid": os.getpid(), "started_at": now, "heartbeat_at": now}
        if takeover:
            holder = read_lock(store)
            if holder:
                self.say(f"taking over the run lock held by pid {holder.get('pid')} on {holder.get('host')} "
                         f"(takeover_lock=true)")
        if not acquire_lock(store, owner, takeover=takeover):
            holder = read_lock(store) or {}
            stale = lock_staleness(holder, self.stale_s)
            if stale is None:
                age = time.time() - float(holder.get("heartbeat_at", 0))
                raise LockError(
                    f"run {store.url()} is locked by another driver (pid {holder.get('pid')} on host "
                    f"{holder.get('host')}, heartbeat {age:.0f}s ago); if that driver is gone, rerun with "
                    f"takeover_lock=true")
            if holder:
                self.say(f"taking over a stale run lock left by pid {holder.get('pid')} on "
                         f"{holder.get('host')}: {stale}")
            if not acquire_lock(store, owner, takeover=bool(holder)):
                holder = read_lock(store) or {}
                raise LockError(f"run {store.url()} was locked by another driver (pid {holder.get('pid')} on "
                                f"host {holder.get('host')}) while this one started")
        mine = read_lock(store) or {}
        if any(mine.get(k) != owner[k] for k in ("host", "pid", "started_at")):
            raise LockError(f"the run lock of {store.url()} was taken by another driver while this one started")
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
                self.store.write(LOCK, json.dumps(beat, sort_keys=True, indent=2).encode())
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
        """LockError once another driver took the lock over; `read`: look at `_LOCK` now (before
        a commit) rather than trust the last heartbeat."""
        if read and self._lost is None:
            self._still_mine()
        if self._lost is not None:
            raise LockError(self._lost)

    def release(self) -> None:
        """Stop the heartbeat and delete `_LOCK`, unless another driver holds it by now."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        try:
            if self.owner and (read_lock(self.store) or {}).get("lock_id") == self.lock_id:
                release_lock(self.store)
        except Exception as e:  # the lock then looks stale to the next driver
            log.warning("could not release the run lock: %s", e)
