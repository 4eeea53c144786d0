"""The run's record: manifest parts (one Parquet per shard), commit markers, and the
run-level files `_run.json` and `_SUCCESS.json` (where each lives: layout.py; `_LOCK`: run_lock.py).

Commit protocol (driver only): `write_manifest_part`, then `commit_shard`, which reads
the part back and creates `commits/{shard}.json` once. A shard is done exactly when its
marker exists; readers trust committed shards only.
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
from cogview_ray.layout import (COMMITS_DIR, MANIFEST_DIR, RUN_INFO, SUCCESS, commit_marker, manifest_part,
                                shard_ids)
from cogview_ray.storage import RunStore

_READ_THREADS = 8


def manifest_bytes(records: list[RowRecord]) -> bytes:
    """Parquet bytes of a manifest part; equal records give equal bytes."""
    count_statuses(r.status for r in records)
    buf = io.BytesIO()
    pq.write_table(records_table(records), buf, compression="zstd", compression_level=3,
                   use_dictionary=True, write_statistics=True, row_group_size=1 << 20)
    return buf.getvalue()


def write_manifest_part(store: RunStore, shard_id: str, records: list[RowRecord]) -> str:
    """Write `manifest/{shard}.parquet` (overwriting an uncommitted one); its sha256.

    Refuses once the shard is committed: a committed part is final."""
    for r in records:
        if r.shard_id != shard_id:
            raise ValueError(f"record for row {r.row_index} of {r.file} belongs to shard "
                             f"{r.shard_id!r}, not {shard_id!r}")
    data = manifest_bytes(records)
    if store.exists(commit_marker(shard_id)):
        raise ValueError(f"shard {shard_id} is already committed; its manifest part "
                         f"{store.url(manifest_part(shard_id))} is final")
    store.write(manifest_part(shard_id), data)
    return hashlib.sha256(data).hexdigest()


def commit_shard(store: RunStore, shard_id: str, summary: dict) -> bool:
    """Create `commits/{shard}.json` once; True if this call committed the shard.

    `summary["rows"]` (the shard's input row count) is required; the marker adds the
    manifest part's sha256, size and status counts, read back from storage, so a marker
    never exists without the part it describes. Refuses a part whose counts do not add
    up to `rows`.
    """
    if not isinstance(summary.get("rows"), int):
        raise ValueError(f"commit summary for shard {shard_id} lacks an integer 'rows'")
    part = manifest_part(shard_id)
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
                  manifest_bytes=len(data), **counts)
    return store.create_once(commit_marker(shard_id), _json_bytes(marker))


def read_commit(store: RunStore, shard_id: str) -> dict:
    return json.loads(store.read(commit_marker(shard_id)))


def committed_shards(store: RunStore) -> set[str]:
    """Ids of committed shards (listing cache dropped first, for resume scans)."""
    store.invalidate()
    return shard_ids(COMMITS_DIR, store.list(COMMITS_DIR))


def read_manifest(store: RunStore, committed_only: bool = True,
                  columns: list[str] | None = None) -> pa.Table:
    """All manifest parts (of committed shards only, by default) as one table."""
    if committed_only:
        shards = sorted(committed_shards(store))
    else:
        store.invalidate()
        shards = sorted(shard_ids(MANIFEST_DIR, store.list(MANIFEST_DIR)))
    schema = MANIFEST_SCHEMA if columns is None else pa.schema(
        [MANIFEST_SCHEMA.field(c) for c in columns])

    def read_part(shard: str) -> pa.Table:
        data = store.read(manifest_part(shard))
        return pq.read_table(io.BytesIO(data), columns=columns, schema=MANIFEST_SCHEMA)

    with ThreadPoolExecutor(max_workers=_READ_THREADS) as pool:  # parts are small GETs
        tables = list(pool.map(read_part, shards))
    return pa.concat_tables(tables) if tables else schema.empty_table()


# --- run-level files ---------------------------------------------------------------
def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def _read_json(store: RunStore, rel: str) -> dict | None:
    try:
        return json.loads(store.read(rel))
    except FileNotFoundError:
        return None


def write_run_info(store: RunStore, info: dict) -> None:
    """`_run.json`: resolved config (already redacted by the caller), fingerprint, versions."""
    store.write(RUN_INFO, _json_bytes(info))


def read_run_info(store: RunStore) -> dict | None:
    return _read_json(store, RUN_INFO)


def write_success(store: RunStore, summary: dict) -> None:
    """`_SUCCESS.json`; `summary["totals"]` must hold int rows/ok/failed/rejected/shards."""
    totals = summary.get("totals")
    keys = ("rows", "ok", "failed", "rejected", "shards")
    if not isinstance(totals, dict) or not all(isinstance(totals.get(k), int) for k in keys):
        raise ValueError(f"success summary needs 'totals' with integer {', '.join(keys)}")
    store.write(SUCCESS, _json_bytes(summary))


def read_success(store: RunStore) -> dict | None:
    return _read_json(store, SUCCESS)
