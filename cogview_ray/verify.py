"""`cogview-ray verify`: check a run's markers, row coverage, accounting and objects the way a
user would, one manifest part at a time, and report every problem found (none: verified)."""
from __future__ import annotations

import hashlib
import io
import json
from collections import Counter, defaultdict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from cogview_ray import layout
from cogview_ray import manifest as mf
from cogview_ray.coverage import RowCoverage, describe_rows, describe_runs, planned_rows, row_runs
from cogview_ray.duplicates import DuplicateFinder
from cogview_ray.run_logs import describe_logs
from cogview_ray.runtime_check import describe_runtime, read_runtime
from cogview_ray.sinks import iter_container, split_locator
from cogview_ray.storage import RunStore, check_relative

_SHOWN_PROBLEMS = 20
_READ_THREADS = 8  # also how many manifest parts are read ahead of the one being checked
_SPILL_ROWS = 1 << 19  # ids (and keys) held in memory before they spill to local disk
_SHOWN_DUPLICATES = 1000  # per kind; the rest are counted in one sentence
_ROW_COLUMNS = ["shard_id", "id", "file", "row_index", "status", "reason", "key"]
_OBJECT_COLUMNS = ["bytes", "sha256", "width", "height"]
_ID_SCHEMA = pa.schema([("value", pa.string()), ("shard", pa.string())])
_KEY_SCHEMA = pa.schema([("value", pa.string()), ("shard", pa.string()), ("file", pa.string()),
                         ("row_index", pa.int64())])
# Keys that `_check_key` passes, recognised without a Python call per row: a relative path under
# an output folder whose segments cannot be '.', '..' or empty, then an optional '#member'.
_SEGMENT = r"[A-Za-z0-9_-][A-Za-z0-9_.-]*"
_PLAIN_KEY = rf"^({'|'.join(layout.OUTPUT_DIRS)})/({_SEGMENT}/)*{_SEGMENT}(#.*)?$"


@dataclass
class VerifyReport:
    run_url: str
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what could not be checked, or a run in progress
    totals: dict[str, int] = field(default_factory=lambda: dict(
        shards=0, rows=0, ok=0, failed=0, rejected=0, objects_checked=0))
    reasons: Counter = field(default_factory=Counter)  # rows per reason code (as _SUCCESS.json, report)
    logs: Optional[str] = None  # where the driver logs and worker errors are (`_logs/`), if any
    runtime: Optional[str] = None  # what rendered it (`_runtime.json`): torch, device, attention, ...

    @property
    def verified(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        t = self.totals
        head = "verified" if self.verified else f"{len(self.problems)} problem(s)"
        lines = [
            f"{self.run_url}: {head}",
            f"  shards {t['shards']}  rows {t['rows']}  ok {t['ok']}  failed {t['failed']}"
            f"  rejected {t['rejected']}  objects checked {t['objects_checked']}",
        ]
        if self.reasons:
            lines.append("  reasons  " + "  ".join(f"{k} {v}" for k, v in sorted(self.reasons.items())))
        if self.runtime:
            lines.append(f"  runtime  {self.runtime}")
        lines += [f"  note: {n}" for n in self.notes]
        if self.logs:
            lines.append(f"  logs: {self.logs}")
        lines += [f"  - {p}" for p in self.problems[:_SHOWN_PROBLEMS]]
        if len(self.problems) > _SHOWN_PROBLEMS:
            lines.append(f"  ... and {len(self.problems) - _SHOWN_PROBLEMS} more")
        return "\n".join(lines)


@dataclass
class _Loaded:
    """One committed shard as read and decoded from the store; `table` is None when the marker
    or part is broken (`problems` say how)."""

    shard: str
    marker: Optional[dict] = None
    table: Optional[pa.Table] = None
    problems: list[str] = field(default_factory=list)


def verify_run(uri: str, storage_options: Mapping[str, Any] | None = None,
               store: RunStore | None = None, check_objects: bool = True) -> VerifyReport:
    """Verify the run at `uri` (`{output.uri}/{run_id}`); `store` overrides the URI.
    `check_objects=False` reads no images: markers, coverage and accounting only.

    Memory stays bounded whatever the run's size: parts are read one at a time (a few ahead),
    only the columns checked; ids and keys are checked for duplicates by `DuplicateFinder`,
    row coverage is kept as intervals per input file."""
    store = store or RunStore.from_run_uri(uri, storage_options)
    report = VerifyReport(run_url=store.url(""))
    problems = report.problems
    store.invalidate()
    info = _read_json(store, layout.RUN_INFO, problems)
    if info is None:
        problems.append(f"{layout.RUN_INFO} is missing")
    runtime = read_runtime(store)  # None for runs made before `_runtime.json`
    report.runtime = describe_runtime(runtime) if runtime else None
    coverage = RowCoverage(planned_rows((info or {}).get("fingerprint")))
    if info is not None and coverage.planned is None:
        report.notes.append(f"{layout.RUN_INFO} records no per-file row counts of the input: rows that "
                            f"no shard holds cannot be found")
    success = _read_json(store, layout.SUCCESS, problems)
    columns = _ROW_COLUMNS + (_OBJECT_COLUMNS if check_objects else [])
    generations = mf.committed_generations(store)  # each shard's current (newest) marker
    shards = sorted(generations)
    unranged = 0
    with DuplicateFinder(_ID_SCHEMA, _SPILL_ROWS) as ids, DuplicateFinder(_KEY_SCHEMA, _SPILL_ROWS) as keys:
        for loaded in _prefetch(lambda shard: _load(store, shard, columns, generations[shard]), shards):
            ranged = _marker_range(loaded.marker) is not None
            unranged += loaded.marker is not None and not ranged
            problems += loaded.problems
            table = loaded.table
            if table is None:
                if ranged:  # the part is reported; its marker still says which rows it stands for
                    file, start, stop = _marker_range(loaded.marker)
                    coverage.add(file, [(start, stop)], loaded.shard)
                continue
            report.totals["shards"] += 1
            _check_accounting(loaded.shard, loaded.marker, table, report)
            _check_rows(loaded.shard, loaded.marker, table, coverage, problems)
            ok_rows = _check_keys(loaded.shard, table, problems)
            status = table["status"]
            with_id = table.filter(pc.fill_null(pc.not_equal(status, "rejected"), True))
            ids.add({"value": with_id["id"], "shard": _repeat(loaded.shard, with_id.num_rows)})
            keys.add({"value": ok_rows["key"], "shard": _repeat(loaded.shard, ok_rows.num_rows),
                      "file": ok_rows["file"], "row_index": ok_rows["row_index"]})
            if check_objects:
                _check_objects(store, ok_rows.select(["id", "key"] + _OBJECT_COLUMNS).to_pylist(), report)
        _report_duplicates(ids, keys, problems)
    if unranged:
        report.notes.append(f"{unranged} of {len(shards)} commit markers record no row range (written by an "
                            f"older cogview-ray): their shards are checked by counts and manifest rows")
    gaps, in_progress = coverage.check(complete=success is not None)
    problems += gaps
    report.notes += in_progress
    _check_success(success, report)
    report.logs = describe_logs(store)  # logs are never outputs: only pointed to
    return report


def _prefetch(fn: Callable, items: Iterable, depth: int = _READ_THREADS) -> Iterator:
    """`fn(item)` for each item, in order, with at most `depth` calls running ahead: parts are
    small GETs worth overlapping, but never all in memory at once."""
    with ThreadPoolExecutor(max_workers=depth) as pool:
        window: deque = deque()
        for item in items:
            window.append(pool.submit(fn, item))
            if len(window) >= depth:
                yield window.popleft().result()
        while window:
            yield window.popleft().result()


def _read_json(store: RunStore, rel: str, problems: list[str]) -> Optional[dict]:
    try:
        value = json.loads(store.read(rel))
    except FileNotFoundError:
        return None
    except ValueError:
        value = None
    if not isinstance(value, dict):
        problems.append(f"{rel} is not a JSON object")
        return {}
    return value


def _load(store: RunStore, shard: str, columns: list[str], generation: int) -> _Loaded:
    """The shard's current marker and the needed columns of the manifest part it names. Runs ahead
    in threads: reading, hashing and decoding release the GIL."""
    try:
        marker = json.loads(store.read(layout.commit_marker(shard, generation)))
    except (ValueError, FileNotFoundError):
        marker = None
    if not isinstance(marker, dict):
        return _Loaded(shard, problems=[f"shard {shard}: commit marker is unreadable"])
    try:  # the marker names its part (attempt-unique names); markers from before that, the fixed one
        part = mf.part_of(marker, shard)
    except mf.CorruptRecord:
        return _Loaded(shard, marker, problems=[f"shard {shard}: commit marker names {marker.get('manifest')!r}, "
                                                f"which is not a manifest part of shard {shard}"])
    loaded = _Loaded(shard, marker)
    try:
        data = store.read(part)
    except FileNotFoundError:
        loaded.problems.append(f"shard {shard}: commit marker exists but manifest part {part} is missing")
        return loaded
    if hashlib.sha256(data).hexdigest() != marker.get("manifest_sha256"):
        loaded.problems.append(f"shard {shard}: manifest part sha256 does not match its commit marker")
    try:
        loaded.table = pq.read_table(io.BytesIO(data), columns=columns, schema=mf.MANIFEST_SCHEMA,
                                     use_threads=False)  # parts are decoded in parallel already
    except Exception as err:  # noqa: BLE001 - any decode failure is a finding
        loaded.problems.append(f"shard {shard}: manifest part is not readable Parquet ({type(err).__name__})")
    return loaded


def _marker_range(marker: Optional[dict]) -> Optional[tuple[str, int, int]]:
    """`(file, row_start, row_stop)` of a marker, or None (no marker, or one from before ranges)."""
    if not marker:
        return None
    file, start, stop = marker.get("file"), marker.get("row_start"), marker.get("row_stop")
    if isinstance(file, str) and isinstance(start, int) and isinstance(stop, int):
        return file, start, stop
    return None


def _value_counts(column: pa.ChunkedArray) -> dict:
    return {d["values"]: d["counts"] for d in pc.value_counts(column).to_pylist()}


def _repeat(value: str, n: int) -> pa.Array:
    return pa.array([value], pa.string()).take(pa.array(np.zeros(n, np.int64)))


def _check_accounting(shard: str, marker: dict, table: pa.Table, report: VerifyReport) -> None:
    """Status counts against the marker, reasons and totals."""
    problems = report.problems
    statuses = _value_counts(table["status"])
    bad = sorted((s for s in statuses if s not in mf.STATUSES), key=str)
    if bad:
        problems.append(f"shard {shard}: unknown status values {bad}")
    counts = {s: statuses.get(s, 0) for s in mf.STATUSES}
    expected = marker.get("rows")
    if sum(counts.values()) != expected or table.num_rows != expected:
        problems.append(f"shard {shard}: ok {counts['ok']} + failed {counts['failed']} + rejected "
                        f"{counts['rejected']} != {expected} rows in the shard")
    for s in mf.STATUSES:
        if marker.get(s) != counts[s]:
            problems.append(f"shard {shard}: marker says {s}={marker.get(s)}, manifest has {counts[s]}")
    if (pc.sum(pc.equal(table["shard_id"], shard)).as_py() or 0) != table.num_rows:
        problems.append(f"shard {shard}: manifest part holds rows of another shard")
    report.reasons.update({k: v for k, v in _value_counts(table["reason"]).items() if k})
    report.totals["rows"] += table.num_rows
    for s in mf.STATUSES:
        report.totals[s] += counts[s]


def _check_rows(shard: str, marker: dict, table: pa.Table, coverage: RowCoverage, problems: list[str]) -> None:
    """The part's (file, row_index) set: no row twice, exactly the marker's range when it has one;
    its rows join the run's coverage."""
    files, rows = table["file"], table["row_index"]
    if files.null_count or rows.null_count:
        problems.append(f"shard {shard}: manifest rows without a file or row_index")
        keep = pc.and_(pc.is_valid(files), pc.is_valid(rows))
        files, rows = files.filter(keep), rows.filter(keep)
    names = pc.unique(files).to_pylist()
    held: dict[str, list[tuple[int, int]]] = {}
    for name in sorted(names):
        of_file = rows if len(names) == 1 else rows.filter(pc.equal(files, name))
        runs, repeated = row_runs(of_file.to_numpy())
        for r in repeated[:_SHOWN_PROBLEMS].tolist():
            problems.append(f"shard {shard} row {r} of {name} also appears in shard {shard}")
        coverage.add(name, runs, shard)
        held[name] = runs
    declared = _marker_range(marker)
    if declared is not None:
        file, start, stop = declared
        if held != ({file: [(start, stop)]} if stop > start else {}):
            holds = "; ".join(f"rows {describe_runs(runs)} of {name}" for name, runs in held.items()) or "no rows"
            problems.append(f"shard {shard}: manifest part holds {holds}, but its commit marker covers "
                            f"{describe_rows(start, stop) if stop > start else 'no rows'} of {file}")


def _check_keys(shard: str, table: pa.Table, problems: list[str]) -> pa.Table:
    """The ok rows whose key is a valid output key (the others are reported)."""
    ok = table.filter(pc.equal(table["status"], "ok"))
    valid = pc.fill_null(pc.match_substring_regex(ok["key"], _PLAIN_KEY), False).to_numpy(zero_copy_only=False)
    for i in np.flatnonzero(~valid).tolist():  # the rare rest, one by one with the exact message
        r = ok.slice(i, 1).select(["key", "file", "row_index"]).to_pylist()[0]
        valid[i] = _check_key(r, f"shard {shard} row {r['row_index']} of {r['file']}", problems)
    return ok if valid.all() else ok.filter(pa.array(valid))


def _report_duplicates(ids: DuplicateFinder, keys: DuplicateFinder, problems: list[str]) -> None:
    pairs, count = ids.duplicates(_SHOWN_DUPLICATES)
    problems += [f"id {b['value']!r} is duplicated (shards {a['shard']} and {b['shard']})" for a, b in pairs]
    if count > len(pairs):
        problems.append(f"... and {count - len(pairs)} more duplicated ids")
    pairs, count = keys.duplicates(_SHOWN_DUPLICATES)
    problems += [f"shard {b['shard']} row {b['row_index']} of {b['file']}: key {b['value']} is also the output "
                 f"of shard {a['shard']}" for a, b in pairs]
    if count > len(pairs):
        problems.append(f"... and {count - len(pairs)} more keys that are the output of two rows")


def _check_key(r: dict, where: str, problems: list[str]) -> bool:
    key = r["key"]
    if not key:
        problems.append(f"{where}: status ok but no output key")
        return False
    rel, _ = split_locator(key)
    try:
        check_relative(rel)
    except ValueError:
        problems.append(f"{where}: key {key!r} is outside the run prefix")
        return False
    if not layout.is_output(rel):
        problems.append(f"{where}: key {key!r} is not under {' or '.join(d + '/' for d in layout.OUTPUT_DIRS)}")
        return False
    return True


def _check_objects(store: RunStore, ok_rows: list[dict], report: VerifyReport) -> None:
    """Objects of one shard's ok rows: files are fetched in parallel, containers streamed."""
    by_container: dict[str, dict[str, dict]] = defaultdict(dict)
    files = []
    for r in ok_rows:
        rel, member = split_locator(r["key"])
        if member is None:
            files.append(r)
        else:
            by_container[rel][member] = r

    def fetch(r: dict) -> bytes | None:
        try:
            return store.read(r["key"])
        except FileNotFoundError:
            return None

    with ThreadPoolExecutor(max_workers=_READ_THREADS) as pool:
        for r, data in zip(files, pool.map(fetch, files)):
            if data is None:
                report.problems.append(f"object {r['key']} of ok row {r['id']!r} is missing")
            else:
                _check_image(r, data, report)
    for rel, members in sorted(by_container.items()):
        try:
            for name, data in iter_container(store, rel):
                r = members.pop(name, None)
                if r is not None:
                    _check_image(r, data, report)
        except FileNotFoundError:
            report.problems.append(f"shard container {rel} is missing")
        except Exception as err:  # noqa: BLE001 - a corrupt container is a finding
            report.problems.append(f"shard container {rel} is unreadable ({type(err).__name__})")
        for r in members.values():
            report.problems.append(f"object {r['key']} of ok row {r['id']!r} is missing")


def _check_image(r: dict, data: bytes, report: VerifyReport) -> None:
    report.totals["objects_checked"] += 1
    key, problems = r["key"], report.problems
    if r["bytes"] != len(data):
        problems.append(f"object {key} has {len(data)} bytes, manifest says {r['bytes']}")
    if r["sha256"] != hashlib.sha256(data).hexdigest():
        problems.append(f"object {key} sha256 does not match the manifest")
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            size = im.size
    except Exception as err:  # noqa: BLE001 - any decode failure is a finding
        problems.append(f"object {key} does not decode as an image ({type(err).__name__})")
        return
    if size != (r["width"], r["height"]):
        problems.append(f"object {key} is {size[0]}x{size[1]}, manifest says "
                        f"{r['width']}x{r['height']}")


def _check_success(success: Optional[dict], report: VerifyReport) -> None:
    if not success:  # a run in progress (or an unreadable file, already reported)
        return
    totals = success.get("totals")
    if not isinstance(totals, dict):
        report.problems.append(f"{layout.SUCCESS} has no totals")
        return
    for k in ("shards", "rows", "ok", "failed", "rejected"):
        if k in totals and totals[k] != report.totals[k]:
            report.problems.append(f"{layout.SUCCESS} says {k}={totals[k]} but committed manifests "
                                   f"have {report.totals[k]}")
