"""`cogview-ray verify`: check a run's markers, accounting and objects the way a user
would, and report every problem found (an empty list means the run is verified)."""
from __future__ import annotations

import hashlib
import io
import json
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Mapping

import pyarrow.parquet as pq
from PIL import Image

from cogview_ray import layout
from cogview_ray import manifest as mf
from cogview_ray.records import count_reasons
from cogview_ray.sinks import iter_container, split_locator
from cogview_ray.storage import RunStore, check_relative

_SHOWN_PROBLEMS = 20
_READ_THREADS = 8


@dataclass
class VerifyReport:
    run_url: str
    problems: list[str] = field(default_factory=list)
    totals: dict[str, int] = field(default_factory=lambda: dict(
        shards=0, rows=0, ok=0, failed=0, rejected=0, objects_checked=0))
    reasons: Counter = field(default_factory=Counter)  # rows per reason code (as _SUCCESS.json, report)

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
        lines += [f"  - {p}" for p in self.problems[:_SHOWN_PROBLEMS]]
        if len(self.problems) > _SHOWN_PROBLEMS:
            lines.append(f"  ... and {len(self.problems) - _SHOWN_PROBLEMS} more")
        return "\n".join(lines)


def verify_run(uri: str, storage_options: Mapping[str, Any] | None = None,
               store: RunStore | None = None) -> VerifyReport:
    """Verify the run at `uri` (`{output.uri}/{run_id}`); `store` overrides the URI."""
    store = store or RunStore.from_run_uri(uri, storage_options)
    report = VerifyReport(run_url=store.url(""))
    problems = report.problems
    store.invalidate()
    if not store.exists(layout.RUN_INFO):
        problems.append(f"{layout.RUN_INFO} is missing")

    seen_rows: dict[tuple, str] = {}
    seen_ids: dict[str, str] = {}
    seen_keys: dict[str, str] = {}
    shards = sorted(mf.committed_shards(store))
    for shard in shards:
        rows = _check_shard(store, shard, problems)
        if rows is None:
            continue
        report.totals["shards"] += 1
        report.reasons.update(count_reasons(r["reason"] for r in rows))
        ok_rows = []
        for r in rows:
            report.totals["rows"] += 1
            if r["status"] in mf.STATUSES:
                report.totals[r["status"]] += 1
            where = f"shard {shard} row {r['row_index']} of {r['file']}"
            loc = (r["file"], r["row_index"])
            if loc in seen_rows:
                problems.append(f"{where} also appears in shard {seen_rows[loc]}")
            seen_rows[loc] = shard
            if r["status"] != "rejected" and r["id"] is not None:
                if r["id"] in seen_ids:
                    problems.append(f"id {r['id']!r} is duplicated (shards {seen_ids[r['id']]} "
                                    f"and {shard})")
                seen_ids[r["id"]] = shard
            if r["status"] == "ok":
                if _check_key(r, where, problems):
                    if r["key"] in seen_keys:
                        problems.append(f"{where}: key {r['key']} is also the output of shard "
                                        f"{seen_keys[r['key']]}")
                    seen_keys[r["key"]] = shard
                    ok_rows.append(r)
        _check_objects(store, ok_rows, report)
    _check_success(store, report)
    return report


def _check_shard(store: RunStore, shard: str, problems: list[str]) -> list[dict] | None:
    """Rows of a committed shard's manifest part, or None if marker or part is broken."""
    try:
        marker = json.loads(store.read(layout.commit_marker(shard)))
    except (ValueError, FileNotFoundError):
        problems.append(f"shard {shard}: commit marker is unreadable")
        return None
    part = layout.manifest_part(shard)
    try:
        data = store.read(part)
    except FileNotFoundError:
        problems.append(f"shard {shard}: commit marker exists but manifest part {part} is missing")
        return None
    if hashlib.sha256(data).hexdigest() != marker.get("manifest_sha256"):
        problems.append(f"shard {shard}: manifest part sha256 does not match its commit marker")
    try:
        rows = pq.read_table(io.BytesIO(data), schema=mf.MANIFEST_SCHEMA).to_pylist()
    except Exception as err:  # noqa: BLE001 - any decode failure is a finding
        problems.append(f"shard {shard}: manifest part is not readable Parquet ({type(err).__name__})")
        return None
    statuses = [r["status"] for r in rows]
    bad = sorted({s for s in statuses if s not in mf.STATUSES}, key=str)
    if bad:
        problems.append(f"shard {shard}: unknown status values {bad}")
    counts = {s: statuses.count(s) for s in mf.STATUSES}
    expected = marker.get("rows")
    if sum(counts.values()) != expected or len(rows) != expected:
        problems.append(f"shard {shard}: ok {counts['ok']} + failed {counts['failed']} + rejected "
                        f"{counts['rejected']} != {expected} rows in the shard")
    for s in mf.STATUSES:
        if marker.get(s) != counts[s]:
            problems.append(f"shard {shard}: marker says {s}={marker.get(s)}, manifest has {counts[s]}")
    if any(r["shard_id"] != shard for r in rows):
        problems.append(f"shard {shard}: manifest part holds rows of another shard")
    return rows


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


def _check_success(store: RunStore, report: VerifyReport) -> None:
    success = mf.read_success(store)
    if success is None:
        return
    totals = success.get("totals")
    if not isinstance(totals, dict):
        report.problems.append(f"{layout.SUCCESS} has no totals")
        return
    for k in ("shards", "rows", "ok", "failed", "rejected"):
        if k in totals and totals[k] != report.totals[k]:
            report.problems.append(f"{layout.SUCCESS} says {k}={totals[k]} but committed manifests "
                                   f"have {report.totals[k]}")
