"""A bad row costs milliseconds and a bounded manifest entry: oversized prompts, negative prompts
and ids are cut before any expensive work, and `render.max_prompt_chars` is a validated setting."""
import time

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cogview_ray.config import ConfigError, DatasetConfig, RenderConfig, load_config
from cogview_ray.manifest import manifest_bytes
from cogview_ray.records import RowRecord
from cogview_ray.rows import MAX_ID_CHARS, SizeLimits, read_shard_rows
from cogview_ray.shards import plan_shards

pytestmark = pytest.mark.timeout(120)

FS = fsspec.filesystem("file")
LIMITS = SizeLimits(multiple_px=16, max_px=2048)
RENDER = RenderConfig(height=128, width=128)  # max_prompt_chars: the default
TEN_MB = 10 * 1024 * 1024


def test_default_limit_is_ten_thousand_characters():
    assert RenderConfig().max_prompt_chars == 10_000


def test_a_shard_of_10_mb_cells_is_read_in_seconds_into_bounded_rows(tmp_path):
    limit = RENDER.max_prompt_chars
    exact = "e" * limit  # exactly at the limit: rendered
    huge = ["a" * TEN_MB, "猫" * (TEN_MB // 3), ("a cat " * TEN_MB)[:TEN_MB]]
    table = pa.table({
        "id": ["r0", "r1", "r2", "r3", "i" * TEN_MB, "r5"],
        "prompt": [*huge, exact, "a cat", "a dog"],
        "negative_prompt": [None, None, None, None, None, "n" * TEN_MB],
    })
    path = tmp_path / "huge.parquet"
    pq.write_table(table, path, row_group_size=2)
    del table
    cfg = DatasetConfig(uri=str(path), id_column="id", shard_size=100)
    shards, _ = plan_shards(cfg, FS)

    t0 = time.perf_counter()
    rows = read_shard_rows(shards[0], cfg, RENDER, FS, LIMITS)
    elapsed = time.perf_counter() - t0
    assert elapsed < 30, f"reading 5 cells of 10 MB took {elapsed:.1f} s"  # about 1 s

    assert [r.reason for r in rows] == ["prompt_too_long"] * 3 + [None, "bad_id", "prompt_too_long"]
    assert [r.status for r in rows] == ["rejected"] * 3 + ["pending", "rejected", "rejected"]
    assert rows[3].prompt == exact and rows[3].key == "r3" and rows[3].error is None
    for row, prompt in zip(rows[:3], huge):
        assert row.prompt == prompt[:limit] and row.key is None
        assert row.error == f"prompt has {len(prompt)} characters; limit {limit}"
    assert rows[4].row_id == "i" * MAX_ID_CHARS and rows[4].error == f"id has {TEN_MB} characters; limit 256"
    assert rows[5].negative_prompt == "n" * limit
    assert rows[5].error == f"negative_prompt has {TEN_MB} characters; limit {limit}"
    for row in rows:
        assert all(len(v) <= limit for v in (row.row_id, row.prompt, row.negative_prompt or "") if v)

    # the manifest keeps a bounded prefix of every cell, and says why in `error`
    records = [RowRecord.from_spec(r, run_id="run", shard_id=shards[0].shard_id, reason=r.reason, error=r.error,
                                   status="ok" if r.status == "pending" else r.status) for r in rows]
    assert len(manifest_bytes(records)) < 200_000


@pytest.mark.parametrize("value", [0, -1, "many", 1.5])
def test_max_prompt_chars_must_be_a_positive_integer(value):
    with pytest.raises(ConfigError, match="render.max_prompt_chars"):
        load_config(None, ["model.path=/m", "dataset.uri=/d", "output.uri=/o", f"render.max_prompt_chars={value}"])


def test_a_default_negative_prompt_over_the_limit_is_refused():
    with pytest.raises(ConfigError, match="render.negative_prompt has 11 characters; render.max_prompt_chars is 10"):
        load_config(None, ["model.path=/m", "dataset.uri=/d", "output.uri=/o", "render.max_prompt_chars=10",
                           "render.negative_prompt=" + "n" * 11])
    cfg = load_config(None, ["model.path=/m", "dataset.uri=/d", "output.uri=/o", "render.max_prompt_chars=10",
                             "render.negative_prompt=" + "n" * 10])
    assert (cfg.render.max_prompt_chars, cfg.render.negative_prompt) == (10, "n" * 10)
