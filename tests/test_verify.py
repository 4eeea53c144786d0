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
