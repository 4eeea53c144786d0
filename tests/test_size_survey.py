"""Planning-time size survey: the distinct per-row sizes a run will meet, counted in Arrow from
two columns, most frequent first, without the default or declared sizes."""
import os

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cogview_ray.config import DatasetConfig, RenderConfig
from cogview_ray.shards import plan_shards
from cogview_ray.size_survey import survey_sizes

pytestmark = pytest.mark.timeout(120)

FS = fsspec.filesystem("file")
RENDER = RenderConfig(height=128, width=128, sizes=[[256, 128]])


def plan(tmp_path, tables, **dataset):
    for i, table in enumerate(tables):
        pq.write_table(table, tmp_path / f"part-{i}.parquet", row_group_size=7)
    cfg = DatasetConfig(uri=str(tmp_path / "*.parquet"), shard_size=5, **dataset)
    shards, _ = plan_shards(cfg, FS)
    return shards


def test_counts_pairs_across_files_most_frequent_first(tmp_path):
    a = pa.table({"prompt": ["p"] * 12,
                  "height": [64, 64, 64, None, 256, 64, 96, 96, None, 128, 256, 64],
                  "width": [64, 64, 64, 192, 128, 64, 96, 96, None, 128, 128, 64]})
    b = pa.table({"prompt": ["p"] * 4, "width": [96, 96, 96, None]})  # height column absent
    shards = plan(tmp_path, [a, b])
    # (64, 64) x5, (128, 96) x3 (file b: default height), (96, 96) x2, (128, 192) x1;
    # (128, 128) is the default and (256, 128) is declared in render.sizes: both left out
    assert survey_sizes(shards, RENDER, FS) == [(64, 64), (128, 96), (96, 96), (128, 192)]
    assert survey_sizes(shards, RENDER, FS, limit=2) == [(64, 64), (128, 96)]


def test_only_planned_rows_count_and_odd_values_are_skipped(tmp_path):
    table = pa.table({"prompt": ["p"] * 8,
                      "height": [64.0, 64.5, -16.0, 0.0, 64.0, 32.0, 32.0, 32.0],
                      "width": [64.0, 64.0, 64.0, 64.0, 64.0, 32.0, 32.0, 32.0]})
    shards = plan(tmp_path, [table], limit=5)  # rows 5.. are not planned: (32, 32) never counts
    # 64.5, -16 and 0 are rejected row by row later; nothing to compile for them
    assert survey_sizes(shards, RENDER, FS) == [(64, 64)]


def test_only_the_pending_shards_rows_count_on_a_resume(tmp_path):
    table = pa.table({"prompt": ["p"] * 15, "height": [64] * 5 + [96] * 5 + [32] * 5, "width": [64] * 15})
    shards = plan(tmp_path, [table])  # three shards of 5: (64, 64), (96, 64), (32, 64)
    # shard 1 committed already: its size is not compiled for the rest of the run
    assert survey_sizes([shards[0], shards[2]], RENDER, FS) == [(32, 64), (64, 64)]


def test_no_size_columns_or_string_columns_give_nothing(tmp_path):
    assert survey_sizes(plan(tmp_path, [pa.table({"prompt": ["p"] * 3})]), RENDER, FS) == []
    other = tmp_path / "strings"
    other.mkdir()
    shards = plan(other, [pa.table({"prompt": ["p"] * 3, "height": ["64", "64", "x"]})])
    assert survey_sizes(shards, RENDER, FS) == []


def test_memory_stays_in_arrow_for_many_rows(tmp_path):
    n = 2_000_000
    table = pa.table({"prompt": pa.array(["p"] * n), "height": pa.array([64, 96] * (n // 2), pa.int32()),
                      "width": pa.array([64] * n, pa.int32())})
    pq.write_table(table, tmp_path / "big.parquet")
    cfg = DatasetConfig(uri=str(tmp_path / "big.parquet"), shard_size=100_000)
    shards, _ = plan_shards(cfg, FS)
    assert survey_sizes(shards, RENDER, FS) == [(64, 64), (96, 64)]


def test_worker_compiles_the_surveyed_sizes_it_can_render(tmp_path, tiny_checkpoint, monkeypatch):
    """Surveyed sizes are warmed at start with the run's own; ones outside the pipeline's limits
    are skipped (their rows are rejected later), never a failed start."""
    import cogview_ray.model as model
    from cogview_ray.config import load_config
    from cogview_ray.worker import RenderWorker

    real_load = model.load_pipeline
    warmed = []

    def load_uncompiled(path, **kw):  # compiling on CPU takes minutes: record the warm-ups instead
        pipe = real_load(path, **{**kw, "compile": "none"})
        monkeypatch.setattr(pipe, "warmup", lambda h, w, *a, **k: warmed.append((h, w)) or 0.0)
        return pipe

    monkeypatch.setattr(model, "load_pipeline", load_uncompiled)
    pq.write_table(pa.table({"prompt": ["p"]}), tmp_path / "p.parquet")
    cfg = load_config(None, [f"model.path={tiny_checkpoint}", "model.device=cpu", "model.compile=default",
                             f"dataset.uri={tmp_path}/p.parquet", "render.height=32", "render.width=32",
                             "render.sizes=[[48, 32]]", f"output.uri={tmp_path}/out"])
    RenderWorker(cfg, "r", "w00.0", input_sizes=[(64, 48), (50, 64), (48, 32), (4096, 64)])
    # 50 is not a multiple of the pipeline's 16 px, 4096 is past its limit: both skipped
    assert warmed == [(32, 32), (48, 32), (64, 48)]


def test_driver_surveys_sizes_only_when_compiling(tmp_path):
    from cogview_ray.config import load_config
    from cogview_ray.driver import Driver

    pq.write_table(pa.table({"prompt": ["p"] * 4, "height": [64, 64, None, 96]}), tmp_path / "p.parquet")
    common = ["model.path=unused", f"dataset.uri={tmp_path}/p.parquet", "render.height=32", "render.width=32",
              f"output.uri={tmp_path}/out"]
    for compile_mode, expected in (("none", []), ("default", [(64, 32), (96, 32)])):
        driver = Driver(load_config(None, common + [f"model.compile={compile_mode}"]), out=open(os.devnull, "w"))
        shards, _, _ = driver.plan()
        assert driver._input_sizes(shards) == expected
