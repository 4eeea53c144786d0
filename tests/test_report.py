"""`cogview-ray report` on finished tiny runs (all three output formats, local and S3)."""
import json
import re
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cogview_ray.cli import main as cli_main
from cogview_ray.config import load_config
from cogview_ray.driver import run_render
from cogview_ray.manifest import read_manifest
from cogview_ray.report import FILES, RENDER_STAGES, build_report
from cogview_ray.storage import RunStore

pytestmark = pytest.mark.timeout(300)

ROWS = 7
EVIL = "<script>alert('x')</script> & a red bicycle"


def write_prompts(path) -> str:
    prompts = [f"a small house, style {i}" for i in range(ROWS)]
    prompts[2] = "  "  # rejected: empty_prompt
    prompts[4] = EVIL
    pq.write_table(pa.table({"id": [f"r{i}" for i in range(ROWS)], "prompt": prompts}), str(path))
    return str(path)


def render(tmp_path, checkpoint, fmt, out_uri=None, storage_options=None, data=None):
    import dataclasses

    cfg = load_config(None, [
        f"model.path={checkpoint}", "model.dtype=float32", "model.device=cpu",
        f"dataset.uri={data or write_prompts(tmp_path / 'prompts.parquet')}", "dataset.id_column=id",
        "dataset.shard_size=3", "render.height=64", "render.width=64", "render.num_inference_steps=2",
        "render.batch_size=2", "workers.num_workers=2", f"output.uri={out_uri or tmp_path / 'out'}",
        "output.run_id=rep", f"output.format={fmt}"])
    if storage_options:
        cfg = dataclasses.replace(cfg, output=dataclasses.replace(cfg.output, storage_options=storage_options))
    outcome = run_render(cfg)
    assert outcome.exit_code == 0
    return outcome


def check_report(result, store: RunStore):
    table = read_manifest(store).to_pylist()
    ok = [r for r in table if r["status"] == "ok"]
    data = result.data
    assert data.complete
    assert data.totals == {"rows": ROWS, "ok": ROWS - 1, "failed": 0, "rejected": 1, "shards_committed": 3,
                           "failed_shards": 0}
    # the sample: every ok image (fewer than the default 24), with its id and seed
    assert [(s["id"], s["seed"]) for s in result.sample] == sorted((r["id"], r["seed"]) for r in ok)

    summary = json.loads(open(f"{result.out_dir}/report.json").read())
    series = summary["throughput"]
    widths = np.diff(series["edges_s"])
    assert series["cumulative"][-1] == ROWS - 1
    assert float(np.dot(series["rate"], widths)) == pytest.approx(ROWS - 1)
    busy = summary["workers"]
    # one or both workers: dispatch starts with the first ready one, which may take every shard
    assert sorted(busy) == sorted({r["worker_id"] for r in table if r["worker_id"]}) and 1 <= len(busy) <= 2
    assert sum(b["images"] for b in busy.values()) == ROWS - 1
    for w, b in busy.items():
        expected = sum(r[s] or 0.0 for r in table if r["worker_id"] == w for s in RENDER_STAGES)
        assert b["render_s"] == pytest.approx(expected) and b["render_s"] > 0

    sizes = {}
    for name, path in result.pngs.items():
        with Image.open(path) as im:
            im.load()
            assert im.format == "PNG"
            sizes[name] = im.size
            assert 300 <= im.size[0] <= 3000 and 200 <= im.size[1] <= 3000, (name, im.size)
    # six images in one row of six tiles, each drawn (noise-like pixels, not a blank figure)
    assert sizes["contact_sheet"] == (1140, 220)
    sheet = np.asarray(Image.open(result.pngs["contact_sheet"]).convert("L"), dtype=float)
    assert sheet.std() > 20

    page = open(result.html, encoding="utf-8").read()
    for f in FILES.values():
        assert f"src='{f}'" in page
    for key, value in data.totals.items():
        assert f"id='total-{key}'>{value}<" in page
    assert page.count("<tr class='sample'>") == ROWS - 1
    assert "empty_prompt" in page
    assert "<script>" not in page and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; a red" in page
    # what rendered it, from `_runtime.json`, in the page and the summary
    assert data.runtime.startswith("torch ") and ", cpu, attention " in data.runtime
    assert f"<p id='runtime'>Rendered by: {data.runtime}</p>" in page and summary["runtime"] == data.runtime


@pytest.mark.ray
@pytest.mark.parametrize("fmt", ["files", "webdataset", "parquet"])
def test_report_of_a_finished_run(ray_cluster, tiny_checkpoint, tmp_path, fmt):
    render(tmp_path, tiny_checkpoint, fmt)
    store = RunStore(str(tmp_path / "out"), "rep")
    assert cli_main(["verify", store.url()]) == 0
    out_dir = tmp_path / "report"
    assert cli_main(["report", store.url(), "--out", str(out_dir)]) == 0
    result = build_report(store.url(), str(out_dir))
    assert sorted(p.name for p in out_dir.iterdir()) == sorted([*FILES.values(), "report.html", "report.json"])
    check_report(result, store)


@pytest.mark.ray
@pytest.mark.s3
def test_report_of_an_s3_run(ray_cluster, tiny_checkpoint, tmp_path, s3_bucket, s3_storage_options, capsys):
    render(tmp_path, tiny_checkpoint, "webdataset", f"s3://{s3_bucket}/renders", s3_storage_options)
    store = RunStore(f"s3://{s3_bucket}/renders", "rep", s3_storage_options)
    assert cli_main(["verify", store.url(), "--storage-options", json.dumps(s3_storage_options)]) == 0
    capsys.readouterr()
    out_dir = tmp_path / "s3-report"
    code = cli_main(["report", f"s3://{s3_bucket}/renders/rep", "--out", str(out_dir),
                     "--storage-options", json.dumps(s3_storage_options)])
    assert code == 0 and capsys.readouterr().out.strip() == str(out_dir / "report.html")
    check_report(build_report(store.url(), str(out_dir), s3_storage_options), store)


def test_missing_matplotlib_is_one_clear_sentence(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert cli_main(["report", str(tmp_path / "out" / "rep"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "cogview-ray: error: cogview-ray report needs matplotlib: pip install 'cogview-ray[report]'."
    assert not (tmp_path / "r").exists()


def test_a_folder_without_a_run_is_refused(tmp_path, capsys):
    (tmp_path / "out" / "nothing").mkdir(parents=True)
    assert cli_main(["report", str(tmp_path / "out" / "nothing"), "--out", str(tmp_path / "r")]) == 2
    assert re.search(r"holds no run \(no _run.json and no committed shards\)", capsys.readouterr().err)


# -- row content is plain text, never markup (no Ray: a run fabricated by hand) -----------------

HOSTILE_IDS = ["<script>alert(1)</script>", "a $\\undefined{x}$ b", "back\\slash $5 and $6", "ctl\x00\x1b[31m\rend",
               "Cat", "cat"]
HOSTILE_PROMPTS = ["<script>alert('p')</script>", "$\\frac{1}$", "C:\\path\\to", "bell\x07\x00\r\n", "a cat", "a cat"]


def fabricate_hostile_run(store: RunStore) -> None:
    import time

    from cogview_ray import manifest as mf
    from cogview_ray.records import RowRecord
    from cogview_ray.rows import object_key
    from cogview_ray.sinks import encode_image, make_sink, sha256_hex

    mf.write_run_info(store, {"created_at": time.time() - 5, "config": {
        "model": {"path": "/models/$x$<b>"}, "render": {"width": 16, "height": 16}, "output": {"format": "files"}}})
    sink = make_sink("files", store, "00000", "png")
    records = []
    for i, (row_id, prompt) in enumerate(zip(HOSTILE_IDS, HOSTILE_PROMPTS)):
        data = encode_image(np.full((16, 16, 3), 40 * i, np.uint8), "png")
        key = sink.add(object_key(row_id), data, {"id": row_id})
        records.append(RowRecord(run_id=store.run_id, shard_id="00000", id=row_id, file="in.parquet", row_index=i,
                                 prompt=prompt, negative_prompt=None, seed=i, height=16, width=16,
                                 num_inference_steps=2, guidance_scale=5.0, status="ok", key=key, bytes=len(data),
                                 sha256=sha256_hex(data), text_encoding_s=0.1, denoising_s=0.2, decoding_s=0.1,
                                 image_encoding_s=0.01, writing_s=0.01, worker_id="w$0$.1", attempt=1))
    sink.close()
    mf.write_manifest_part(store, "00000", records)
    assert mf.commit_shard(store, "00000", {"rows": len(records), "committed_at": time.time()})


def test_row_content_is_shown_as_plain_text(tmp_path):
    store = RunStore(str(tmp_path / "out"), "hostile")
    fabricate_hostile_run(store)
    runtime = {"torch": "2.13.0", "device": "<script>gpu()</script>", "attention": "flash", "compile": "none",
               "dtype": "float32"}
    store.create_once("_runtime.json", json.dumps({"runtime": runtime}).encode())
    result = build_report(store.url(), str(tmp_path / "report"))
    assert sorted(s["id"] for s in result.sample) == sorted(HOSTILE_IDS)
    page = open(result.html, encoding="utf-8").read()
    assert "<script" not in page and "<b>" not in page
    for raw in ("\x00", "\x1b", "\r", "\x07"):
        assert raw not in page
    for shown in ("&lt;script&gt;alert(1)&lt;/script&gt;", "a $\\undefined{x}$ b", "back\\slash $5 and $6",
                  "ctl\\x00\\x1b[31m\\rend", "&lt;script&gt;alert(&#x27;p&#x27;)&lt;/script&gt;", "$\\frac{1}$",
                  "C:\\path\\to", "bell\\x07\\x00\\r\\n", "/models/$x$&lt;b&gt;", "w$0$.1"):
        assert shown in page, shown
    assert page.count("<tr class='sample'>") == len(HOSTILE_IDS)
    assert "<p id='runtime'>Rendered by: torch 2.13.0, &lt;script&gt;gpu()&lt;/script&gt;, attention flash" in page
    for path in result.pngs.values():
        with Image.open(path) as im:
            assert im.format == "PNG" and im.size[0] >= 300
