"""Rows: every reason code, per-row overrides, ids, seeds, object keys, and a property test that
arbitrary tables always give one RowSpec per input row."""
import hashlib
import math
import random
import re
import tempfile
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cogview_ray.config import DatasetConfig, RenderConfig
from cogview_ray.rows import (
    SizeLimits,
    MAX_SEED,
    RowSpec,
    derive_seed,
    group_for_render,
    object_key,
    read_shard_rows,
)
from cogview_ray.shards import Shard, plan_shards

pytestmark = pytest.mark.timeout(240)

FS = fsspec.filesystem("file")
LIMITS = SizeLimits(multiple_px=16, max_px=2048)  # CogView3-Plus's
RENDER = RenderConfig(height=128, width=128, num_inference_steps=4, guidance_scale=3.0,
                      negative_prompt="blurry", seed=7)
REASONS = {"empty_prompt", "bad_prompt", "bad_negative_prompt", "bad_size", "bad_steps", "bad_guidance",
           "bad_seed", "bad_id", "duplicate_id"}


def rows_of(path, table, render=RENDER, shard_size=1000, **dataset):
    pq.write_table(table, path)
    cfg = DatasetConfig(uri=str(path), shard_size=shard_size, **dataset)
    shards, _ = plan_shards(cfg, FS)
    return [row for shard in shards for row in read_shard_rows(shard, cfg, render, FS, LIMITS)]


def reasons(rows):
    return [row.reason for row in rows]


# ---------------------------------------------------------------- reason codes


def test_prompts(tmp_path):
    prompts = ["a cat", None, "", "   \t\n", "\u3000", "日本語の猫 🎨", "tab\there\nnew\x00\x07",
               "\u202etxet lrt", "x" * 5000]
    rows = rows_of(tmp_path / "p.parquet", pa.table({"prompt": prompts}))
    assert reasons(rows) == [None, "empty_prompt", "empty_prompt", "empty_prompt", "empty_prompt",
                             None, None, None, None]
    assert [r.prompt for r in rows if r.status == "pending"] == [prompts[0]] + prompts[5:]  # kept exactly
    for row in rows:
        assert (row.status == "pending") == (row.reason is None) == (row.key is not None)


def test_sizes(tmp_path):
    heights = [None, 16, 2048, 512, 100, 8, 0, -16, 4096, 2064]
    rows = rows_of(tmp_path / "s.parquet", pa.table({"prompt": ["p"] * len(heights), "height": heights}))
    assert reasons(rows) == [None, None, None, None] + ["bad_size"] * 6
    assert [r.height for r in rows[:4]] == [128, 16, 2048, 512] and rows[0].width == 128
    floats = [512.0, 512.5, float("nan"), float("inf"), None]
    rows = rows_of(tmp_path / "f.parquet", pa.table({"prompt": ["p"] * 5, "width": floats}))
    assert reasons(rows) == [None, "bad_size", "bad_size", "bad_size", None]
    assert rows[0].width == 512 and isinstance(rows[0].width, int) and rows[4].width == 128
    rows = rows_of(tmp_path / "t.parquet", pa.table({"prompt": ["p", "p"], "height": ["512", None]}))
    assert reasons(rows) == ["bad_size", None]


def test_steps_and_guidance(tmp_path):
    table = pa.table({
        "prompt": ["p"] * 8,
        "num_inference_steps": [None, 1, 1000, 0, -1, 1001, 2**40, 20],
        "guidance_scale": [None, 0.0, 12.5, 1.0, 1.0, 1.0, 1.0, float("nan")],
    })
    rows = rows_of(tmp_path / "g.parquet", table)
    assert reasons(rows) == [None, None, None, "bad_steps", "bad_steps", "bad_steps", "bad_steps",
                             "bad_guidance"]
    assert [(r.num_inference_steps, r.guidance_scale) for r in rows[:3]] == [(4, 3.0), (1, 0.0), (1000, 12.5)]
    guidance = [float("inf"), float("-inf"), -0.5, -0.0, 7]
    rows = rows_of(tmp_path / "h.parquet", pa.table({"prompt": ["p"] * 5, "guidance_scale": guidance}))
    assert reasons(rows) == ["bad_guidance"] * 3 + [None, None]
    assert rows[4].guidance_scale == 7.0


def test_seeds(tmp_path):
    table = pa.table({"prompt": ["p"] * 5, "seed": pa.array([None, 0, MAX_SEED, -1, 42], pa.int64())})
    rows = rows_of(tmp_path / "s.parquet", table)
    assert reasons(rows) == [None, None, None, "bad_seed", None]
    assert rows[0].seed == derive_seed(7, rows[0].row_id)  # null: derived from (run seed, id)
    assert [rows[1].seed, rows[2].seed, rows[4].seed] == [0, MAX_SEED, 42]  # the column wins
    big = pa.array([2**63, 2**64 - 1, 5], pa.uint64())
    assert reasons(rows_of(tmp_path / "u.parquet", pa.table({"prompt": ["p"] * 3, "seed": big}))) == \
        ["bad_seed", "bad_seed", None]
    floats = [1.5, float("nan"), 2.0**70, 3.0]
    rows = rows_of(tmp_path / "f.parquet", pa.table({"prompt": ["p"] * 4, "seed": floats}))
    assert reasons(rows) == ["bad_seed"] * 3 + [None] and rows[3].seed == 3


def test_prompt_length_limit(tmp_path):
    render = RenderConfig(height=128, width=128, negative_prompt=None, max_prompt_chars=10)
    table = pa.table({"prompt": ["x" * 10, "y" * 11, " " * 11, "p", "z" * 12],
                      "negative_prompt": [None, None, None, "n" * 11, "m" * 10]})
    rows = rows_of(tmp_path / "l.parquet", table, render=render)
    assert reasons(rows) == [None, "prompt_too_long", "prompt_too_long", "prompt_too_long", "prompt_too_long"]
    assert [r.prompt for r in rows] == ["x" * 10, "y" * 10, " " * 10, "p", "z" * 10]
    assert [r.negative_prompt for r in rows] == [None, None, None, "n" * 10, "m" * 10]
    assert [r.error for r in rows] == [None, "prompt has 11 characters; limit 10", "prompt has 11 characters; limit 10",
                                       "negative_prompt has 11 characters; limit 10",
                                       "prompt has 12 characters; limit 10"]
    assert rows[0].key is not None and all(r.key is None for r in rows[1:])
    # the default negative prompt counts too (config validation refuses it; rows do not trust that)
    long_default = RenderConfig(height=128, width=128, negative_prompt="q" * 11, max_prompt_chars=10)
    (row,) = rows_of(tmp_path / "d.parquet", pa.table({"prompt": ["p"]}), render=long_default)
    assert (row.reason, row.negative_prompt) == ("prompt_too_long", "q" * 10)


def test_ids(tmp_path):
    ids = ["a", "b", "a", None, "", "  ", "x" * 257, "y" * 256, "../x", "b", "/etc/passwd"]
    rows = rows_of(tmp_path / "i.parquet", pa.table({"prompt": ["p"] * len(ids), "uid": ids}), id_column="uid")
    assert reasons(rows) == [None, None, "duplicate_id", "bad_id", "bad_id", "bad_id", "bad_id", None, None,
                             "duplicate_id", None]
    pending = [r for r in rows if r.status == "pending"]
    assert [r.row_id for r in pending] == ["a", "b", "y" * 256, "../x", "/etc/passwd"]
    # a too-long id is kept as a bounded prefix, and the manifest's error says so
    assert (rows[6].row_id, rows[6].error) == ("x" * 256, "id has 257 characters; limit 256")
    assert all(r.error is None for i, r in enumerate(rows) if i != 6)
    assert all("/" not in r.key and not r.key.startswith(".") for r in pending)
    # first occurrence wins even when it is rejected for another reason
    rows = rows_of(tmp_path / "j.parquet", pa.table({"prompt": [None, "p"], "uid": ["k", "k"]}), id_column="uid")
    assert reasons(rows) == ["empty_prompt", "duplicate_id"]
    # integer ids become text
    rows = rows_of(tmp_path / "k.parquet", pa.table({"prompt": ["p", "q"], "uid": [7, 7]}), id_column="uid")
    assert [r.row_id for r in rows] == ["7", "7"] and reasons(rows) == [None, "duplicate_id"]


def test_wrong_types_in_a_file_become_reasons(tmp_path):
    # A file that changed after planning: the worker still accounts for every row.
    path = tmp_path / "w.parquet"
    pq.write_table(pa.table({"prompt": [1, None], "negative_prompt": [3, 4]}), path)
    shard = Shard("f00000-000000", str(path), 0, 0, 2)
    rows = read_shard_rows(shard, DatasetConfig(uri=str(path)), RENDER, FS, LIMITS)
    assert reasons(rows) == ["bad_prompt", "empty_prompt"]
    pq.write_table(pa.table({"prompt": ["ok"], "negative_prompt": [3]}), path)
    rows = read_shard_rows(Shard("f00000-000000", str(path), 0, 0, 1), DatasetConfig(uri=str(path)), RENDER, FS, LIMITS)
    assert reasons(rows) == ["bad_negative_prompt"]


def test_invalid_utf8_is_a_bad_prompt(tmp_path):
    raw = pa.array([b"fine", b"\xff\xfebroken", None], pa.binary())
    prompts = pa.Array.from_buffers(pa.string(), 3, raw.buffers(), null_count=raw.null_count)
    rows = rows_of(tmp_path / "u.parquet", pa.table({"prompt": prompts}))
    assert reasons(rows) == [None, "bad_prompt", "empty_prompt"]
    assert rows[0].prompt == "fine"


def test_overrides_and_null_defaults(tmp_path):
    table = pa.table({
        "prompt": ["p0", "p1"],
        "negative_prompt": ["ugly", None],
        "height": [256, None],
        "width": [None, 64],
        "num_inference_steps": [None, 9],
        "guidance_scale": [0.5, None],
        "seed": pa.array([None, 99], pa.int64()),
    })
    first, second = rows_of(tmp_path / "o.parquet", table)
    assert (first.negative_prompt, first.height, first.width, first.num_inference_steps,
            first.guidance_scale, first.seed) == ("ugly", 256, 128, 4, 0.5, derive_seed(7, first.row_id))
    assert (second.negative_prompt, second.height, second.width, second.num_inference_steps,
            second.guidance_scale, second.seed) == ("blurry", 128, 64, 9, 3.0, 99)
    no_default = RenderConfig(negative_prompt=None)
    (row,) = rows_of(tmp_path / "n.parquet", pa.table({"prompt": ["p"]}), render=no_default)
    assert row.negative_prompt is None and (row.height, row.width) == (1024, 1024)


# ---------------------------------------------------------------- ids, seeds, ranges


def test_derived_ids_and_seeds_do_not_depend_on_sharding(tmp_path):
    data = tmp_path / "d"
    data.mkdir()
    pq.write_table(pa.table({"prompt": [f"a{i}" for i in range(5)]}), data / "a.parquet")
    pq.write_table(pa.table({"prompt": [f"b{i}" for i in range(50)]}), data / "b.parquet", row_group_size=7)

    def all_rows(shard_size):
        cfg = DatasetConfig(uri=str(data), shard_size=shard_size)
        shards, _ = plan_shards(cfg, FS)
        return [r for s in shards for r in read_shard_rows(s, cfg, RENDER, FS, LIMITS)]

    coarse, fine = all_rows(1000), all_rows(3)
    assert coarse == fine
    assert [r.prompt for r in coarse] == [f"a{i}" for i in range(5)] + [f"b{i}" for i in range(50)]
    assert coarse[5 + 42].row_id == "f00001-000000042" and coarse[5 + 42].row_index == 42
    assert coarse[0].row_id == coarse[0].key == "f00000-000000000"
    assert len({r.seed for r in coarse}) == len(coarse)


def test_shard_range_inside_and_across_row_groups(tmp_path):
    path = tmp_path / "r.parquet"
    pq.write_table(pa.table({"prompt": [f"p{i}" for i in range(100)]}), path, row_group_size=10)
    cfg = DatasetConfig(uri=str(path))
    for start, stop in [(0, 0), (3, 7), (9, 31), (95, 100), (0, 100)]:
        rows = read_shard_rows(Shard("s", str(path), 0, start, stop), cfg, RENDER, FS, LIMITS)
        assert [r.prompt for r in rows] == [f"p{i}" for i in range(start, stop)]
        assert [r.row_index for r in rows] == list(range(start, stop))


def test_derive_seed():
    expected = int.from_bytes(hashlib.sha256(b"7:row-1").digest()[:8], "big") & (2**63 - 1)
    assert derive_seed(7, "row-1") == expected
    assert derive_seed(7, "row-1") != derive_seed(8, "row-1") != derive_seed(7, "row-2")
    seeds = [derive_seed(0, str(i)) for i in range(2000)]
    assert all(0 <= s <= MAX_SEED for s in seeds) and len(set(seeds)) == 2000
    assert max(seeds) > 2**62  # uses the whole 63-bit range


# ---------------------------------------------------------------- object keys

KEY_RE = re.compile(r"[a-z0-9_-]+")  # lower case: one object per key on a case-insensitive filesystem


def test_object_key_examples():
    assert object_key("cat-001") == "cat-001"
    assert object_key("f00000-000000042") == "f00000-000000042"
    for unsafe in ["v1.2_final", "../x", "..", ".", "/etc/passwd", "a/b", "a\\b", "", " ", ".hidden", "a\nb", "abc\n",
                   "x" * 129, "日本", "C:\\x"]:
        key = object_key(unsafe)
        assert KEY_RE.fullmatch(key) and len(key) <= 200, (unsafe, key)
        assert key.endswith(hashlib.sha256(unsafe.encode()).hexdigest()[:16])
    assert object_key("../x") == "x-" + hashlib.sha256(b"../x").hexdigest()[:16]
    assert object_key("") == "id-" + hashlib.sha256(b"").hexdigest()[:16]
    # an id that looks like another id's hashed key is hashed too, so they cannot collide
    forged = object_key("a/b")
    assert forged.startswith("a_b-") and object_key(forged) != forged
    assert object_key("a/b") != object_key("a_b") != object_key("a:b")


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_object_key_is_always_safe(row_id):
    key = object_key(row_id)
    assert KEY_RE.fullmatch(key), key
    assert "/" not in key and "\\" not in key and not key.startswith(".") and key not in (".", "..")
    assert 1 <= len(key) <= 200
    assert object_key(row_id) == key


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=40), st.from_regex(r"[a-zA-Z_./-]{0,20}", fullmatch=True)),
                unique=True, max_size=40))
def test_distinct_ids_give_distinct_keys(ids):
    ids = ids + [object_key(i) for i in ids if object_key(i) not in ids]  # keys reused as ids
    ids = ids + [i.swapcase() for i in ids if i.swapcase() not in ids]  # ids differing only in case
    # distinct even where the filesystem ignores case (macOS, SMB)
    assert len({object_key(i).lower() for i in ids}) == len(ids)


def test_ids_differing_only_in_case_get_different_keys():
    assert object_key("Cat").lower() != object_key("cat").lower()
    assert object_key("Cat") == "cat-" + hashlib.sha256(b"Cat").hexdigest()[:16]
    assert object_key("IMG_01.PNG") == "img_01_png-" + hashlib.sha256(b"IMG_01.PNG").hexdigest()[:16]
    rng = random.Random(0)
    for word in ("cat", "row-0042", "a_b-c", "x" * 128, "f00000-000000042", "0123456789abcdef"):
        variants = {word.upper(), word.lower(), word.title()}
        variants |= {"".join(c.upper() if rng.random() < 0.5 else c for c in word) for _ in range(40)}
        keys = {object_key(v) for v in variants}
        assert len({k.lower() for k in keys}) == len(variants), word
        assert all(k == k.lower() and KEY_RE.fullmatch(k) for k in keys)


def test_lowercase_safe_ids_keep_their_keys():
    for row_id in ("cat", "cat-001", "f00000-000000042", "a_b", "-", "_x_", "9", "x" * 128, "row-0123456789abcde"):
        assert object_key(row_id) == row_id
    # a lowercase id shaped like a hashed key is still hashed, as before
    assert object_key("cat-0123456789abcdef") != "cat-0123456789abcdef"


def test_group_for_render_keeps_order():
    def spec(i, h, status="pending"):
        return RowSpec(row_id=str(i), key=str(i), prompt="p", negative_prompt=None, seed=i, height=h, width=128,
                       num_inference_steps=4, guidance_scale=3.0, file="f", row_index=i, status=status,
                       reason=None if status == "pending" else "bad_size")

    rows = [spec(0, 256), spec(1, 128), spec(2, 256), spec(3, 256, "rejected"), spec(4, 128)]
    groups = group_for_render(rows)
    assert list(groups) == [(256, 128, 4, 3.0), (128, 128, 4, 3.0)]
    assert [[r.row_id for r in g] for g in groups.values()] == [["0", "2"], ["1", "4"]]


# ---------------------------------------------------------------- property test

# Each strategy mixes valid values (so rows often stay pending) with every kind of bad one.
sizes = st.one_of(st.none(), st.sampled_from([16, 128, 2048]), st.integers(-4096, 4096))
steps = st.one_of(st.none(), st.integers(1, 50), st.integers(-5, 1005))
guidance = st.one_of(st.none(), st.floats(0, 20), st.floats(allow_nan=True, allow_infinity=True, width=64))
seeds = st.one_of(st.none(), st.integers(0, 2**63 - 1), st.integers(-(2**63), 2**63 - 1))
prompts = st.one_of(st.none(), st.text(min_size=1, max_size=20),
                    st.sampled_from(["", " ", "\t\n", "a cat", "\x00", "猫"]))
ids = st.one_of(st.sampled_from(["a", "b", "c"]), st.none(),
                st.sampled_from(["../a", "", " ", "x" * 300, "a/b", "/etc/x"]), st.text(max_size=8))


@st.composite
def row_tables(draw):
    n = draw(st.integers(0, 25))
    columns = {"prompt": pa.array(draw(st.lists(prompts, min_size=n, max_size=n)), pa.string())}
    optional = {
        "uid": (ids, pa.string()),
        "height": (sizes, pa.int64()),
        "width": (sizes, pa.int64()),
        "num_inference_steps": (steps, pa.int64()),
        "guidance_scale": (guidance, pa.float64()),
        "seed": (seeds, pa.int64()),
        "negative_prompt": (st.one_of(st.none(), st.text(max_size=5)), pa.string()),
    }
    for name, (values, arrow_type) in optional.items():
        if draw(st.booleans()):
            columns[name] = pa.array(draw(st.lists(values, min_size=n, max_size=n)), arrow_type)
    table = pa.table(columns)
    return table, draw(st.integers(1, 30)), draw(st.integers(1, 12)), draw(st.one_of(st.none(), st.integers(1, 30)))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(row_tables())
def test_every_input_row_gives_exactly_one_rowspec(case):
    table, row_group_size, shard_size, limit = case
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "t.parquet"
        pq.write_table(table, path, row_group_size=row_group_size)
        id_column = "uid" if "uid" in table.column_names else None
        cfg = DatasetConfig(uri=str(path), id_column=id_column, shard_size=shard_size, limit=limit)
        shards, fp = plan_shards(cfg, FS)
        expected = table.num_rows if limit is None else min(limit, table.num_rows)
        assert fp["planned_rows"] == expected == sum(s.num_rows for s in shards)
        all_rows = []
        for shard in shards:
            rows = read_shard_rows(shard, cfg, RENDER, FS, LIMITS)
            assert len(rows) == shard.num_rows
            pending = [r for r in rows if r.status == "pending"]
            assert len({r.row_id for r in pending}) == len(pending)
            assert len({r.key for r in pending}) == len(pending)
            all_rows += rows
    assert [r.row_index for r in all_rows] == list(range(expected))
    source = table.slice(0, expected).to_pylist()
    for row, raw in zip(all_rows, source):
        assert row.status in ("pending", "rejected")
        if row.status == "rejected":
            assert row.reason in REASONS and row.key is None
            continue
        assert row.reason is None and KEY_RE.fullmatch(row.key)
        assert row.prompt == raw["prompt"] and row.prompt.strip()
        assert 16 <= row.height <= 2048 and row.height % 16 == 0 and 16 <= row.width <= 2048 and row.width % 16 == 0
        assert 1 <= row.num_inference_steps <= 1000
        assert math.isfinite(row.guidance_scale) and row.guidance_scale >= 0
        assert 0 <= row.seed <= MAX_SEED
        if raw.get("seed") is not None:
            assert row.seed == raw["seed"]
        if raw.get("height") is not None:
            assert row.height == raw["height"]
        if id_column:
            assert row.row_id == raw["uid"]
