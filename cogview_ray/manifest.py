"""The run's record: manifest parts (one Parquet per shard attempt), commit markers, and the
run-level files `_run.json` and `_SUCCESS.json` (where each lives: layout.py; the lock: run_lock.py).

Commit protocol (driver only): `write_manifest_part` under an attempt-unique token, then
`commit_shard`, which reads that part back and creates the shard's commit marker once, naming the
part and its sha256. A shard is done exactly when a marker exists; markers are never deleted: a
shard committed as failed is retried under the next generation (layout.commit_marker), and every
reader takes the newest (`committed_generations`). Readers trust committed shards only and find a
shard's part through its marker (`part_of`, `read_part`), never by name, so a late writer's part
is an orphan nobody reads.
"""
from __future__ import annotations

import hashlib
import io
import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

# The row schema lives in records.py; these names stay importable from here.
from cogview_ray.records import (MANIFEST_SCHEMA, STATUSES, RowRecord, ShardResult,  # noqa: F401
                                 count_statuses, records_table)
from cogview_ray.errors import UserError
from cogview_ray.layout import (COMMITS_DIR, MANIFEST_DIR, RUN_INFO, SUCCESS, commit_marker, manifest_part,
                                newest_generations)
from cogview_ray.storage import RunStore, check_relative, json_bytes

_READ_THREADS = 8


class CorruptRecord(UserError, ValueError):
    """An object of the run's record (marker, `_run.json`, `_SUCCESS.json`) exists but cannot be
    read as one; the message names it."""


def manifest_bytes(records: list[RowRecord]) -> bytes:
    """Parquet bytes of a manifest part; equal records give equal bytes."""
    count_statuses(r.status for r in records)
    buf = io.BytesIO()
    pq.write_table(records_table(records), buf, compression="zstd", compression_level=3,
                   use_dictionary=True, write_statistics=True, row_group_size=1 << 20)
    return buf.getvalue()


def write_manifest_part(store: RunStore, shard_id: str, records: list[RowRecord],
                        token: str | None = None) -> str:
    """Write the shard's part `layout.manifest_part(shard_id, token)`; its sha256.

    The driver names a token unique to the attempt, so no committed part is ever written again.
    Without one (tools, tests) the fixed name of earlier releases is written, and refused once the
    shard is committed."""
    for r in records:
        if r.shard_id != shard_id:
            raise ValueError(f"record for row {r.row_index} of {r.file} belongs to shard "
                             f"{r.shard_id!r}, not {shard_id!r}")
    data = manifest_bytes(records)
    if token is None and find_marker(store, shard_id) is not None:
        raise ValueError(f"shard {shard_id} is already committed; its manifest part "
                         f"{store.url(manifest_part(shard_id))} is final")
    store.write(manifest_part(shard_id, token), data)
    return hashlib.sha256(data).hexdigest()


def commit_shard(store: RunStore, shard_id: str, summary: dict, part: str | None = None,
                 generation: int = 0) -> bool:
    """Create generation `generation` of the shard's commit marker once, pointing at `part`
    (default: the fixed name of earlier releases); True if this call committed the shard.

    `summary["rows"]` (the shard's input row count) is required; the marker adds the part's
    name, sha256, size and status counts, read back from storage, so a marker never exists
    without the part it describes. Refuses a part whose counts do not add up to `rows`.
    """
    if not isinstance(summary.get("rows"), int):
        raise ValueError(f"commit summary for shard {shard_id} lacks an integer 'rows'")
    part = manifest_part(shard_id) if part is None else _checked_part(part, shard_id)
    try:
        data = store.read(part)
    except FileNotFoundError:
        raise ValueError(f"shard {shard_id} has no manifest part at {store.url(part)}; "
                         f"write it before committing") from None
    table = pq.read_table(io.BytesIO(data), columns=["status"])
    counts = count_statuses(table.column("status").to_pylist())
    if sum(counts.values()) != summary["rows"]:
        raise ValueError(f"shard {shard_id} manifest has {sum(counts.values())} rows but the "
                         f"shard has {summary['rows']}; refusing to commit")
    marker = dict(summary)
    marker.update(shard_id=shard_id, manifest=part, manifest_sha256=hashlib.sha256(data).hexdigest(),
                  manifest_bytes=len(data), generation=generation, **counts)
    return store.create_once(commit_marker(shard_id, generation), json_bytes(marker))


def committed_generations(store: RunStore, fresh: bool = True) -> dict[str, int]:
    """Committed shard id -> the generation of its current (newest) commit marker, from one listing
    of `commits/` (`fresh`: listing cache dropped first, for resume scans). The one place readers
    find a shard's marker: `layout.commit_marker(shard_id, generation)`."""
    if fresh:
        store.invalidate()
    return newest_generations(store.list(COMMITS_DIR))


def committed_shards(store: RunStore) -> set[str]:
    """Ids of committed shards (listing cache dropped first, for resume scans)."""
    return set(committed_generations(store))


def find_marker(store: RunStore, shard_id: str) -> str | None:
    """The current commit marker of one shard, or None: without listing `commits/` (which holds a
    marker per shard), by probing generations upwards (they are created one after another)."""
    found, generation = None, 1
    while store.exists(commit_marker(shard_id, generation)):
        found, generation = commit_marker(shard_id, generation), generation + 1
    if found is None and store.exists(commit_marker(shard_id)):
        found = commit_marker(shard_id)
    return found


def read_commit(store: RunStore, shard_id: str, generation: int | None = None) -> dict:
    """The shard's current commit marker (`generation`: that one, as `committed_generations` gave
    it; None: found by `find_marker`); FileNotFoundError if uncommitted, CorruptRecord if unreadable."""
    rel = commit_marker(shard_id, generation) if generation is not None else find_marker(store, shard_id)
    if rel is None:
        raise FileNotFoundError(f"shard {shard_id} has no commit marker in {store.url(COMMITS_DIR)}")
    marker = _parse_json(store, rel, store.read(rel))
    if marker.get("shard_id", shard_id) != shard_id:
        raise CorruptRecord(f"Commit marker {store.url(rel)} is for shard {marker.get('shard_id')!r}, "
                            f"not {shard_id!r}.")
    return marker


def read_commits(store: RunStore, shards: list[str], generations: dict[str, int] | None = None) -> dict[str, dict]:
    """The current markers of the given committed shards, read in parallel (small GETs).
    `generations`: from `committed_generations`, if the caller has it; else listed afresh here.
    FileNotFoundError for a shard without a marker."""
    if generations is None:
        generations = committed_generations(store)
    with ThreadPoolExecutor(max_workers=_READ_THREADS) as pool:
        return dict(zip(shards, pool.map(lambda s: read_commit(store, s, generations.get(s, 0)), shards)))


def part_of(marker: dict, shard_id: str) -> str:
    """The manifest part a commit marker points to: the one place a reader finds a shard's part
    (markers of earlier releases name the fixed part, or nothing). CorruptRecord for a marker
    naming anything but a part of its own shard."""
    part = marker.get("manifest", manifest_part(shard_id))
    try:
        return _checked_part(part, shard_id)
    except ValueError:
        raise CorruptRecord(f"Commit marker {commit_marker(shard_id, _generation(marker))} names {part!r}, "
                            f"which is not a manifest part of shard {shard_id}.") from None


def _generation(marker: dict) -> int:
    """The generation a marker records (0 for markers of earlier releases)."""
    generation = marker.get("generation", 0)
    return generation if isinstance(generation, int) and not isinstance(generation, bool) and generation >= 0 else 0


def _checked_part(part: Any, shard_id: str) -> str:
    fixed, folder = manifest_part(shard_id), f"{MANIFEST_DIR}/{shard_id}/"
    if not isinstance(part, str) or not (part == fixed or (part.startswith(folder) and part.endswith(".parquet")
                                                           and "/" not in part[len(folder):])):
        raise ValueError(f"{part!r} is not a manifest part of shard {shard_id}")
    return check_relative(part)


def read_part(store: RunStore, shard_id: str, columns: list[str] | None = None,
              marker: dict | None = None) -> pa.Table:
    """The committed manifest part of one shard (found through its marker, read if not given)."""
    part = part_of(marker if marker is not None else read_commit(store, shard_id), shard_id)
    return pq.read_table(io.BytesIO(store.read(part)), columns=columns, schema=MANIFEST_SCHEMA)


def read_manifest(store: RunStore, committed_only: bool = True, columns: list[str] | None = None,
                  markers: dict[str, dict] | None = None) -> pa.Table:
    """The committed shards' parts, each found through its marker (`markers`: those already read,
    by shard id), as one table. `committed_only=False`: every part present instead, orphans and
    other attempts included (for inspecting a run)."""
    if committed_only:
        if markers is None:
            generations = committed_generations(store)
            markers = read_commits(store, sorted(generations), generations)
        parts = [part_of(markers[s], s) for s in sorted(markers)]
    else:
        store.invalidate()
        parts = []
        for name in store.list(MANIFEST_DIR):
            if name.endswith(".parquet"):  # the fixed name of earlier releases
                parts.append(f"{MANIFEST_DIR}/{name}")
            else:
                parts += [f"{MANIFEST_DIR}/{name}/{n}" for n in store.list(f"{MANIFEST_DIR}/{name}")
                          if n.endswith(".parquet")]
    schema = MANIFEST_SCHEMA if columns is None else pa.schema(
        [MANIFEST_SCHEMA.field(c) for c in columns])

    def read(part: str) -> pa.Table:
        return pq.read_table(io.BytesIO(store.read(part)), columns=columns, schema=MANIFEST_SCHEMA)

    with ThreadPoolExecutor(max_workers=_READ_THREADS) as pool:  # parts are small GETs
        tables = list(pool.map(read, parts))
    return pa.concat_tables(tables) if tables else schema.empty_table()


# --- run-level files ---------------------------------------------------------------


def _parse_json(store: RunStore, rel: str, data: bytes) -> dict:
    try:
        obj = json.loads(data)
    except ValueError:
        obj = None
    if not isinstance(obj, dict):
        raise CorruptRecord(f"{store.url(rel)} is unreadable (not a JSON object); restore or remove it, "
                            f"or write the run under a new output.run_id.")
    return obj


def _read_json(store: RunStore, rel: str) -> dict | None:
    try:
        data = store.read(rel)
    except FileNotFoundError:
        return None
    return _parse_json(store, rel, data)


def write_run_info(store: RunStore, info: dict) -> bool:
    """Create `_run.json` once: resolved config (already redacted by the caller), fingerprint,
    versions. False if it exists already (another driver wrote it first: compare with it)."""
    return store.create_once(RUN_INFO, json_bytes(info))


def read_run_info(store: RunStore) -> dict | None:
    return _read_json(store, RUN_INFO)


def write_success(store: RunStore, summary: dict) -> bool:
    """Create `_SUCCESS.json` once (a complete run is written once); False if one exists already.
    `summary["totals"]` must hold int rows/ok/failed/rejected/shards."""
    totals = summary.get("totals")
    keys = ("rows", "ok", "failed", "rejected", "shards")
    if not isinstance(totals, dict) or not all(isinstance(totals.get(k), int) for k in keys):
        raise ValueError(f"success summary needs 'totals' with integer {', '.join(keys)}")
    return store.create_once(SUCCESS, json_bytes(summary))


def read_success(store: RunStore) -> dict | None:
    return _read_json(store, SUCCESS)
