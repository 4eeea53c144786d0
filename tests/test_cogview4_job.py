"""The render job with a CogView4 checkpoint on a real local Ray cluster: per-row sizes and seeds,
two output formats, a resume that skips everything, verify, report and one nightly night."""
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from cogview_ray.cli import main as cli_main
from cogview_ray.config import load_config
from cogview_ray.driver import run_render
from cogview_ray.manifest import read_manifest
from cogview_ray.sinks import read_output
from cogview_ray.storage import RunStore

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]

# CogView4 sizes step by 32 px: 48 is a CogView3-Plus size, refused here
SIZES = [(64, 64), (64, 96), (96, 64), (48, 64)]


@pytest.fixture(scope="module")
def cogview4_checkpoint(tmp_path_factory):
    from cogview_ray.model.checkpoint import make_checkpoint

    return str(make_checkpoint("tiny-cogview4", tmp_path_factory.mktemp("cv4job") / "tiny-cogview4"))


def write_prompts(path, n=8) -> str:
    rows = {"id": [f"cv4-{i:02d}" for i in range(n)],
            "prompt": [f"一只 {['red', 'green', 'blue'][i % 3]} fox, variant {i}" for i in range(n)],
            "height": [SIZES[i % 4][0] for i in range(n)], "width": [SIZES[i % 4][1] for i in range(n)],
            "seed": [500 + i if i % 2 else None for i in range(n)]}
    schema = pa.schema([("id", pa.string()), ("prompt", pa.string()), ("height", pa.int64()),
                        ("width", pa.int64()), ("seed", pa.int64())])
    pq.write_table(pa.table(rows, schema=schema), str(path))
    return str(path)


def make_cfg(checkpoint, dataset, out_uri, run_id, *extra):
    return load_config(None, [
        f"model.path={checkpoint}", "model.dtype=float32", "model.device=cpu",
        f"dataset.uri={dataset}", "dataset.id_column=id", "dataset.shard_size=4",
        "render.num_inference_steps=2", "render.batch_size=2", "render.seed=3",
        "workers.num_workers=2", "workers.cpus_per_worker=1",
        f"output.uri={out_uri}", f"output.run_id={run_id}", *extra])


def check_manifest(store: RunStore) -> list[dict]:
    table = sorted(read_manifest(store).to_pylist(), key=lambda r: r["id"])
    assert [r["status"] for r in table] == ["ok", "ok", "ok", "rejected"] * 2
    assert {r["reason"] for r in table if r["status"] == "rejected"} == {"bad_size"}
    assert {r["family"] for r in table} == {"cogview4"}
    # a row's own seed wins; the others derive theirs from (render.seed, id)
    assert [r["seed"] for r in table if r["id"] in ("cv4-01", "cv4-05")] == [501, 505]
    for r in table:
        if r["status"] == "ok":
            img = Image.open(io.BytesIO(read_output(store, r["key"])))
            assert img.size == (r["width"], r["height"])
    return table


def test_cogview4_run_resume_verify_report(ray_cluster, cogview4_checkpoint, tmp_path):
    data = write_prompts(tmp_path / "prompts.parquet")
    cfg = make_cfg(cogview4_checkpoint, data, tmp_path / "out", "cv4")
    outcome = run_render(cfg)
    assert outcome.exit_code == 0 and outcome.shards_committed == 2
    store = RunStore(str(tmp_path / "out"), "cv4")
    table = check_manifest(store)
    # the worker's bytes are the pipeline's (one torch thread, as the worker runs)
    from cogview_ray.model import load_pipeline, to_uint8_hwc

    row = next(r for r in table if r["id"] == "cv4-01")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pipe = load_pipeline(cogview4_checkpoint, device="cpu", dtype="float32")
        want = to_uint8_hwc(pipe.generate([row["prompt"]], [501], 64, 96, num_inference_steps=2).images)[0]
    finally:
        torch.set_num_threads(threads)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(read_output(store, row["key"])))), want)

    again = run_render(cfg)
    assert again.shards_committed == 0 and again.rows_rendered == 0 and again.shards_skipped == 2
    assert cli_main(["verify", store.url("")]) == 0
    out_dir = tmp_path / "report"
    assert cli_main(["report", store.url(""), "--out", str(out_dir)]) == 0
    assert (out_dir / "report.json").is_file()


def test_cogview4_webdataset_and_one_nightly_night(ray_cluster, cogview4_checkpoint, tmp_path):
    data = write_prompts(tmp_path / "prompts.parquet")
    text = f"""
nightly: {{timezone: UTC, run_id_format: cv4-night-%Y-%m-%d}}
model: {{path: "{cogview4_checkpoint}", dtype: float32, device: cpu}}
dataset: {{uri: "{data}", id_column: id, shard_size: 4}}
render: {{num_inference_steps: 2, batch_size: 2, seed: 3}}
workers: {{num_workers: 2, cpus_per_worker: 1}}
output: {{uri: "{tmp_path / 'out'}", format: webdataset}}
"""
    (tmp_path / "nightly.yaml").write_text(text)
    assert cli_main(["nightly", str(tmp_path / "nightly.yaml"), "--date", "2025-03-02"]) == 0
    store = RunStore(str(tmp_path / "out"), "cv4-night-2025-03-02")
    assert sorted(store.find("shards")) == ["shards/f00000-000000.tar", "shards/f00000-000001.tar"]
    table = check_manifest(store)
    # same settings and seeds as the files run: the same pixels, whatever the container
    run_info = json.loads(store.read("_run.json"))
    assert run_info["output_defining"]["render"]["max_sequence_length"] is None
    assert len([r for r in table if r["status"] == "ok"]) == 6
    assert cli_main(["verify", store.url("")]) == 0
