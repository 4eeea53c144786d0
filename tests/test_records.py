"""The row vocabulary: schema derived from RowRecord, records built from RowSpecs, failed
shards' records, and one bucketing of reason codes in stats, report and verify."""
import dataclasses
import io
import json

import pyarrow.parquet as pq
import pytest

from cogview_ray import layout
from cogview_ray import manifest as mf
from cogview_ray.records import (MANIFEST_SCHEMA, MAX_ERROR_CHARS, RENDER_FIELDS, Reason, RenderParams, RowRecord,
                                 Status, count_reasons, failed_records, records_table)
from cogview_ray.report import collect
from cogview_ray.rows import RowSpec
from cogview_ray.shards import Shard
from cogview_ray.stats import RunStats
from cogview_ray.storage import RunStore
from cogview_ray.verify import verify_run

pytestmark = [pytest.mark.timeout(60)]

# The manifest's columns before `error` existed, in their written order.
COLUMNS_BEFORE_ERROR = [
    "run_id", "shard_id", "id", "file", "row_index", "prompt", "negative_prompt", "seed", "height", "width",
    "num_inference_steps", "guidance_scale", "status", "reason", "key", "bytes", "sha256", "queue_s",
    "text_encoding_s", "denoising_s", "decoding_s", "image_encoding_s", "writing_s", "worker_id", "node",
    "device", "attempt", "model_path", "model_hash", "prompt_truncated"]


def spec(i, status=Status.PENDING, reason=None, **params):
    values = dict(prompt=f"a cat #{i}", negative_prompt="blurry", seed=1000 + i, height=64 + 16 * i,
                  width=96, num_inference_steps=3 + i, guidance_scale=4.5 + i)
    values.update(params)
    return RowSpec(row_id=f"id-{i}", key=f"id-{i}" if status == Status.PENDING else None, file="in.parquet",
                   row_index=10 + i, status=status, reason=reason, **values)


def test_schema_is_the_record_fields_with_columns_in_the_old_order():
    names = [f.name for f in dataclasses.fields(RowRecord)]
    assert MANIFEST_SCHEMA.names == names == COLUMNS_BEFORE_ERROR + ["error", "family", "attention"]
    types = {n: str(MANIFEST_SCHEMA.field(n).type) for n in ("seed", "height", "attempt", "guidance_scale",
                                                             "prompt_truncated", "error", "row_index")}
    assert types == {"seed": "int64", "height": "int32", "attempt": "int32", "guidance_scale": "double",
                     "prompt_truncated": "bool", "error": "string", "row_index": "int64"}
    assert RENDER_FIELDS == ("prompt", "negative_prompt", "seed", "height", "width", "num_inference_steps",
                             "guidance_scale")
    assert mf.MANIFEST_SCHEMA is MANIFEST_SCHEMA and mf.RowRecord is RowRecord  # still importable there


def test_from_spec_copies_every_render_parameter():
    row = spec(2)
    rec = RowRecord.from_spec(row, run_id="r", shard_id="s", status=Status.OK, reason=Reason.PROMPT_TRUNCATED,
                              key="images/s/id-2.png", attempt=3)
    assert rec.render_params() == {name: getattr(row, name) for name in RENDER_FIELDS}
    assert rec.render_params() == {"prompt": "a cat #2", "negative_prompt": "blurry", "seed": 1002, "height": 96,
                                   "width": 96, "num_inference_steps": 5, "guidance_scale": 6.5}
    assert (rec.id, rec.file, rec.row_index, rec.key, rec.attempt) == ("id-2", "in.parquet", 12,
                                                                       "images/s/id-2.png", 3)
    assert isinstance(row, RenderParams) and isinstance(rec, RenderParams)


def test_failed_records_keep_rejections_and_fail_the_rest():
    shard = Shard("s0", "in.parquet", 0, 10, 13)
    rows = [spec(0), spec(1, Status.REJECTED, Reason.BAD_SIZE, height=None), spec(2)]
    detail = "RuntimeError: injected fault: " + "x" * 500
    records = failed_records(shard, rows, run_id="r", attempts=2, reason=Reason.WORKER_ERROR, error=detail,
                             model_path="/ckpt")
    assert [(r.id, r.status, r.reason) for r in records] == [
        ("id-0", "failed", "worker_error"), ("id-1", "rejected", "bad_size"), ("id-2", "failed", "worker_error")]
    assert records[0].error == detail[:MAX_ERROR_CHARS] and len(records[0].error) == MAX_ERROR_CHARS == 300
    assert records[1].error is None and records[1].height is None
    assert all((r.attempt, r.model_path, r.shard_id, r.run_id) == (2, "/ckpt", "s0", "r") for r in records)
    assert records[2].render_params() == rows[2].render_params()


def test_failed_records_of_unreadable_rows_carry_their_place_only():
    shard = Shard("s1", "in.parquet", 0, 5, 8)
    records = failed_records(shard, None, run_id="r", attempts=3, reason="worker_died", error="gone",
                             model_path=None)
    assert [(r.row_index, r.id, r.status, r.reason, r.error) for r in records] == [
        (i, None, "failed", "worker_died", "gone") for i in (5, 6, 7)]
    assert all(v is None for r in records for v in r.render_params().values())
    with pytest.raises(ValueError):
        failed_records(shard, None, run_id="r", attempts=1, reason="worker_died: gone", error=None, model_path=None)
    with pytest.raises(ValueError, match="2 rows for shard s1 of 3"):
        failed_records(shard, [spec(0), spec(1)], run_id="r", attempts=1, reason="timeout", error=None,
                       model_path=None)


def test_codes_are_their_strings():
    assert str(Reason.OUT_OF_MEMORY) == f"{Reason.OUT_OF_MEMORY}" == "out_of_memory"
    assert Status.OK == "ok" and {"ok": 1}[Status.OK] == 1 and {Reason.TIMEOUT: 1}["timeout"] == 1
    assert json.dumps({"r": Reason.BAD_SEED}) == '{"r": "bad_seed"}'
    assert {r.value for r in Reason} >= {"worker_died", "worker_lost", "worker_error", "timeout", "bad_result",
                                         "input_changed", "prompt_too_long", "size_not_compiled", "write_failed"}


def test_a_reason_with_detail_is_refused():
    rec = RowRecord.from_spec(spec(0), run_id="r", shard_id="s", status="failed", reason="worker_error: boom")
    with pytest.raises(ValueError, match="'worker_error: boom' of row 10 of in.parquet is not a reason code"):
        records_table([rec])


def _run_records():
    """One shard's records: ok, ok with a truncated prompt, two infra failures, a rejection."""
    common = dict(run_id="run1", shard_id="00000")
    return [
        RowRecord.from_spec(spec(0), status="ok", key="images/00000/id-0.png", **common),
        RowRecord.from_spec(spec(1), status="ok", reason=Reason.PROMPT_TRUNCATED, key="images/00000/id-1.png",
                            prompt_truncated=True, **common),
        RowRecord.from_spec(spec(2), status="failed", reason=Reason.WORKER_ERROR,
                            error="RuntimeError: a: b: c", **common),
        RowRecord.from_spec(spec(3), status="failed", reason=Reason.WORKER_ERROR, error="OSError: other", **common),
        RowRecord.from_spec(spec(4, Status.REJECTED, Reason.EMPTY_PROMPT, prompt="  "), status="rejected",
                            reason=Reason.EMPTY_PROMPT, **common),
    ]


def _commit(store, records, table=None):
    store.write(layout.manifest_part("00000"), _parquet(table or records_table(records)))
    assert mf.commit_shard(store, "00000", {"rows": len(records)})


def _parquet(table):
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return buf.getvalue()


def test_stats_report_and_verify_bucket_reasons_alike(tmp_path):
    records = _run_records()
    expected = {"prompt_truncated": 1, "worker_error": 2, "empty_prompt": 1}
    stats = RunStats()
    stats.add(records)
    assert stats.summary()["reasons"] == expected == count_reasons(r.reason for r in records)

    store = RunStore(str(tmp_path / "out"), "run1")
    mf.write_run_info(store, {"config": {}})
    _commit(store, records)
    assert collect(store).reasons == expected
    report = verify_run(store.url())
    assert dict(report.reasons) == expected
    assert "reasons  empty_prompt 1  prompt_truncated 1  worker_error 2" in report.summary()
    errors = mf.read_manifest(store, columns=["id", "error"]).to_pydict()
    assert errors["error"] == [None, None, "RuntimeError: a: b: c", "OSError: other", None]


def test_a_manifest_from_before_the_error_column_still_reads(tmp_path):
    records = [r for r in _run_records() if r.status != "ok"]  # no objects to check
    store = RunStore(str(tmp_path / "out"), "run1")
    mf.write_run_info(store, {"config": {}})
    old = records_table(records).drop_columns(["error"])
    _commit(store, records, old)
    report = verify_run(store.url())
    assert report.verified, report.problems
    assert (report.totals["failed"], report.totals["rejected"]) == (2, 1)
    table = mf.read_manifest(store)
    assert table.schema == MANIFEST_SCHEMA and table.column("error").to_pylist() == [None, None, None]
    assert collect(store).reasons == {"worker_error": 2, "empty_prompt": 1}


def test_family_and_attention_columns_round_trip_and_older_manifests_read_as_null(tmp_path):
    records = [dataclasses.replace(r, family="cogview4", attention="flash") for r in _run_records()
               if r.status != "ok"]  # no objects to check
    assert [str(MANIFEST_SCHEMA.field(n).type) for n in ("family", "attention")] == ["string", "string"]
    new = RunStore(str(tmp_path / "new"), "run1")
    mf.write_run_info(new, {"config": {}})
    _commit(new, records)
    got = mf.read_manifest(new, columns=["family", "attention"]).to_pydict()
    assert got == {"family": ["cogview4"] * 3, "attention": ["flash"] * 3}

    old = RunStore(str(tmp_path / "old"), "run1")  # written before the columns existed
    mf.write_run_info(old, {"config": {}})
    _commit(old, records, records_table(records).drop_columns(["family", "attention"]))
    report = verify_run(old.url())
    assert report.verified, report.problems
    assert (report.totals["failed"], report.totals["rejected"]) == (2, 1)
    table = mf.read_manifest(old)
    assert table.schema == MANIFEST_SCHEMA
    assert table.column("family").to_pylist() == table.column("attention").to_pylist() == [None] * 3
    assert collect(old).reasons == {"worker_error": 2, "empty_prompt": 1}
