"""Manifest parts (attempt-unique names, found through the marker), commit markers (create-once,
after the part) and run-level files (create-once)."""
import dataclasses
import hashlib
import io
import json
import random
import threading

import pyarrow.parquet as pq
import pytest

from cogview_ray import manifest as mf
from cogview_ray.manifest import RowRecord, ShardResult
from cogview_ray.storage import RunStore

pytestmark = [pytest.mark.timeout(60)]


def make_records(shard_id, n=4, start=0, file="prompts.parquet"):
    records = []
    for i in range(start, start + n):
        status = "ok" if i % 4 < 2 else ("failed" if i % 4 == 2 else "rejected")
        records.append(RowRecord(
            run_id="run1", shard_id=shard_id, id=f"id-{i}", file=file, row_index=i,
            prompt=None if status == "rejected" else f"a cat #{i}", negative_prompt=None,
            seed=2**62 + i, height=16, width=24, num_inference_steps=2, guidance_scale=5.0,
            status=status,
            reason={"ok": "prompt_truncated" if i == 1 else None, "failed": "nonfinite_output",
                    "rejected": "empty_prompt"}[status],
            key=f"images/{shard_id}/id-{i}.png" if status == "ok" else None,
            bytes=123 if status == "ok" else None, sha256="ab" * 32 if status == "ok" else None,
            queue_s=0.5, denoising_s=1.25, worker_id="w0", node="n0", device="cpu", attempt=1,
            model_path="/ckpt", model_hash="deadbeef", prompt_truncated=(i == 1),
        ))
    return records


def test_schema_matches_record_fields():
    assert mf.MANIFEST_SCHEMA.names == [f.name for f in dataclasses.fields(RowRecord)]
    assert str(mf.MANIFEST_SCHEMA.field("seed").type) == "int64"


def test_roundtrip_and_commit(store):
    records = make_records("00000") + make_records("00000", 2, start=10, file="more.parquet")
    digest = mf.write_manifest_part(store, "00000", records, token="a1")
    part = "manifest/00000/a1.parquet"
    assert digest == hashlib.sha256(store.read(part)).hexdigest()
    assert mf.committed_shards(store) == set()
    assert mf.read_manifest(store).num_rows == 0  # not committed yet
    assert mf.read_manifest(store, committed_only=False).num_rows == 6

    assert mf.commit_shard(store, "00000", {"rows": 6, "attempt": 1}, part=part) is True
    marker = mf.read_commit(store, "00000")
    assert marker["manifest_sha256"] == digest
    assert (marker["ok"], marker["failed"], marker["rejected"], marker["rows"]) == (2, 2, 2, 6)
    assert marker["attempt"] == 1 and marker["manifest"] == part == mf.part_of(marker, "00000")
    assert mf.read_part(store, "00000", columns=["row_index"]).column("row_index").to_pylist() == [10, 11, 0, 1, 2, 3]
    assert mf.committed_shards(store) == {"00000"}

    table = mf.read_manifest(store)
    assert table.schema == mf.MANIFEST_SCHEMA
    expected = sorted(records, key=lambda r: (r.file, r.row_index))
    assert table.to_pylist() == [dataclasses.asdict(r) for r in expected]
    assert mf.read_manifest(store, columns=["id", "denoising_s"]).column_names == [
        "id", "denoising_s"]


def test_commit_is_once_and_a_late_part_is_an_orphan(store):
    mf.write_manifest_part(store, "00001", make_records("00001"), token="first")
    assert mf.commit_shard(store, "00001", {"rows": 4}, part="manifest/00001/first.parquet") is True
    first = store.read("commits/00001.json")
    # a late attempt writes its own part and loses the commit; readers still get the first part
    late = [dataclasses.replace(r, attempt=2) for r in make_records("00001")]
    mf.write_manifest_part(store, "00001", late, token="late")
    assert mf.commit_shard(store, "00001", {"rows": 4, "attempt": 2}, part="manifest/00001/late.parquet") is False
    assert store.read("commits/00001.json") == first
    assert mf.read_manifest(store, columns=["attempt"]).column("attempt").to_pylist() == [1, 1, 1, 1]
    assert mf.read_manifest(store, committed_only=False).num_rows == 8  # the orphan is still there


def test_the_fixed_part_of_earlier_releases_is_final_once_committed(store):
    mf.write_manifest_part(store, "00001", make_records("00001"))
    assert mf.commit_shard(store, "00001", {"rows": 4}) is True
    assert mf.read_commit(store, "00001")["manifest"] == "manifest/00001.parquet"
    part = store.read("manifest/00001.parquet")
    with pytest.raises(ValueError, match="already committed"):
        mf.write_manifest_part(store, "00001", make_records("00001", 3))
    assert store.read("manifest/00001.parquet") == part
    assert mf.part_of({"rows": 4}, "00001") == "manifest/00001.parquet"  # a marker that names no part


def test_racing_commits_have_one_winner(store):
    mf.write_manifest_part(store, "00002", make_records("00002"))
    barrier = threading.Barrier(4)
    results = []

    def commit(i):
        barrier.wait()
        results.append(mf.commit_shard(store, "00002", {"rows": 4, "driver": i}))

    threads = [threading.Thread(target=commit, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False, False, False, True]


def test_marker_never_precedes_manifest(store):
    with pytest.raises(ValueError, match="no manifest part"):
        mf.commit_shard(store, "00003", {"rows": 4})
    assert not store.exists("commits/00003.json")
    mf.write_manifest_part(store, "00003", make_records("00003", 3))
    with pytest.raises(ValueError, match="3 rows but the shard has 4"):
        mf.commit_shard(store, "00003", {"rows": 4})
    with pytest.raises(ValueError, match="rows"):
        mf.commit_shard(store, "00003", {})
    assert not store.exists("commits/00003.json")


def test_manifest_bytes_are_deterministic(tmp_path):
    store = RunStore(str(tmp_path), "run1")
    records = make_records("00004", 8)
    mf.write_manifest_part(store, "00004", records)
    first = store.read("manifest/00004.parquet")
    shuffled = records[:]
    random.Random(0).shuffle(shuffled)
    mf.write_manifest_part(store, "00004", shuffled)
    assert store.read("manifest/00004.parquet") == first
    meta = pq.read_metadata(io.BytesIO(first))
    assert meta.num_rows == 8


def test_bad_records_refused(tmp_path):
    store = RunStore(str(tmp_path), "run1")
    with pytest.raises(ValueError, match="belongs to shard"):
        mf.write_manifest_part(store, "00005", make_records("00006"))
    bad = [dataclasses.replace(r, status="done") for r in make_records("00005", 1)]
    with pytest.raises(ValueError, match="status 'done'"):
        mf.write_manifest_part(store, "00005", bad)
    with pytest.raises(ValueError):
        mf.write_manifest_part(store, "../x", [])
    assert not store.exists("manifest/00005.parquet")


@pytest.mark.s3
def test_committed_shards_sees_markers_despite_listing_cache(s3_bucket, s3_storage_options):
    import boto3

    store = RunStore(f"s3://{s3_bucket}", "run1", s3_storage_options)
    mf.write_manifest_part(store, "00000", make_records("00000"))
    mf.commit_shard(store, "00000", {"rows": 4})
    assert mf.committed_shards(store) == {"00000"}  # listing now cached by s3fs
    client = boto3.client(
        "s3", endpoint_url=s3_storage_options["client_kwargs"]["endpoint_url"],
        aws_access_key_id="testing-key", aws_secret_access_key=s3_storage_options["secret"])
    client.put_object(Bucket=s3_bucket, Key="run1/commits/00009.json", Body=b"{}")
    assert mf.committed_shards(store) == {"00000", "00009"}


def test_shard_result_counts():
    result = ShardResult("00000", 1, "w0", "n0", "cpu", make_records("00000", 8))
    assert result.counts() == {"ok": 4, "failed": 2, "rejected": 2}


def test_run_files(store):
    assert mf.read_run_info(store) is None
    assert mf.write_run_info(store, {"config": {"render": {"seed": 0}}, "fingerprint": ["a"]}) is True
    assert mf.write_run_info(store, {"fingerprint": ["b"]}) is False  # created once
    assert mf.read_run_info(store)["fingerprint"] == ["a"]

    with pytest.raises(ValueError, match="totals"):
        mf.write_success(store, {"images_per_s": 1.0})
    totals = {"rows": 4, "ok": 2, "failed": 1, "rejected": 1, "shards": 1}
    assert mf.write_success(store, {"totals": totals, "images_per_s": 1.5}) is True
    assert mf.write_success(store, {"totals": dict(totals, rows=8), "images_per_s": 9.0}) is False
    assert mf.read_success(store)["totals"] == totals
    assert json.loads(store.read("_SUCCESS.json"))["images_per_s"] == 1.5


@pytest.mark.parametrize("data", [b"", b"{not json", b"[1, 2]"])
def test_unreadable_run_files_and_markers_name_the_object(tmp_path, data):
    store = RunStore(str(tmp_path), "run1")
    store.write("_run.json", data)
    with pytest.raises(mf.CorruptRecord, match=rf"^{tmp_path}/run1/_run.json is unreadable \(not a JSON object\); "):
        mf.read_run_info(store)
    store.write("commits/00000.json", data)
    with pytest.raises(mf.CorruptRecord, match=r"/run1/commits/00000.json is unreadable"):
        mf.read_manifest(store)


def test_a_marker_pointing_outside_its_shard_is_refused(tmp_path):
    store = RunStore(str(tmp_path), "run1")
    for bad in ("manifest/00001/x.parquet", "../x.parquet", "manifest/00000/a/b.parquet", "_run.json", 7):
        store.write("commits/00000.json", json.dumps({"rows": 1, "manifest": bad}).encode())
        with pytest.raises(mf.CorruptRecord, match="is not a manifest part of shard 00000"):
            mf.read_manifest(store)
