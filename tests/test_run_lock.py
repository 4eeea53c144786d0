"""The run lock: one holder at a time (RunLocked for the second), stale takeover judged on the store's
clock, LockLost for a driver whose lock was taken over, release that marks only its own epoch, and
an earlier release's `_LOCK` honoured."""
import json
import os
import socket
import time

import pytest

from cogview_ray import layout
from cogview_ray.errors import LockLost, RunLocked
from cogview_ray.run_lock import RunLock, lock_staleness, read_holder, read_lock

pytestmark = pytest.mark.timeout(60)

STALE_S = 1.0
PAST_STALE_S = 2.2  # S3's LastModified has whole seconds


def test_second_driver_is_refused_and_the_first_lock_stays(store):
    first = RunLock(store)
    first.acquire()
    try:
        mine = read_lock(store)
        assert (mine["host"], mine["pid"], mine["lock_id"], mine["epoch"]) == (
            socket.gethostname(), os.getpid(), first.lock_id, 1)
        with pytest.raises(RunLocked, match=rf"locked by another driver \(pid {os.getpid()} on host "
                                            rf"{socket.gethostname()}, heartbeat \d+s ago\); if that driver is gone"):
            RunLock(store).acquire()
        assert read_lock(store)["lock_id"] == first.lock_id
        first.check(read=True)  # still ours
    finally:
        first.release()
    assert read_lock(store) is None  # released: the next driver takes the next epoch without asking
    said = []
    second = RunLock(store, say=said.append)
    second.acquire()
    assert second.epoch == 2 and said == []
    second.release()
    # nothing was ever deleted or overwritten: one object per holder, one release marker each
    assert store.list(layout.LOCK) == ["0000000001.json", "0000000001.released.json",
                                       "0000000002.json", "0000000002.released.json"]


def test_a_stale_lock_is_taken_over_and_said_so(store):
    gone = RunLock(store, heartbeat_s=3600)
    gone.acquire()  # and never beats again: as if its host died
    time.sleep(PAST_STALE_S)
    said = []
    lock = RunLock(store, stale_s=STALE_S, say=said.append)
    lock.acquire()
    try:
        assert (read_lock(store)["lock_id"], lock.epoch) == (lock.lock_id, 2)
        assert len(said) == 1 and said[0].startswith(
            f"taking over a stale run lock left by pid {os.getpid()} on host {socket.gethostname()}: its heartbeat is ")
        assert said[0].endswith(f"s old (stale after {STALE_S:g}s)")
        with pytest.raises(LockLost):
            gone.check(read=True)
    finally:
        lock.release()
        gone.release()


def test_heartbeats_keep_a_lock_live_past_the_staleness_limit(store):
    holder = RunLock(store, heartbeat_s=0.2)
    holder.acquire()
    try:
        time.sleep(PAST_STALE_S)
        with pytest.raises(RunLocked, match="locked by another driver"):
            RunLock(store, stale_s=STALE_S + 1).acquire()
        beat = json.loads(store.read(layout.lock_heartbeat(1)))
        assert beat["lock_id"] == holder.lock_id and beat["beat"] >= 3
    finally:
        holder.release()


def test_a_driver_whose_lock_was_taken_over_gets_LockLost_and_releases_nothing(store):
    first = RunLock(store)
    first.acquire()
    second = RunLock(store, say=lambda _: None)
    second.acquire(takeover=True)
    try:
        with pytest.raises(LockLost, match=r"was taken over by another driver \(pid \d+ on host .*, epoch 2\), "
                                           r"so this driver stops without writing more"):
            first.check(read=True)
        with pytest.raises(LockLost):
            first.check()  # remembered, without reading again
        first.release()
        assert read_lock(store)["lock_id"] == second.lock_id
        assert not store.exists(layout.lock_release(1))  # a driver that lost the lock writes nothing
    finally:
        second.release()
    assert read_lock(store) is None


def test_an_earlier_release_lock_is_honoured_and_never_written(store):
    legacy = {"host": "elsewhere", "pid": 4242, "started_at": 0, "heartbeat_at": 0, "lock_id": "theirs"}
    store.write(layout.LEGACY_LOCK, json.dumps(legacy).encode())
    # heartbeat_at is the holder's own clock and not trusted: the store wrote _LOCK just now
    with pytest.raises(RunLocked, match=r"pid 4242 on host elsewhere, heartbeat \d+s ago\).*takeover_lock=true"):
        RunLock(store).acquire()
    assert store.list("") == ["_LOCK"]  # refused before writing anything
    assert read_lock(store)["lock_id"] == "theirs"
    time.sleep(PAST_STALE_S)
    lock = RunLock(store, stale_s=STALE_S, say=lambda _: None)
    lock.acquire()
    lock.release()
    assert read_holder(store).epoch == 1 and json.loads(store.read(layout.LEGACY_LOCK)) == legacy


def test_staleness_is_judged_on_the_given_clock():
    holder = {"host": "elsewhere", "pid": 1, "heartbeat_at": 1000.0}
    assert lock_staleness(holder, 120, now=1060.0) is None
    assert lock_staleness(holder, 120, now=1121.0) == "its heartbeat is 121s old (stale after 120s)"
    assert lock_staleness({"host": "elsewhere", "heartbeat_at": "soon"}, 120, now=1000.0) is not None
    assert lock_staleness({}, 120) == "the lock is unreadable"
    # store times given: the holder's own heartbeat_at field is ignored
    assert lock_staleness(holder, 120, now=5000.0, beat_at=4990.0) is None
    assert lock_staleness(holder, 120, now=5000.0, beat_at=4800.0) == "its heartbeat is 200s old (stale after 120s)"
    assert lock_staleness(None, 120, now=5000.0, beat_at=4990.0) is None  # unreadable but fresh: ask
    assert lock_staleness(None, 120, now=5000.0, beat_at=0.0) == "it is unreadable and 5000s old (stale after 120s)"
