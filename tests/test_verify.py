"""verify_run: passes a clean fabricated run, and finds each kind of corruption."""
import dataclasses
import json

import numpy as np
import pytest

from cogview_ray import manifest as mf
from cogview_ray.manifest import RowRecord
from cogview_ray.sinks import encode_image, make_sink, sha256_hex
from cogview_ray.storage import RunStore
from cogview_ray.verify import verify_run

pytestmark = [pytest.mark.timeout(60)]

SHARDS = ("00000", "00001")
SIZES = [(16, 24), (32, 16)]  # (height, width) of the two ok rows in each shard


def record(shard, i, status, **kw):
    base = dict(run_id="run1", shard_id=shard, id=f"id-{i}", file="in.parquet", row_index=i,
                prompt=f"prompt {i}", negative_prompt=None, seed=i, height=16, width=24,
                num_inference_steps=2, guidance_scale=5.0, status=status, attempt=1)
    base.update(kw)
    return RowRecord(**base)


def fabricate(store, fmt="files", image_format="png", mutate=None, success=True):
    """A complete run of two shards: per shard 2 ok rows, 1 failed, 1 rejected.

    `mutate(shard, records)` may edit the records before the manifest is written."""
    mf.write_run_info(store, {"config": {"output": {"format": fmt}}})
    totals = dict(rows=0, ok=0, failed=0, rejected=0, shards=len(SHARDS))
    for s, shard in enumerate(SHARDS):
        sink = make_sink(fmt, store, shard, image_format)
        records = []
        for j, (h, w) in enumerate(SIZES):
            i = 10 * s + j
            data = encode_image(np.full((h, w, 3), i * 7 % 256, np.uint8), image_format, 90)
            key = sink.add(f"id-{i}", data, {"id": f"id-{i}", "seed": i})
            records.append(record(shard, i, "ok", height=h, width=w, key=key, bytes=len(data),
                                  sha256=sha256_hex(data)))
        sink.close()
        records.append(record(shard, 10 * s + 2, "failed", reason="nonfinite_output"))
        records.append(record(shard, 10 * s + 3, "rejected", reason="empty_prompt", prompt=""))
        if mutate:
            mutate(shard, records)
        mf.write_manifest_part(store, shard, records)
        assert mf.commit_shard(store, shard, {"rows": len(records)})
        counts = mf.count_statuses(r.status for r in records)
        totals["rows"] += len(records)
        for k, v in counts.items():
            totals[k] += v
    if success:
        mf.write_success(store, {"totals": totals})
    return store


@pytest.fixture
def local(tmp_path):
    return RunStore(str(tmp_path / "out"), "run1")


def run_verify(store, options=None):
    return verify_run(store.url(), options)


def assert_problems(report, *fragments):
    """Each fragment is found in some problem, and every problem matches a fragment."""
    for frag in fragments:
        assert any(frag in p for p in report.problems), (frag, report.problems)
    for p in report.problems:
        assert any(frag in p for frag in fragments), (p, fragments)
    assert not report.verified and "problem" in report.summary()


@pytest.mark.parametrize("image_format", ["png", "jpeg", "webp"])
@pytest.mark.parametrize("fmt", ["files", "webdataset", "parquet"])
def test_clean_run_verifies(local, fmt, image_format):
    fabricate(local, fmt, image_format)
    report = run_verify(local)
    assert report.problems == []
    assert report.verified
    assert report.totals == dict(shards=2, rows=8, ok=4, failed=2, rejected=2, objects_checked=4)
    assert "verified" in report.summary() and "ok 4" in report.summary()


@pytest.mark.s3
@pytest.mark.parametrize("fmt", ["files", "webdataset"])
def test_s3_run_verifies_and_missing_object_found(s3_bucket, s3_storage_options, fmt):
    store = RunStore(f"s3://{s3_bucket}/out", "run1", s3_storage_options)
    fabricate(store, fmt)
    report = run_verify(store, s3_storage_options)
    assert report.problems == [] and report.totals["objects_checked"] == 4
    store.delete("images/00001/id-11.png" if fmt == "files" else "shards/00001.tar")
    report = run_verify(store, s3_storage_options)
    assert_problems(report, "missing")
    from tests.conftest import PLANTED_SECRET
    assert PLANTED_SECRET not in report.summary()


def test_missing_object(local):
    fabricate(local)
    local.delete("images/00000/id-1.png")
    assert_problems(run_verify(local), "object images/00000/id-1.png of ok row 'id-1' is missing")


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_missing_member_and_container(local, fmt):
    ext = "tar" if fmt == "webdataset" else "parquet"

    def mutate(shard, records):
        if shard == "00000":
            records[0] = dataclasses.replace(records[0], key=f"shards/00000.{ext}#nobody.png")

    fabricate(local, fmt, mutate=mutate)
    assert_problems(run_verify(local), "nobody.png of ok row 'id-0' is missing")
    local.delete(f"shards/00001.{ext}")
    assert_problems(run_verify(local), "nobody.png of ok row 'id-0' is missing",
                    f"shard container shards/00001.{ext} is missing",
                    "of ok row 'id-10' is missing", "of ok row 'id-11' is missing")


def test_wrong_sha(local):
    def mutate(shard, records):
        records[0] = dataclasses.replace(records[0], sha256="0" * 64)

    fabricate(local, mutate=mutate)
    assert_problems(run_verify(local), "id-0.png sha256 does not match",
                    "id-10.png sha256 does not match")


def test_wrong_byte_count(local):
    def mutate(shard, records):
        if shard == "00001":
            records[1] = dataclasses.replace(records[1], bytes=records[1].bytes + 1)

    fabricate(local, "webdataset", mutate=mutate)
    assert_problems(run_verify(local), "shards/00001.tar#id-11.png has")


def test_wrong_dimensions(local):
    def mutate(shard, records):
        if shard == "00000":
            records[1] = dataclasses.replace(records[1], height=16, width=32)

    fabricate(local, "parquet", mutate=mutate)
    assert_problems(run_verify(local), "id-1.png is 16x32, manifest says 32x16")


def test_undecodable_object(local):
    fabricate(local)
    local.write("images/00000/id-0.png", b"not an image at all")
    assert_problems(run_verify(local), "id-0.png does not decode", "id-0.png has 19 bytes",
                    "id-0.png sha256")


def test_marker_without_manifest(local):
    fabricate(local, success=False)
    local.delete("manifest/00001.parquet")
    assert_problems(run_verify(local), "shard 00001: commit marker exists but manifest part")


def test_manifest_changed_after_commit(local):
    fabricate(local, success=False)
    table = mf.read_manifest(local)
    records = [RowRecord(**r) for r in table.to_pylist() if r["shard_id"] == "00000"]
    records[2] = dataclasses.replace(records[2], reason="out_of_memory")
    local.write("manifest/00000.parquet", mf.manifest_bytes(records))  # behind the API's back
    assert_problems(run_verify(local), "shard 00000: manifest part sha256 does not match")


def test_duplicate_id(local):
    def mutate(shard, records):
        if shard == "00001":
            records[2] = dataclasses.replace(records[2], id="id-0")  # a failed row claiming an ok row's id

    fabricate(local, mutate=mutate)
    assert_problems(run_verify(local), "id 'id-0' is duplicated (shards 00000 and 00001)")


def test_same_input_row_in_two_shards(local):
    def mutate(shard, records):
        if shard == "00001":
            records[3] = dataclasses.replace(records[3], row_index=3)  # shard 00000's rejected row

    fabricate(local, mutate=mutate)
    assert_problems(run_verify(local), "shard 00001 row 3 of in.parquet also appears in shard 00000")


def test_accounting_mismatch(local):
    fabricate(local, success=False)
    marker = json.loads(local.read("commits/00001.json"))
    marker["rows"] = 5  # the shard had 5 input rows; the manifest accounts for 4
    local.write("commits/00001.json", json.dumps(marker).encode())
    assert_problems(run_verify(local),
                    "shard 00001: ok 2 + failed 1 + rejected 1 != 5 rows in the shard")


def test_marker_counts_disagree(local):
    fabricate(local, success=False)
    marker = json.loads(local.read("commits/00000.json"))
    marker["ok"], marker["failed"] = 3, 0
    local.write("commits/00000.json", json.dumps(marker).encode())
    assert_problems(run_verify(local), "marker says ok=3", "marker says failed=0")


def test_key_outside_run_prefix(local):
    def mutate(shard, records):
        if shard == "00000":
            records[0] = dataclasses.replace(records[0], key="../run2/images/00000/id-0.png")

    fabricate(local, mutate=mutate)
    assert_problems(run_verify(local), "is outside the run prefix")


def test_success_totals_disagree(local):
    fabricate(local, success=False)
    mf.write_success(local, {"totals": dict(rows=8, ok=5, failed=2, rejected=2, shards=2)})
    assert_problems(run_verify(local), "_SUCCESS.json says ok=5 but committed manifests have 4")
    local.delete("_SUCCESS.json")
    assert run_verify(local).verified  # a run still in progress is consistent


def test_missing_run_info(local):
    fabricate(local)
    local.delete("_run.json")
    assert_problems(run_verify(local), "_run.json is missing")


def test_uncommitted_part_is_ignored(local):
    fabricate(local)
    mf.write_manifest_part(local, "00002", [record("00002", 99, "ok", key="images/00002/x.png")])
    assert run_verify(local).verified


# --- row coverage: markers record ranges; _run.json records the input ------------------
def commit_range(store, shard, file, start, stop, rows=None, ranged=True):
    """Commit `shard` with failed rows `rows` (default [start, stop)) of `file`; no objects."""
    rows = range(start, stop) if rows is None else rows
    records = [record(shard, i, "failed", id=f"{shard}-{i}", file=file, reason="nonfinite_output")
               for i in rows]
    mf.write_manifest_part(store, shard, records)
    summary = {"rows": len(records)}
    if ranged:
        summary.update(file=file, row_start=start, row_stop=stop)
    assert mf.commit_shard(store, shard, summary)
    return len(records)


def ranged_run(store, ranges, files=(("in.parquet", 12),), planned_rows=None, success=True, ranged=True):
    """A run planned over `files` (path relative to the dataset root, rows) whose committed
    shards are `ranges`: {shard: (file as the planner names it, start, stop)}."""
    fingerprint = {"version": 3, "files": [{"path": p, "size": 1, "sha256": "0" * 64, "num_rows": n}
                                           for p, n in files],
                   "planned_rows": sum(n for _, n in files) if planned_rows is None else planned_rows}
    mf.write_run_info(store, {"config": {}, "fingerprint": fingerprint})
    rows = sum(commit_range(store, shard, *where, ranged=ranged) for shard, where in ranges.items())
    if success:
        mf.write_success(store, {"totals": dict(rows=rows, ok=0, failed=rows, rejected=0, shards=len(ranges))})
    return store


IN = "/data/in.parquet"  # the planner's name for the fingerprint's in.parquet


def test_ranged_run_verifies_across_files_with_suffix_names(local):
    ranged_run(local, {"f00000-000000": ("/data/a.parquet", 0, 5), "f00001-000000": ("/data/sub/a.parquet", 0, 2),
                       "f00001-000001": ("/data/sub/a.parquet", 2, 3)},
               files=(("a.parquet", 5), ("sub/a.parquet", 3)))
    report = run_verify(local)
    assert report.problems == [] and report.notes == []
    assert report.totals["rows"] == 8 and report.totals["shards"] == 3


def test_gap_left_by_resume_with_larger_shard_size(local):
    # shard_size 4 committed [0, 4); the resume with shard_size 5 skipped its committed shard
    # f00000-000000 and rendered [5, 10) and [10, 12): row 4 was never rendered
    ranged_run(local, {"f00000-000000": (IN, 0, 4), "f00000-000001": (IN, 5, 10), "f00000-000002": (IN, 10, 12)})
    assert_problems(run_verify(local), f"row 4 of {IN} is in no committed shard")


def test_overlap_left_by_resume_with_smaller_shard_size(local):
    # shard_size 6 committed [0, 6); the resume with shard_size 4 rendered [4, 8) and [8, 12)
    ranged_run(local, {"f00000-000000": (IN, 0, 6), "f00000-000001": (IN, 4, 8), "f00000-000002": (IN, 8, 12)})
    assert_problems(run_verify(local), f"shard f00000-000001 rows 4-5 of {IN} also appear in shard f00000-000000")


def test_gap_of_a_run_in_progress_is_a_note(local):
    ranged_run(local, {"f00000-000000": (IN, 0, 4), "f00000-000002": (IN, 8, 12)}, success=False)
    report = run_verify(local)
    assert report.verified
    assert report.notes == [f"run in progress: 4 of 12 planned rows are in no committed shard yet "
                            f"(rows 4-7 of {IN})"]
    assert "note: run in progress" in report.summary()
    mf.write_success(local, {"totals": dict(rows=8, ok=0, failed=8, rejected=0, shards=2)})
    assert_problems(run_verify(local), f"rows 4-7 of {IN} are in no committed shard")


def test_input_file_without_any_shard(local):
    ranged_run(local, {"f00000-000000": ("/data/a.parquet", 0, 2)}, files=(("a.parquet", 2), ("b.parquet", 3)))
    assert_problems(run_verify(local), "rows 0-2 of b.parquet are in no committed shard")


def test_manifest_rows_differ_from_marker_range(local):
    mf.write_run_info(local, {"config": {}, "fingerprint": {
        "version": 3, "files": [{"path": "in.parquet", "size": 1, "num_rows": 8}], "planned_rows": 8}})
    commit_range(local, "s0", IN, 0, 4)
    commit_range(local, "s1", IN, 4, 8, rows=[4, 5, 6, 9])
    mf.write_success(local, {"totals": dict(rows=8, ok=0, failed=8, rejected=0, shards=2)})
    assert_problems(run_verify(local),
                    f"shard s1: manifest part holds rows 4-6, 9 of {IN}, but its commit marker covers rows 4-7 of {IN}",
                    f"row 7 of {IN} is in no committed shard",
                    f"shard s1 row 9 of {IN} is past the 8 rows planned from that file")


def test_marker_range_of_another_file(local):
    ranged_run(local, {"s0": (IN, 0, 12)})
    marker = json.loads(local.read("commits/s0.json"))
    marker["file"] = "/data/other.parquet"
    local.write("commits/s0.json", json.dumps(marker).encode())
    assert_problems(run_verify(local), f"shard s0: manifest part holds rows 0-11 of {IN}, but its commit "
                                       f"marker covers rows 0-11 of /data/other.parquet")


def test_rows_of_a_file_outside_the_input(local):
    ranged_run(local, {"s0": (IN, 0, 12), "s1": ("/data/other.parquet", 0, 2)})
    assert_problems(run_verify(local), "shard s1 holds rows of /data/other.parquet, which is not an input file")


def test_limit_cuts_the_planned_rows(local):
    files = (("a.parquet", 10), ("b.parquet", 10))
    ranged_run(local, {"s0": ("/d/a.parquet", 0, 10), "s1": ("/d/b.parquet", 0, 3)}, files=files, planned_rows=13)
    assert run_verify(local).problems == []
    local.delete("commits/s1.json")
    local.delete("_SUCCESS.json")
    commit_range(local, "s1", "/d/b.parquet", 0, 5)
    assert_problems(run_verify(local), "shard s1 rows 3-4 of /d/b.parquet are past the 3 rows planned")


def test_old_run_without_ranges_verifies_by_counts_with_notes(local):
    fabricate(local)
    report = run_verify(local)
    assert report.verified
    assert report.notes == [
        "_run.json records no per-file row counts of the input: rows that no shard holds cannot be found",
        "2 of 2 commit markers record no row range (written by an older cogview-ray): their shards are "
        "checked by counts and manifest rows"]


def test_markers_without_ranges_still_find_gaps_from_manifest_rows(local):
    ranged_run(local, {"s0": (IN, 0, 4), "s1": (IN, 3, 8)}, ranged=False)
    assert_problems(run_verify(local), f"shard s1 row 3 of {IN} also appears in shard s0",
                    f"rows 8-11 of {IN} are in no committed shard")


def test_part_named_by_the_marker_is_read(local):
    """Attempt-unique part names: the marker's `manifest` key says which part is committed."""
    ranged_run(local, {"s0": (IN, 0, 12)})
    marker = json.loads(local.read("commits/s0.json"))
    records = [record("s0", i, "failed", id=f"s0-{i}", file=IN, reason="nonfinite_output") for i in range(12)]
    data = mf.manifest_bytes(records)
    local.write("manifest/s0/attempt-2.parquet", data)
    local.delete("manifest/s0.parquet")
    marker.update(manifest="manifest/s0/attempt-2.parquet", manifest_sha256=sha256_hex(data))
    local.write("commits/s0.json", json.dumps(marker).encode())
    assert run_verify(local).problems == []
    local.write("manifest/s0/attempt-3.parquet", b"an orphan of a late attempt")  # never read
    assert run_verify(local).problems == []
    marker["manifest"] = "../run2/manifest/s0.parquet"
    local.write("commits/s0.json", json.dumps(marker).encode())
    assert_problems(run_verify(local), "shard s0: commit marker names '../run2/manifest/s0.parquet', which is "
                                       "not a manifest part of shard s0",
                    "_SUCCESS.json says")  # its rows stay covered by the marker's range: no gap reported


# --- bounded memory -------------------------------------------------------------------
def test_duplicates_found_after_spilling_to_disk(local, monkeypatch):
    import cogview_ray.verify as verify

    monkeypatch.setattr(verify, "_SPILL_ROWS", 2)

    def mutate(shard, records):
        if shard == "00001":
            records[2] = dataclasses.replace(records[2], id="id-0")
            records[1] = dataclasses.replace(records[1], key=records[0].key)

    fabricate(local, mutate=mutate)
    report = verify_run(local.url(), check_objects=False)  # the objects no longer match their rows
    assert_problems(report, "id 'id-0' is duplicated (shards 00000 and 00001)",
                    "shard 00001 row 11 of in.parquet: key images/00001/id-10.png is also the output of shard 00001")


def test_no_objects_skips_images(local):
    from cogview_ray.cli import main

    fabricate(local)
    local.delete("images/00000/id-1.png")
    report = verify_run(local.url(), check_objects=False)
    assert report.problems == [] and report.totals["objects_checked"] == 0 and report.totals["ok"] == 4
    assert main(["verify", local.url(), "--no-objects"]) == 0
    assert main(["verify", local.url()]) == 1
