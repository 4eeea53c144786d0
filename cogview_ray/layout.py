"""Where each object of a run lives under `{output.uri}/{run_id}/`: every key of a run folder is
spelled here, once; the modules that read or write a run ask here."""
from __future__ import annotations

import re
from typing import Iterable

from cogview_ray.storage import check_relative

RUN_INFO = "_run.json"  # resolved config (secrets removed), output identity, input fingerprint, versions
RUNTIME = "_runtime.json"  # created once at the first worker load: torch/cuDNN, device, attention, compile, dtype
LOCK = "_locks"  # the run lock: create-once epoch objects, the highest epoch holds the run (lock_* below)
LEGACY_LOCK = "_LOCK"  # the one lock object of earlier releases: honoured (never written) until an epoch exists
SUCCESS = "_SUCCESS.json"  # written when every shard is committed
FAILED_SUMMARY = "_FAILED.json"  # written instead while some shards are committed as failed

MANIFEST_DIR = "manifest"  # manifest/{shard}/{token}.parquet: one row per input row; the marker names its part
COMMITS_DIR = "commits"  # commits/{shard}.json, then .g{N}.json: commit markers by generation, written last
FAILED_DIR = "failed"  # failed/{shard}.json: written by earlier releases only; never read, written or deleted now
CLAIMS_DIR = "ids"  # ids/{key}.json: which input row owns an object key (user-given ids)
IMAGES_DIR = "images"  # images/{shard}/{key}.{ext}: format=files
SHARDS_DIR = "shards"  # shards/{shard}.tar | .parquet: format=webdataset | parquet
OUTPUT_DIRS = (IMAGES_DIR, SHARDS_DIR)  # where an ok row's key may point
LOGS_DIR = "_logs"  # driver logs and worker errors (run_logs.py): kept with the run, never outputs or commits

# A key becomes a file name with ".json" appended (claims); 200 bytes leaves room in 255.
MAX_KEY_BYTES = 200
# Each per-shard folder's file name suffix, so that a listing maps back to shard ids.
_SUFFIXES = {MANIFEST_DIR: ".parquet", COMMITS_DIR: ".json"}
# A commit marker of generation N >= 1: `{shard}.gN.json` (generation 0 has no tag).
_GENERATION = re.compile(r"^(.+)\.g([1-9][0-9]{0,17})\.json$")


def check_key(key: str) -> str:
    """A shard id or sample key must be one safe path segment (it becomes a file or member name)."""
    if not isinstance(key, str) or "/" in key or len(key.encode("utf-8")) > MAX_KEY_BYTES:
        raise ValueError(f"sample key {key!r} must be one path segment of at most "
                         f"{MAX_KEY_BYTES} bytes")
    check_relative(key)
    return key


def manifest_part(shard_id: str, token: str | None = None) -> str:
    """The manifest part one attempt writes: `token` is unique to the attempt, so a late writer only
    adds an orphan beside a committed part. No token: the one fixed name of earlier releases."""
    if token is None:
        return f"{MANIFEST_DIR}/{check_key(shard_id)}{_SUFFIXES[MANIFEST_DIR]}"
    return f"{MANIFEST_DIR}/{check_key(shard_id)}/{check_key(token)}{_SUFFIXES[MANIFEST_DIR]}"


def commit_marker(shard_id: str, generation: int = 0) -> str:
    """Generation `generation` of the shard's commit marker, each created once and never deleted:
    0 is `commits/{shard}.json` (the one marker of earlier releases), N >= 1 `commits/{shard}.gN.json`.
    A shard committed as failed is retried by creating the next generation; the newest one counts
    (`newest_generations`), so a paused driver can lose a race for a generation but delete nothing."""
    if not isinstance(generation, int) or generation < 0:
        raise ValueError(f"commit marker generation {generation!r} is not a whole number")
    if _GENERATION.match(f"{shard_id}.json"):
        raise ValueError(f"shard id {shard_id!r} ends like a commit marker generation (.g<number>), "
                         f"which would make its markers ambiguous")
    tail = f".g{generation}" if generation else ""
    return f"{COMMITS_DIR}/{check_key(shard_id)}{tail}{_SUFFIXES[COMMITS_DIR]}"


def newest_generations(names: Iterable[str]) -> dict[str, int]:
    """Shard id -> its newest marker generation, from a listing of `commits/` (other names
    ignored): the one rule every reader uses to find a shard's current commit marker."""
    newest: dict[str, int] = {}
    suffix = _SUFFIXES[COMMITS_DIR]
    for name in names:
        m = _GENERATION.match(name)
        if m:
            shard_id, generation = m.group(1), int(m.group(2))
        elif name.endswith(suffix) and len(name) > len(suffix):
            shard_id, generation = name[: -len(suffix)], 0
        else:
            continue
        if generation >= newest.get(shard_id, 0):
            newest[shard_id] = generation
    return newest


def lock_epoch(epoch: int) -> str:
    """Epoch `epoch`'s holder (host, pid, lock_id): created once by the driver that takes the lock."""
    return f"{LOCK}/{epoch:010d}.json"


def lock_heartbeat(epoch: int) -> str:
    """Rewritten by epoch `epoch`'s holder only; its store time is that holder's last sign of life."""
    return f"{LOCK}/{epoch:010d}.beat.json"


def lock_release(epoch: int) -> str:
    """Created once when epoch `epoch`'s holder lets go: the next driver takes epoch + 1 at once."""
    return f"{LOCK}/{epoch:010d}.released.json"


def lock_epochs(names: Iterable[str]) -> set[int]:
    """The epochs in a listing of `LOCK` (heartbeats, releases and other names ignored)."""
    return {int(n[:10]) for n in names if len(n) == 15 and n[:10].isdigit() and n.endswith(".json")}


def claim(key: str) -> str:
    return f"{CLAIMS_DIR}/{check_key(key)}.json"


def image(shard_id: str, key: str, ext: str) -> str:
    """The object of one image in the `files` format."""
    return f"{IMAGES_DIR}/{check_key(shard_id)}/{check_key(key)}.{ext}"


def container(shard_id: str, suffix: str) -> str:
    """The shard's one container object in the `webdataset` (tar) or `parquet` format."""
    return f"{SHARDS_DIR}/{check_key(shard_id)}.{suffix}"


def driver_log(started_at: str, pid: int) -> str:
    """One driver process's log, rewritten by that driver only: `_logs/driver-{started_at}-{pid}.log`."""
    return f"{LOGS_DIR}/driver-{check_key(started_at)}-{int(pid)}.log"


def worker_log(worker_id: str, name: str) -> str:
    """A worker's error log: `_logs/workers/{worker_id}/{name}.log` (`{shard}-a{attempt}` or `load`)."""
    return f"{LOGS_DIR}/workers/{check_key(worker_id)}/{check_key(name)}.log"


def is_output(rel: str) -> bool:
    """True if `rel` (already checked to be relative) lies where images are written."""
    return any(rel.startswith(f"{folder}/") for folder in OUTPUT_DIRS)
