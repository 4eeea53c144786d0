"""The run lock: one holder at a time (RunLocked for the second), stale takeover, LockLost for a
driver whose lock was taken over, release only by the holder, staleness on a given clock."""
import json
import os
import socket

import pytest

from cogview_ray.errors import LockLost, RunLocked
from cogview_ray.run_lock import RunLock, lock_staleness, read_lock

pytestmark = pytest.mark.timeout(60)


def test_second_driver_is_refused_and_the_first_lock_stays(store):
    first = RunLock(store)
    first.acquire()
    try:
        mine = read_lock(store)
        assert (mine["host"], mine["pid"], mine["lock_id"]) == (socket.gethostname(), os.getpid(), first.lock_id)
        with pytest.raises(RunLocked, match=rf"locked by another driver \(pid {os.getpid()} on host "):
            RunLock(store).acquire()
        assert read_lock(store)["lock_id"] == first.lock_id
        first.check(read=True)  # still ours
    finally:
        first.release()
    assert read_lock(store) is None
    second = RunLock(store)
    second.acquire()
    second.release()


def test_a_stale_lock_is_taken_over_and_said_so(store):
    store.write("_LOCK", json.dumps({"host": "elsewhere", "pid": 1, "heartbeat_at": 0,
                                     "lock_id": "gone"}).encode())
    said = []
    lock = RunLock(store, say=said.append)
    lock.acquire()
    try:
        assert read_lock(store)["lock_id"] == lock.lock_id != "gone"
        assert said and said[0].startswith("taking over a stale run lock left by pid 1 on elsewhere: "
                                           "its heartbeat is ")
    finally:
        lock.release()


def test_a_driver_whose_lock_was_taken_over_gets_LockLost_and_releases_nothing(store):
    first = RunLock(store)
    first.acquire()
    second = RunLock(store, say=lambda _: None)
    second.acquire(takeover=True)
    try:
        with pytest.raises(LockLost, match="was taken over by another driver"):
            first.check(read=True)
        with pytest.raises(LockLost):
            first.check()  # remembered, without reading again
        first.release()
        assert read_lock(store)["lock_id"] == second.lock_id
    finally:
        second.release()
    assert read_lock(store) is None


def test_staleness_is_judged_on_the_given_clock():
    holder = {"host": "elsewhere", "pid": 1, "heartbeat_at": 1000.0}
    assert lock_staleness(holder, 120, now=1060.0) is None
    assert lock_staleness(holder, 120, now=1121.0) == "its heartbeat is 121s old (stale after 120s)"
    assert lock_staleness({"host": "elsewhere", "heartbeat_at": "soon"}, 120, now=1000.0) is not None
    assert lock_staleness({}, 120) == "the lock is unreadable"
