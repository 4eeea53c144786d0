"""The run's record: manifest parts (one Parquet per shard), commit markers, and the
run-level files `_run.json`, `_LOCK` and `_SUCCESS.json`.

Commit protocol (driver only): `write_manifest_part`, then `commit_shard`, which reads
the part back and creates `commits/{shard}.json` once. A shard is done exactly when its
marker exists; readers trust committed shards only.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from cogview_ray.sinks import check_key
from cogview_ray.storage import RunStore

STATUSES = ("ok", "failed", "rejected")
RUN_INFO, LOCK, SUCCESS = "_run.json", "_LOCK", "_SUCCESS.json"
_READ_THREADS = 8


@dataclass
class RowRecord:
    """One manifest row: the fate of one input row."""

    run_id: str
    shard_id: str
    id: str | None
    file: str
    row_index: int
    prompt: str | None
    negative_prompt: str | None
    seed: int | None
    height: int | None
    width: int | None
    num_inference_steps: int | None
    guidance_scale: float | None
    status: str  # ok | failed | rejected
    reason: str | None = None  # e.g. empty_prompt, nonfinite_output, prompt_truncated (ok)
    key: str | None = None  # output key relative to the run prefix
    bytes: int | None = None
    sha256: str | None = None
    queue_s: float | None = None
    text_encoding_s: float | None = None
    denoising_s: float | None = None
    decoding_s: float | None = None
    image_encoding_s: float | None = None
    writing_s: float | None = None
    worker_id: str | None = None
    node: str | None = None
    device: str | None = None
    attempt: int = 0
    model_path: str | None = None
    model_hash: str | None = None
    prompt_truncated: bool = False


@dataclass
class ShardResult:
    """What a worker returns for one shard: one record per input row."""

    shard_id: str
    attempt: int
    worker_id: str
    node: str
    device: str
    records: list[RowRecord] = field(default_factory=list)
    started_at: float = 0.0  # unix seconds
    finished_at: float = 0.0
    load_s: float = 0.0

    def counts(self) -> dict[str, int]:
        return count_statuses(r.status for r in self.records)


MANIFEST_SCHEMA = pa.schema([
    ("run_id", pa.string()),
    ("shard_id", pa.string()),
    ("id", pa.string()),
    ("file", pa.string()),
    ("row_index", pa.int64()),
    ("prompt", pa.string()),
    ("negative_prompt", pa.string()),
    ("seed", pa.int64()),
    ("height", pa.int32()),
    ("width", pa.int32()),
    ("num_inference_steps", pa.int32()),
    ("guidance_scale", pa.float64()),
    ("status", pa.string()),
    ("reason", pa.string()),
    ("key", pa.string()),
    ("bytes", pa.int64()),
    ("sha256", pa.string()),
    ("queue_s", pa.float64()),
    ("text_encoding_s", pa.float64()),
    ("denoising_s", pa.float64()),
    ("decoding_s", pa.float64()),
    ("image_encoding_s", pa.float64()),
    ("writing_s", pa.float64()),
    ("worker_id", pa.string()),
    ("node", pa.string()),
    ("device", pa.string()),
    ("attempt", pa.int32()),
    ("model_path", pa.string()),
    ("model_hash", pa.string()),
    ("prompt_truncated", pa.bool_()),
])
assert MANIFEST_SCHEMA.names == [f.name for f in dataclasses.fields(RowRecord)]


def count_statuses(statuses) -> dict[str, int]:
    counts = dict.fromkeys(STATUSES, 0)
    for s in statuses:
        if s not in counts:
            raise ValueError(f"status {s!r} is not one of {', '.join(STATUSES)}")
        counts[s] += 1
    return counts


def manifest_part_path(shard_id: str) -> str:
    return f"manifest/{check_key(shard_id)}.parquet"


def commit_path(shard_id: str) -> str:
    return f"commits/{check_key(shard_id)}.json"


def records_table(records: list[RowRecord]) -> pa.Table:
    """Records as a MANIFEST_SCHEMA table, in (file, row_index) order."""
    rows = sorted(records, key=lambda r: (r.file, r.row_index))
    cols = {name: [getattr(r, name) for r in rows] for name in MANIFEST_SCHEMA.names}
    return pa.table(cols, schema=MANIFEST_SCHEMA)


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
    if store.exists(commit_path(shard_id)):
        raise ValueError(f"shard {shard_id} is already committed; its manifest part "
                         f"{store.url(manifest_part_path(shard_id))} is final")
    store.write(manifest_part_path(shard_id), data)
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
    part = manifest_part_path(shard_id)
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
    return store.create_once(commit_path(shard_id), _json_bytes(marker))


def read_commit(store: RunStore, shard_id: str) -> dict:
    return json.loads(store.read(commit_path(shard_id)))


def committed_shards(store: RunStore) -> set[str]:
    """Ids of committed shards (listing cache dropped first, for resume scans)."""
    store.invalidate()
    return {n[: -len(".json")] for n in store.list("commits") if n.endswith(".json")}


def read_manifest(store: RunStore, committed_only: bool = True,
                  columns: list[str] | None = None) -> pa.Table:
    """All manifest parts (of committed shards only, by default) as one table."""
    if committed_only:
        shards = sorted(committed_shards(store))
    else:
        store.invalidate()
        shards = sorted(n[: -len(".parquet")] for n in store.list("manifest")
                        if n.endswith(".parquet"))
    schema = MANIFEST_SCHEMA if columns is None else pa.schema(
        [MANIFEST_SCHEMA.field(c) for c in columns])

    def read_part(shard: str) -> pa.Table:
        data = store.read(manifest_part_path(shard))
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


def acquire_lock(store: RunStore, owner: dict, takeover: bool = False) -> bool:
    """Take the run lock (`_LOCK`, created once); False if another driver holds it.

    `takeover=True` removes an existing (stale) lock first; that is an explicit operator
    decision, since the old holder cannot be told.
    """
    if takeover:
        store.delete(LOCK)
    content = dict(owner, lock_id=uuid.uuid4().hex)
    return store.create_once(LOCK, _json_bytes(content))


def read_lock(store: RunStore) -> dict | None:
    """The current lock holder's owner dict (plus `lock_id`), or None."""
    return _read_json(store, LOCK)


def release_lock(store: RunStore) -> None:
    store.delete(LOCK)


def write_success(store: RunStore, summary: dict) -> None:
    """`_SUCCESS.json`; `summary["totals"]` must hold int rows/ok/failed/rejected/shards."""
    totals = summary.get("totals")
    keys = ("rows", "ok", "failed", "rejected", "shards")
    if not isinstance(totals, dict) or not all(isinstance(totals.get(k), int) for k in keys):
        raise ValueError(f"success summary needs 'totals' with integer {', '.join(keys)}")
    store.write(SUCCESS, _json_bytes(summary))


def read_success(store: RunStore) -> dict | None:
    return _read_json(store, SUCCESS)
