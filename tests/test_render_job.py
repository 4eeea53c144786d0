"""The render job end to end on a real local Ray cluster (2 CPU workers, tiny checkpoint)."""
import hashlib
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cogview_ray.cli import main as cli_main
from cogview_ray.config import load_config
from cogview_ray.driver import run_render
from cogview_ray.errors import RunRefused
from cogview_ray.manifest import part_of, read_commit, read_manifest
from cogview_ray.sinks import read_output
from cogview_ray.storage import RunStore
from cogview_ray.verify import verify_run

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

SIZES = [(64, 64), (64, 96), (96, 64)]


def write_prompts(path, n=12, bad_rows=True, ids=True):
    rows = {"prompt": [f"prompt number {i}: a small {['red', 'green', 'blue'][i % 3]} house" for i in range(n)],
            "height": [SIZES[i % 3][0] for i in range(n)], "width": [SIZES[i % 3][1] for i in range(n)]}
    if ids:
        rows["id"] = [f"item-{i:03d}" for i in range(n)]
    if bad_rows:
        rows["prompt"][3] = "   "  # whitespace-only: rejected
        rows["height"][5] = 70  # not a multiple of 16: rejected
        if ids:
            rows["id"][7] = rows["id"][6]  # duplicate id: rejected
    pq.write_table(pa.table(rows), str(path))
    return str(path)


def make_cfg(checkpoint, dataset, out_uri, run_id, *extra, storage_options=None):
    overrides = [
        f"model.path={checkpoint}", "model.dtype=float32", "model.device=cpu",
        f"dataset.uri={dataset}", "dataset.shard_size=4",
        "render.num_inference_steps=2", "render.batch_size=2", "render.seed=7",
        "workers.num_workers=2", "workers.cpus_per_worker=1", "workers.max_in_flight=2",
        f"output.uri={out_uri}", f"output.run_id={run_id}", *extra,
    ]
    if "id_column" not in " ".join(extra):
        overrides.append("dataset.id_column=id")
    cfg = load_config(None, overrides)
    if storage_options:
        import dataclasses

        cfg = dataclasses.replace(cfg, output=dataclasses.replace(cfg.output, storage_options=storage_options))
    return cfg


def check_run(store: RunStore, rows_in_input: int):
    """The user's view: every row accounted once, every ok image real and matching its manifest row."""
    table = read_manifest(store).to_pylist()
    assert len(table) == rows_in_input
    statuses = [r["status"] for r in table]
    assert statuses.count("ok") + statuses.count("failed") + statuses.count("rejected") == rows_in_input
    assert len({(r["file"], r["row_index"]) for r in table}) == rows_in_input
    ok_ids = [r["id"] for r in table if r["status"] == "ok"]
    assert len(ok_ids) == len(set(ok_ids))
    for r in table:
        if r["status"] != "ok":
            assert r["reason"], r
            continue
        data = read_output(store, r["key"])
        assert hashlib.sha256(data).hexdigest() == r["sha256"] and len(data) == r["bytes"]
        img = Image.open(io.BytesIO(data))
        assert img.size == (r["width"], r["height"])
    report = verify_run(store.url(""), store_options(store))
    assert report.verified, report.summary()
    return table


def store_options(store):
    return store._storage_options or None


@pytest.mark.parametrize("fmt", ["files", "webdataset", "parquet"])
def test_local_run_all_formats(ray_cluster, tiny_checkpoint, tmp_path, fmt):
    data = write_prompts(tmp_path / "prompts.parquet")
    cfg = make_cfg(tiny_checkpoint, data, tmp_path / "out", f"run-{fmt}", f"output.format={fmt}")
    outcome = run_render(cfg)
    assert outcome.exit_code == 0 and outcome.shards_committed == 3
    store = RunStore(str(tmp_path / "out"), f"run-{fmt}")
    table = check_run(store, 12)
    reasons = {r["id"]: r["reason"] for r in table if r["status"] == "rejected"}
    assert sorted(reasons.values()) == ["bad_size", "duplicate_id", "empty_prompt"]
    assert sum(r["status"] == "ok" for r in table) == 9
    success = json.loads(store.read("_SUCCESS.json"))
    assert success["totals"] == {"rows": 12, "ok": 9, "failed": 0, "rejected": 3, "shards": 3, "failed_shards": 0}
    assert cli_main(["verify", store.url("")]) == 0


@pytest.mark.s3
@pytest.mark.parametrize("fmt", ["files", "webdataset", "parquet"])
def test_s3_run_all_formats(ray_cluster, tiny_checkpoint, tmp_path, s3_bucket, s3_storage_options, fmt):
    import fsspec

    fs = fsspec.filesystem("s3", **s3_storage_options)
    local = write_prompts(tmp_path / "prompts.parquet")
    fs.put_file(local, f"{s3_bucket}/in/prompts.parquet")
    cfg = make_cfg(tiny_checkpoint, f"s3://{s3_bucket}/in/prompts.parquet", f"s3://{s3_bucket}/renders",
                   "nightly", f"output.format={fmt}", storage_options=s3_storage_options)
    outcome = run_render(cfg)
    assert outcome.exit_code == 0
    store = RunStore(f"s3://{s3_bucket}/renders", "nightly", s3_storage_options)
    check_run(store, 12)
    run_info = store.read("_run.json").decode()
    from tests.conftest import PLANTED_SECRET

    assert PLANTED_SECRET not in run_info


def test_rerun_renders_nothing_and_keeps_manifests(ray_cluster, tiny_checkpoint, tmp_path):
    data = write_prompts(tmp_path / "prompts.parquet")
    cfg = make_cfg(tiny_checkpoint, data, tmp_path / "out", "r1")
    run_render(cfg)
    store = RunStore(str(tmp_path / "out"), "r1")
    before = {n: store.read(n) for n in store.find("manifest")}
    images = sorted((tmp_path / "out" / "r1" / "images").rglob("*.png"))
    assert len(images) == 9
    images_before = {p: p.stat().st_mtime_ns for p in images}
    again = run_render(cfg)
    assert again.shards_committed == 0 and again.rows_rendered == 0 and again.shards_skipped == 3
    after = {n: store.read(n) for n in store.find("manifest")}
    assert before == after
    # no object was written again
    assert images_before == {p: p.stat().st_mtime_ns for p in images}


def test_restart_completes_only_missing_shards(ray_cluster, tiny_checkpoint, tmp_path):
    data = write_prompts(tmp_path / "prompts.parquet")
    cfg = make_cfg(tiny_checkpoint, data, tmp_path / "out", "r2")
    run_render(cfg)
    store = RunStore(str(tmp_path / "out"), "r2")
    kept = store.read(part_of(read_commit(store, "f00000-000000"), "f00000-000000"))
    # as if the driver had stopped after committing only the first shard
    for shard in ("f00000-000001", "f00000-000002"):
        store.delete(f"commits/{shard}.json")
        for rel in store.find(f"manifest/{shard}"):
            store.delete(rel)
    store.delete("_SUCCESS.json")
    outcome = run_render(cfg)
    assert outcome.shards_skipped == 1 and outcome.shards_committed == 2
    assert store.read(part_of(read_commit(store, "f00000-000000"), "f00000-000000")) == kept
    check_run(store, 12)


def test_seed_reproduces_bytes_across_batches_and_workers(ray_cluster, tiny_checkpoint, tmp_path):
    data = write_prompts(tmp_path / "prompts.parquet", bad_rows=False)
    alone = tmp_path / "alone.parquet"
    pq.write_table(pq.read_table(data).slice(4, 1), str(alone))  # item-004 by itself
    out = tmp_path / "out"
    run_render(make_cfg(tiny_checkpoint, data, out, "b2"))
    run_render(make_cfg(tiny_checkpoint, data, out, "b1", "render.batch_size=1", "workers.num_workers=1"))
    run_render(make_cfg(tiny_checkpoint, str(alone), out, "solo", "render.batch_size=3"))
    by_run = {}
    for run_id in ("b2", "b1", "solo"):
        table = read_manifest(RunStore(str(out), run_id)).to_pylist()
        by_run[run_id] = {r["id"]: (r["seed"], r["sha256"], r["worker_id"]) for r in table}
    for item, (seed, sha, _) in by_run["b2"].items():
        assert by_run["b1"][item][:2] == (seed, sha)
    assert by_run["solo"]["item-004"][:2] == by_run["b2"]["item-004"][:2]
    # each run had its own worker processes, so equal bytes across runs are equal across workers
    # (within b2 the first ready worker may take every shard: dispatch starts with the first one)


def test_changed_setting_or_input_is_refused(ray_cluster, tiny_checkpoint, tmp_path):
    data = write_prompts(tmp_path / "prompts.parquet")
    out = tmp_path / "out"
    run_render(make_cfg(tiny_checkpoint, data, out, "r3"))
    with pytest.raises(RunRefused, match=r"render.num_inference_steps: 2 -> 3"):
        run_render(make_cfg(tiny_checkpoint, data, out, "r3", "render.num_inference_steps=3"))
    write_prompts(tmp_path / "prompts.parquet", n=13)
    with pytest.raises(RunRefused, match="other settings or input"):
        run_render(make_cfg(tiny_checkpoint, data, out, "r3"))
    # the lock was released by the refused drivers: an explicit override goes on
    forced = run_render(make_cfg(tiny_checkpoint, data, out, "r3", "resume=force"))
    assert forced.exit_code == 0
