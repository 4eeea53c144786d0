"""Planning: listing, shard boundaries and ids, limits, fingerprints, bad files, footer-only reads."""
import hashlib
import json
import os
import pickle
import shutil
import time
import tracemalloc

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileSystem

from cogview_ray.config import DatasetConfig
from tests.conftest import PLANTED_SECRET
from cogview_ray import input_version as input_version_module
from cogview_ray.input_version import FileVersion, InputChanged, check_file_version, file_version, open_planned
from cogview_ray.shards import DatasetError, Shard, diff_fingerprints, plan_shards

pytestmark = pytest.mark.timeout(180)

FS = fsspec.filesystem("file")


def write_prompts(path, n, row_group_size=None, **extra):
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.table({"prompt": [f"prompt {i}" for i in range(n)], **extra}) if n else pa.table(
        {"prompt": pa.array([], pa.string()), **extra})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def plan(uri, **kw):
    return plan_shards(DatasetConfig(uri=str(uri), **kw), FS)


def ranges(shards):
    return [(s.shard_id, os.path.basename(s.file), s.row_start, s.row_stop) for s in shards]


class CountingFS(LocalFileSystem):
    """A local filesystem that counts the bytes read through the files it opens."""

    cachable = False

    def __init__(self):
        super().__init__()
        self.bytes_read = 0

    def _open(self, path, mode="rb", **kwargs):
        return _CountingFile(super()._open(path, mode, **kwargs), self)


class _CountingFile:
    def __init__(self, f, owner):
        self._f, self._owner = f, owner

    def read(self, n=-1):
        data = self._f.read(n)
        self._owner.bytes_read += len(data)
        return data

    def readinto(self, buffer):
        n = self._f.readinto(buffer)
        self._owner.bytes_read += n or 0
        return n

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


# ---------------------------------------------------------------- listing and shards


def test_folder_of_files(tmp_path):
    data = tmp_path / "data"
    write_prompts(data / "b.parquet", 25, row_group_size=7)
    write_prompts(data / "a.parquet", 10)
    write_prompts(data / "sub" / "c.parquet", 3)
    (data / "README.txt").write_text("not data")
    shards, fp = plan(data, shard_size=10)
    assert ranges(shards) == [
        ("f00000-000000", "a.parquet", 0, 10),
        ("f00001-000000", "b.parquet", 0, 10),
        ("f00001-000001", "b.parquet", 10, 20),
        ("f00001-000002", "b.parquet", 20, 25),
        ("f00002-000000", "c.parquet", 0, 3),
    ]
    assert [s.num_rows for s in shards] == [10, 10, 10, 5, 3]
    assert [f["path"] for f in fp["files"]] == ["a.parquet", "b.parquet", "sub/c.parquet"]
    assert fp["num_rows"] == fp["planned_rows"] == 38 and fp["num_files"] == 3
    # shards name their files as the filesystem does, in sorted order
    assert list(dict.fromkeys(s.file for s in shards)) == [
        str(data / "a.parquet"), str(data / "b.parquet"), str(data / "sub" / "c.parquet")]


def test_glob_and_single_file(tmp_path):
    for name, n in [("part-0.parquet", 4), ("part-1.parquet", 5), ("other.parquet", 6)]:
        write_prompts(tmp_path / name, n)
    shards, fp = plan(tmp_path / "part-*.parquet", shard_size=3)
    assert ranges(shards) == [
        ("f00000-000000", "part-0.parquet", 0, 3), ("f00000-000001", "part-0.parquet", 3, 4),
        ("f00001-000000", "part-1.parquet", 0, 3), ("f00001-000001", "part-1.parquet", 3, 5),
    ]
    assert [f["path"] for f in fp["files"]] == ["part-0.parquet", "part-1.parquet"]
    shards, fp = plan(tmp_path / "other.parquet", shard_size=100)
    assert ranges(shards) == [("f00000-000000", "other.parquet", 0, 6)]
    assert fp["files"][0]["path"] == "other.parquet"


def test_relative_uri_and_base_path(tmp_path, monkeypatch):
    write_prompts(tmp_path / "d" / "x.parquet", 2)
    via_base = plan_shards(DatasetConfig(uri="d/x.parquet"), FS, base_path=str(tmp_path))
    monkeypatch.chdir(tmp_path)
    via_cwd = plan_shards(DatasetConfig(uri="d/x.parquet"), None)
    assert via_base == via_cwd
    assert via_base[0][0].file == str(tmp_path / "d" / "x.parquet")


def test_limit_across_files_and_files_past_it_unopened(tmp_path):
    write_prompts(tmp_path / "a.parquet", 25)
    write_prompts(tmp_path / "b.parquet", 25)
    (tmp_path / "c.parquet").write_bytes(b"garbage past the limit")
    shards, fp = plan(tmp_path, shard_size=10, limit=30)
    assert ranges(shards) == [
        ("f00000-000000", "a.parquet", 0, 10), ("f00000-000001", "a.parquet", 10, 20),
        ("f00000-000002", "a.parquet", 20, 25), ("f00001-000000", "b.parquet", 0, 5),
    ]
    assert sum(s.num_rows for s in shards) == fp["planned_rows"] == 30
    assert [f["path"] for f in fp["files"]] == ["a.parquet", "b.parquet"]
    with pytest.raises(DatasetError, match="c.parquet"):
        plan(tmp_path, shard_size=10, limit=51)


def test_empty_file_keeps_its_index(tmp_path):
    write_prompts(tmp_path / "a.parquet", 0)
    write_prompts(tmp_path / "b.parquet", 2)
    shards, fp = plan(tmp_path)
    assert ranges(shards) == [("f00001-000000", "b.parquet", 0, 2)]
    assert [f["num_rows"] for f in fp["files"]] == [0, 2]


def test_deterministic_and_picklable(tmp_path):
    write_prompts(tmp_path / "a.parquet", 1234, row_group_size=100)
    first, fp1 = plan(tmp_path, shard_size=100)
    second, fp2 = plan(tmp_path, shard_size=100)
    assert first == second and fp1 == fp2
    assert len({s.shard_id for s in first}) == len(first) == 13
    assert pickle.loads(pickle.dumps(first)) == first
    assert isinstance(first[0], Shard) and first[-1].num_rows == 34


# ---------------------------------------------------------------- fingerprint


def test_fingerprint_is_json_and_detects_changes(tmp_path):
    data = tmp_path / "data"
    path = write_prompts(data / "a.parquet", 10)
    write_prompts(data / "b.parquet", 10)
    _, fp = plan(data)
    assert json.loads(json.dumps(fp)) == fp
    assert set(fp["files"][0]) == {"path", "size", "sha256", "num_rows"}

    # moving the whole dataset changes nothing, even with fresh mtimes (as `ray job submit
    # --working-dir` unpacks files)
    moved = tmp_path / "moved"
    shutil.copytree(data, moved, copy_function=shutil.copy)
    for f in moved.iterdir():
        os.utime(f, ns=(1, 1))
    assert diff_fingerprints(fp, plan(moved)[1]) == []

    # rewrite with the same row count: the content changed, the fingerprint must too
    stat = os.stat(path)
    pq.write_table(pa.table({"prompt": [f"other {i}" for i in range(10)]}), path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    _, changed = plan(data)
    assert changed != fp
    lines = diff_fingerprints(fp, changed)
    assert lines and all(line.startswith("a.parquet: ") for line in lines)
    assert any("sha256" in line for line in lines)

    write_prompts(data / "c.parquet", 1)
    assert "c.parquet: added" in diff_fingerprints(changed, plan(data)[1])


def test_file_version_prefers_version_id_then_etag_else_content(tmp_path):
    path = str(write_prompts(tmp_path / "a.parquet", 3))
    memory = fsspec.filesystem("memory")
    assert file_version("x", memory, {"size": 5, "ETag": '"abc"', "mtime": 5}) == FileVersion(5, etag="abc")
    both = file_version("x", memory, {"size": 5, "ETag": '"abc"', "VersionId": "v1"})
    assert both == FileVersion(5, version_id="v1", etag="abc") and both.identity() == {"version_id": "v1"}
    assert file_version("x", memory, {"size": 5, "ETag": "abc", "VersionId": "null"}).identity() == {"etag": "abc"}
    data = open(path, "rb").read()
    local = file_version(path, FS)
    assert local == FileVersion(len(data), sha256=hashlib.sha256(data).hexdigest())
    memory.pipe_file("/m/a.parquet", data)  # no ETag, no version: the content, streamed
    assert file_version("/m/a.parquet", memory).identity() == local.identity()


def _footer(path) -> bytes:
    blob = path.read_bytes()
    return blob[-8 - int.from_bytes(blob[-8:-4], "little"):]


def _edit_in_place(path, old: bytes, new: bytes) -> None:
    """Overwrite bytes inside the file without changing its size, as an editor or `dd` would."""
    assert len(old) == len(new)
    blob = path.read_bytes()
    at = blob.index(old)
    stat = os.stat(path)
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(new)
    # a real edit moves the mtime; make sure it does even on a coarse-clock filesystem
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))


def _plain_prompts(path, prompts):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"prompt": prompts}), path, compression="none", use_dictionary=False)
    return path


def test_same_size_in_place_edit_changes_the_fingerprint(tmp_path):
    path = _plain_prompts(tmp_path / "data" / "a.parquet", [f"a red fox number {i}" for i in range(10)])
    _, before = plan(tmp_path / "data")
    footer, size = _footer(path), path.stat().st_size
    _edit_in_place(path, b"a red fox number 5", b"a tan cat number 5")
    assert _footer(path) == footer and path.stat().st_size == size  # a footer digest would miss it
    _, after = plan(tmp_path / "data")
    assert after != before
    lines = diff_fingerprints(before, after)
    assert len(lines) == 1 and lines[0].startswith("a.parquet: sha256 ") and "size" not in lines[0]
    assert before["files"][0]["sha256"] in lines[0] and after["files"][0]["sha256"] in lines[0]


def test_content_digest_is_computed_once_per_file_version(tmp_path, monkeypatch):
    path = _plain_prompts(tmp_path / "a.parquet", [f"p{i}" for i in range(100)])
    calls = []
    real = input_version_module._sha256_stream
    monkeypatch.setattr(input_version_module, "_sha256_stream", lambda f: calls.append(1) or real(f))
    shards, _ = plan(path, shard_size=10)
    assert len(shards) == 10 and len(calls) == 1
    for shard in shards:  # a worker checking every shard of the file reads it no more
        check_file_version(shard, FS)
    plan(path, shard_size=10)
    assert len(calls) == 1
    os.utime(path, ns=(1, 1))  # a new (path, size, mtime): digest again
    plan(path, shard_size=10)
    assert len(calls) == 2


def test_old_fingerprint_format_is_explained_in_one_line(tmp_path):
    _, fp = plan(write_prompts(tmp_path / "a.parquet", 3))
    old = {**fp, "version": 2, "files": [{"path": "a.parquet", "size": 1, "footer_sha256": "x", "num_rows": 3}]}
    assert diff_fingerprints(old, fp) == [
        "fingerprint format 2 -> 3 (the input was fingerprinted by another cogview-ray version; start a new run)"]


# ---------------------------------------------------------------- reading the planned version


def _read_prompts(shard, fs):
    with open_planned(shard, fs) as f:
        return pq.ParquetFile(f).read().column("prompt").to_pylist()


def test_workers_refuse_an_edited_or_replaced_file(tmp_path):
    path = _plain_prompts(tmp_path / "a.parquet", [f"a red fox number {i}" for i in range(10)])
    shards, fp = plan(path, shard_size=4)
    assert all(s.file_version == FileVersion(fp["files"][0]["size"], sha256=fp["files"][0]["sha256"])
               for s in shards)
    check_file_version(shards[0], FS)
    assert _read_prompts(shards[0], FS)[5] == "a red fox number 5"

    _edit_in_place(path, b"a red fox number 5", b"a tan cat number 5")
    for attempt in (lambda: check_file_version(shards[1], FS), lambda: _read_prompts(shards[1], FS)):
        with pytest.raises(InputChanged) as info:
            attempt()
        message = str(info.value)
        assert str(path) in message and "sha256" in message and "\n" not in message
        assert info.value.reason == "input_changed" and isinstance(info.value, DatasetError)

    replacement = _plain_prompts(tmp_path / "new.parquet", [f"a red fox number {i}" for i in range(10)])
    os.replace(replacement, path)  # back to the planned bytes under a new inode: accepted
    check_file_version(shards[2], FS)
    assert _read_prompts(shards[2], FS)[5] == "a red fox number 5"
    path.unlink()
    with pytest.raises(InputChanged, match="no longer exists"):
        check_file_version(shards[2], FS)
    # shards planned before versions were recorded are read as before
    assert Shard("f00000-000000", str(path), 0, 0, 1).file_version is None


# ---------------------------------------------------------------- bad input


def test_missing_inputs(tmp_path):
    with pytest.raises(DatasetError, match="nope.parquet does not exist"):
        plan(tmp_path / "nope.parquet")
    with pytest.raises(DatasetError, match=r"glob .*\*\.parquet matches no files"):
        plan(tmp_path / "*.parquet")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("x")
    with pytest.raises(DatasetError, match="empty holds no"):
        plan(tmp_path / "empty")


def test_bad_files(tmp_path):
    good = write_prompts(tmp_path / "good.parquet", 50)
    blob = good.read_bytes()
    cases = {
        "text.parquet": b"id,prompt\n1,a cat\n",
        "empty.parquet": b"",
        "cut-tail.parquet": blob[:-5],
        "cut-half.parquet": blob[: len(blob) // 2],
        "bad-footer.parquet": blob[:-12] + b"\xff" * 8 + blob[-4:],
    }
    for name, content in cases.items():
        path = tmp_path / "bad" / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(content)
        with pytest.raises(DatasetError) as info:
            plan(path)
        message = str(info.value)
        assert name in message and "\n" not in message, message


def test_bad_columns(tmp_path):
    write_prompts(tmp_path / "nop.parquet", 0)
    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "noprompt.parquet")
    with pytest.raises(DatasetError, match=r"noprompt.parquet has no prompt column 'prompt'"):
        plan(tmp_path / "noprompt.parquet")
    pq.write_table(pa.table({"prompt": [1, 2]}), tmp_path / "ints.parquet")
    with pytest.raises(DatasetError, match=r"ints.parquet has prompt column 'prompt' of type int64, not strings"):
        plan(tmp_path / "ints.parquet")
    pq.write_table(pa.table({"prompt": [b"x"]}), tmp_path / "bin.parquet")
    with pytest.raises(DatasetError, match="bin.parquet"):
        plan(tmp_path / "bin.parquet")
    write_prompts(tmp_path / "noid.parquet", 2)
    with pytest.raises(DatasetError, match=r"noid.parquet has no id column 'uid'"):
        plan(tmp_path / "noid.parquet", id_column="uid")
    write_prompts(tmp_path / "floatid.parquet", 2, uid=[1.5, 2.5])
    with pytest.raises(DatasetError, match=r"floatid.parquet has id column 'uid' of type double"):
        plan(tmp_path / "floatid.parquet", id_column="uid")
    # accepted: dictionary-encoded and large strings, integer ids, all-null prompts
    pq.write_table(pa.table({"prompt": pa.array(["a", "b"]).dictionary_encode(), "uid": [1, 2]}),
                   tmp_path / "ok1.parquet")
    pq.write_table(pa.table({"prompt": pa.array(["a"], pa.large_string())}), tmp_path / "ok2.parquet")
    pq.write_table(pa.table({"prompt": pa.array([None, None], pa.null())}), tmp_path / "ok3.parquet")
    for name in ("ok1", "ok2", "ok3"):
        assert plan(tmp_path / f"{name}.parquet", id_column="uid" if name == "ok1" else None)[0]


# ---------------------------------------------------------------- scale: footers only


def _write_big(path, num_rows, prompt_bytes):
    """num_rows random lowercase prompts of prompt_bytes each, plain-encoded and uncompressed."""
    rng = np.random.default_rng(0)
    data = rng.integers(97, 123, size=num_rows * prompt_bytes, dtype=np.uint8)
    offsets = np.arange(0, (num_rows + 1) * prompt_bytes, prompt_bytes, dtype=np.int32)
    prompts = pa.StringArray.from_buffers(num_rows, pa.py_buffer(offsets), pa.py_buffer(data))
    table = pa.table({"prompt": prompts, "seed": pa.array(np.arange(num_rows, dtype=np.int64))})
    pq.write_table(table, path, row_group_size=100_000, compression="none", use_dictionary=False)


def test_million_rows_planned_from_footer_only(tmp_path):
    num_rows, prompt_bytes = 1_000_000, 200
    path = tmp_path / "big.parquet"
    _write_big(path, num_rows, prompt_bytes)
    file_size = path.stat().st_size
    prompt_column_bytes = num_rows * prompt_bytes
    assert file_size > prompt_column_bytes

    fs = CountingFS()
    tracemalloc.start()
    started = time.perf_counter()
    shards, fp = plan_shards(DatasetConfig(uri=str(path), shard_size=1000), fs)
    elapsed_s = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    assert len(shards) == 1000 and sum(s.num_rows for s in shards) == num_rows == fp["num_rows"]
    assert shards[-1].shard_id == "f00000-000999" and shards[-1].row_stop == num_rows
    # pyarrow read the footer, nothing of the 200 MB column; the content digest streams the
    # file once through the OS in 256 KiB reads (not counted here), so memory stays flat
    assert fs.bytes_read < 256 * 1024, fs.bytes_read
    assert fp["files"][0]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert fs.bytes_read < file_size / 500
    assert peak < prompt_column_bytes / 100, peak  # < 2 MB of Python memory for 1000 shards
    assert elapsed_s < 20, elapsed_s

    # the counter can see a real read: the prompt column of one row group is ~20 MB
    control = CountingFS()
    with control.open(str(path), "rb") as f:
        pq.ParquetFile(f).read_row_group(0, columns=["prompt"])
    assert control.bytes_read > 100_000 * prompt_bytes


@pytest.mark.s3
def test_plan_and_read_on_s3(s3_bucket, s3_storage_options):
    from cogview_ray.config import RenderConfig
    from cogview_ray.rows import read_shard_rows

    fs = fsspec.filesystem("s3", **s3_storage_options)
    for name, n in [("part-0.parquet", 5), ("part-1.parquet", 3)]:
        with fs.open(f"{s3_bucket}/in/{name}", "wb") as f:
            pq.write_table(pa.table({"prompt": [f"{name} {i}" for i in range(n)]}), f)
    cfg = DatasetConfig(uri=f"s3://{s3_bucket}/in/*.parquet", shard_size=4)
    shards, fp = plan_shards(cfg, fs)
    assert ranges(shards) == [
        ("f00000-000000", "part-0.parquet", 0, 4), ("f00000-000001", "part-0.parquet", 4, 5),
        ("f00001-000000", "part-1.parquet", 0, 3),
    ]
    assert [f["path"] for f in fp["files"]] == ["part-0.parquet", "part-1.parquet"]
    assert all(f["etag"] and "mtime" not in f for f in fp["files"])
    assert plan_shards(DatasetConfig(uri=f"s3://{s3_bucket}/in", shard_size=4), fs)[1] == fp
    rows = read_shard_rows(shards[1], cfg, RenderConfig(), fs)
    assert [r.prompt for r in rows] == ["part-0.parquet 4"]
    fs.pipe_file(f"{s3_bucket}/in/part-1.parquet", fs.cat_file(f"{s3_bucket}/in/part-0.parquet"))
    fs.invalidate_cache()
    assert any("etag" in line for line in diff_fingerprints(fp, plan_shards(cfg, fs)[1]))


@pytest.mark.s3
def test_s3_etag_pins_the_planned_object(s3_bucket, s3_storage_options):
    fs = fsspec.filesystem("s3", **s3_storage_options)
    key = f"{s3_bucket}/in/a.parquet"
    with fs.open(key, "wb") as f:
        pq.write_table(pa.table({"prompt": [f"a red fox number {i}" for i in range(10)]}), f,
                       compression="none", use_dictionary=False)
    shards, fp = plan_shards(DatasetConfig(uri=f"s3://{key}", shard_size=5), fs)
    etag = fp["files"][0]["etag"]
    assert etag and shards[0].file_version.etag == etag and shards[0].file_version.sha256 is None
    check_file_version(shards[0], fs)
    assert _read_prompts(shards[0], fs)[5] == "a red fox number 5"

    blob = fs.cat_file(key)
    fs.pipe_file(key, blob.replace(b"a red fox number 5", b"a tan cat number 5"))  # same size
    for attempt in (lambda: check_file_version(shards[1], fs), lambda: _read_prompts(shards[1], fs)):
        with pytest.raises(InputChanged, match=r"a\.parquet changed since the run was planned \(etag "):
            attempt()
    fs.rm_file(key)
    with pytest.raises(InputChanged, match="no longer exists"):
        check_file_version(shards[1], fs)


@pytest.mark.s3
def test_s3_version_id_opens_the_planned_version(s3_endpoint, s3_bucket, s3_storage_options):
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1", aws_access_key_id="testing-key",
                 aws_secret_access_key=PLANTED_SECRET).put_bucket_versioning(
        Bucket=s3_bucket, VersioningConfiguration={"Status": "Enabled"})
    fs = fsspec.filesystem("s3", version_aware=True, **s3_storage_options)
    key = f"{s3_bucket}/in/a.parquet"
    with fs.open(key, "wb") as f:
        pq.write_table(pa.table({"prompt": ["planned"] * 3}), f)
    shards, fp = plan_shards(DatasetConfig(uri=f"s3://{s3_bucket}/in/*.parquet"), fs)
    version_id = fp["files"][0]["version_id"]
    assert version_id and shards[0].file_version.version_id == version_id
    with fs.open(key, "wb") as f:
        pq.write_table(pa.table({"prompt": ["edited"] * 3}), f)
    with pytest.raises(InputChanged, match="version_id"):
        check_file_version(shards[0], fs)  # the latest object is another version ...
    assert _read_prompts(shards[0], fs) == ["planned"] * 3  # ... but the planned one is read
    plain = fsspec.filesystem("s3", **s3_storage_options)  # not version aware: a twin opens it
    assert _read_prompts(shards[0], plain) == ["planned"] * 3
