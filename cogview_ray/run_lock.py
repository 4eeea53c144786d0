"""The run lock: one create-once object per holder under `_locks/` (the highest epoch holds the run),
heartbeats in the holder's own object, staleness judged on the store's clock, fencing by epoch.

No driver ever overwrites or deletes a lock object another driver wrote: a takeover creates the
next epoch, a release adds a marker for its own epoch. So a driver that was paused (GC, SIGSTOP, a
partition) past the staleness limit cannot bring its lock back or remove its successor's: on waking
it finds epoch + 1 and stops (LockLost) before its next write.
"""
from __future__ import annotations

import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Optional

from . import layout
from .errors import LockLost, RunLocked
from .storage import RunStore, json_bytes

log = logging.getLogger("cogview_ray.run_lock")

STALE_S = 120.0  # a driver whose last heartbeat is older than this (store clock) is taken to be gone
HEARTBEAT_S = 15.0


@dataclass
class Holder:
    """Who holds a run: the highest epoch's object, or (epoch 0) an earlier release's `_LOCK`."""

    epoch: int
    rel: str  # the holder's object
    info: Optional[dict]  # its content; None when it cannot be read as a JSON object
    released: bool = False

    def describe(self) -> str:
        if self.info is None:
            return f"an unreadable lock object {self.rel}"
        return f"pid {self.info.get('pid')} on host {self.info.get('host')}"


def _read_info(store: RunStore, rel: str) -> Optional[dict]:
    try:
        return _parse_info(store.read(rel))
    except FileNotFoundError:  # gone meanwhile (deleted by hand)
        return None


def _parse_info(data: bytes) -> Optional[dict]:
    try:
        info = json.loads(data)
    except ValueError:  # empty, truncated or not JSON
        return None
    return info if isinstance(info, dict) else None


def read_holder(store: RunStore) -> Optional[Holder]:
    """The run's current holder (released or not), or None if no driver ever locked it."""
    store.invalidate()  # s3fs caches listings; a takeover must be seen at once
    names = store.list(layout.LOCK)
    epochs = layout.lock_epochs(names)
    if epochs:
        epoch = max(epochs)
        released = layout.lock_release(epoch).rsplit("/", 1)[-1] in names
        return Holder(epoch, layout.lock_epoch(epoch), _read_info(store, layout.lock_epoch(epoch)), released)
    if not store.exists(layout.LEGACY_LOCK):
        return None
    return Holder(0, layout.LEGACY_LOCK, _read_info(store, layout.LEGACY_LOCK))


def last_beat_s(store: RunStore, holder: Holder) -> Optional[float]:
    """The store time of the holder's latest sign of life: its object or its heartbeat object,
    whichever the store wrote last (an earlier release rewrote `_LOCK` itself); None if both are gone."""
    rels = [holder.rel] if holder.epoch == 0 else [holder.rel, layout.lock_heartbeat(holder.epoch)]
    stamps = []
    for rel in rels:
        try:
            stamps.append(store.modified(rel))
        except FileNotFoundError:
            pass
    return max(stamps) if stamps else None


def holder_staleness(store: RunStore, holder: Holder, stale_s: float) -> tuple[Optional[str], float]:
    """`lock_staleness` of `holder` judged wholly on the store's clock (its newest sign of life
    against a fresh probe), and the age in seconds of that sign of life (inf when it is gone)."""
    beat_at = last_beat_s(store, holder)
    now = store.now()
    age_s = math.inf if beat_at is None else now - beat_at
    return lock_staleness(holder.info, stale_s, now=now, beat_at=now - age_s), age_s


def read_lock(store: RunStore) -> Optional[dict]:
    """The current holder's fields (host, pid, started_at, lock_id, epoch and, from its heartbeat,
    heartbeat_at on its own clock); {} if its object is unreadable; None if the run is not locked."""
    holder = read_holder(store)
    if holder is None or holder.released:
        return None
    if holder.info is None:
        return {}
    info = dict(holder.info)
    if holder.epoch:
        beat = _read_info(store, layout.lock_heartbeat(holder.epoch)) or {}
        info["heartbeat_at"] = beat.get("heartbeat_at", info.get("started_at"))
    return info


def lock_staleness(holder: Optional[dict], stale_s: float, now: Optional[float] = None,
                   beat_at: Optional[float] = None) -> Optional[str]:
    """Why a lock may be taken over without asking, or None while its driver may be alive.

    Stale: the holder ran on this host under a pid that no longer exists, or its last heartbeat is
    older than `stale_s` at `now`. Drivers pass `beat_at` and `now` as store times (the modification
    times of the holder's newest heartbeat object and of a fresh probe), so no host's clock is
    trusted; without `beat_at` the holder's own `heartbeat_at` field is used (tools judging an
    earlier release's lock). Anything else needs `takeover_lock=true`.
    """
    if holder:
        pid = holder.get("pid")
        if holder.get("host") == socket.gethostname() and isinstance(pid, int) and pid != os.getpid():
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return f"no process {pid} runs on this host"
            except PermissionError:
                pass
    elif beat_at is None:
        return "the lock is unreadable"
    if beat_at is None:
        beat_at = _heartbeat_at(holder)
    age = (time.time() if now is None else now) - beat_at
    if age > stale_s:
        what = "its heartbeat is" if holder else "it is unreadable and"
        return f"{what} {age:.0f}s old (stale after {stale_s:g}s)"
    return None


def _heartbeat_at(holder: dict) -> float:
    try:
        return float(holder.get("heartbeat_at", 0))
    except (TypeError, ValueError):  # a hand-edited or foreign lock: as old as can be
        return 0.0




class RunLock:
    """One driver's hold on a run: `acquire`, then `check` often (and with `read=True` right before
    every commit or summary write), then `release`."""

    def __init__(self, store: RunStore, *, stale_s: float = STALE_S, heartbeat_s: float = HEARTBEAT_S,
                 say: Callable[[str], None] = print):
        self.store, self.stale_s, self.heartbeat_s, self.say = store, stale_s, heartbeat_s, say
        self.owner: dict = {}  # this driver's epoch object, lock_id and epoch included
        self._lost: Optional[str] = None
        self._last_read = -math.inf  # monotonic time of the last look for a successor
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @property
    def lock_id(self) -> Optional[str]:
        return self.owner.get("lock_id")

    @property
    def epoch(self) -> Optional[int]:
        return self.owner.get("epoch")

    def acquire(self, takeover: bool = False) -> None:
        """Create the next epoch; a live holder's lock only with `takeover`, else RunLocked."""
        store = self.store
        holder = read_holder(store)
        if holder is not None and not holder.released:
            stale, age_s = holder_staleness(store, holder, self.stale_s)
            if takeover:
                self.say(f"taking over the run lock held by {holder.describe()} (takeover_lock=true)")
            elif stale is not None:
                self.say(f"taking over a stale run lock left by {holder.describe()}: {stale}")
            else:
                raise RunLocked(self._locked(holder, age_s))
        epoch = (holder.epoch if holder is not None else 0) + 1
        owner = {"epoch": epoch, "lock_id": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
                 "started_at": time.time(), "previous_epoch": holder.epoch if holder is not None else None}
        # create-once: of two drivers taking the same epoch exactly one wins (the lock_id makes
        # these bytes this driver's own, as create_once's retry check needs)
        if not store.create_once(layout.lock_epoch(epoch), json_bytes(owner)):
            other = read_holder(store)
            raise RunLocked(f"run {store.url()} was locked by another driver "
                            f"({other.describe() if other else 'gone again'}) while this one started")
        self.owner = owner
        self.check(read=True)  # a faster driver may already have taken it over
        self._thread = threading.Thread(target=self._beat, name="cogview-ray-lock", daemon=True)
        self._thread.start()

    def _locked(self, holder: Holder, age_s: float) -> str:
        url = self.store.url()
        if holder.info is None:
            return (f"run {url} has an unreadable lock object {self.store.url(holder.rel)} written "
                    f"{age_s:.0f}s ago; if no driver is running on this run, rerun with takeover_lock=true")
        return (f"run {url} is locked by another driver ({holder.describe()}, heartbeat {age_s:.0f}s ago); "
                f"if that driver is gone, rerun with takeover_lock=true")

    def _beat(self) -> None:
        """Rewrite this epoch's heartbeat object every `heartbeat_s` (also while workers load);
        stop once a later epoch exists. A late beat touches only this driver's own object."""
        beat = 0
        while not self._stop.wait(self.heartbeat_s):
            try:
                if not self._still_mine():
                    return
                beat += 1
                self.store.write(layout.lock_heartbeat(self.epoch), json_bytes(
                    {"epoch": self.epoch, "lock_id": self.lock_id, "beat": beat, "heartbeat_at": time.time()}))
            except Exception as e:  # a missed beat only makes the lock look older
                log.warning("could not refresh the run lock: %s", e)

    def _still_mine(self) -> bool:
        """Look for epoch + 1: taking over always creates exactly the epoch after the holder's."""
        started = time.monotonic()
        successor = layout.lock_epoch(self.epoch + 1)
        try:
            data = self.store.read(successor)  # a GET: never answered from a cached listing
        except FileNotFoundError:
            self._last_read = started  # what `check` may trust for heartbeat_s from now
            return True
        holder = Holder(self.epoch + 1, successor, _parse_info(data))
        self._lost = (f"the run lock of {self.store.url()} was taken over by another driver "
                      f"({holder.describe()}, epoch {holder.epoch}), so this driver stops without writing more")
        return False

    def check(self, read: bool = False) -> None:
        """LockLost once another driver took the lock over. `read`: look at the store now (before a
        commit or summary write); otherwise look at most every `heartbeat_s` (a driver waking from
        a pause looks at once: its clock has moved on)."""
        if self._lost is None and (read or time.monotonic() - self._last_read >= self.heartbeat_s):
            self._still_mine()
        if self._lost is not None:
            raise LockLost(self._lost)

    def release(self) -> None:
        """Stop the heartbeat and mark this epoch released (never touching any other object);
        a driver that lost the lock writes nothing."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        if self.epoch is None or self._lost is not None:
            return
        try:
            if self._still_mine():
                self.store.create_once(layout.lock_release(self.epoch), json_bytes(
                    {"epoch": self.epoch, "lock_id": self.lock_id, "released_at": time.time()}))
        except Exception as e:  # the lock then looks stale to the next driver
            log.warning("could not release the run lock: %s", e)
