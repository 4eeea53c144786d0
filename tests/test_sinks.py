"""Sinks: the three layouts, byte-deterministic retries, image encoding."""
import io
import json
import os
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cogview_ray.sinks import (
    encode_image, iter_container, make_sink, read_output, split_locator,
)
from cogview_ray.storage import RunStore

pytestmark = [pytest.mark.timeout(60)]

FORMATS = ["files", "webdataset", "parquet"]


def pixels(seed, h=16, w=24):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def samples(image_format="png"):
    # Keys deliberately out of order; meta holds no timings (it must be deterministic).
    out = []
    for i, key in enumerate(["c-2", "a-0", "b-1"]):
        meta = {"id": key, "seed": 100 + i, "height": 16, "width": 24, "guidance_scale": 5.0,
                "prompt": f"prompt {i} ✓", "negative_prompt": None, "tags": ["x", i]}
        out.append((key, encode_image(pixels(i), image_format, 90), meta))
    return out


def write_shard(store, fmt, items, image_format="png"):
    sink = make_sink(fmt, store, "00007", image_format)
    keys = [sink.add(k, data, meta) for k, data, meta in items]
    sink.close()
    return keys


def container_path(fmt):
    return {"files": None, "webdataset": "shards/00007.tar", "parquet": "shards/00007.parquet"}[fmt]


@pytest.mark.parametrize("fmt", FORMATS)
def test_keys_read_back(store, fmt):
    items = samples()
    keys = write_shard(store, fmt, items)
    expected = {
        "files": "images/00007/{}.png",
        "webdataset": "shards/00007.tar#{}.png",
        "parquet": "shards/00007.parquet#{}.png",
    }[fmt]
    assert keys == [expected.format(k) for k, _, _ in items]
    for key, (_, data, _) in zip(keys, items):
        assert read_output(store, key) == data
    if fmt == "files":
        assert store.list("images/00007") == ["a-0.png", "b-1.png", "c-2.png"]
    else:
        assert store.list("shards") == [container_path(fmt).split("/")[1]]


@pytest.mark.parametrize("fmt", FORMATS)
def test_rewrite_is_byte_identical(store, fmt):
    items = samples()
    first_keys = write_shard(store, fmt, items)
    rel = container_path(fmt)
    paths = [split_locator(k)[0] for k in first_keys] if rel is None else [rel]
    first = {p: store.read(p) for p in paths}
    # A retry renders in another order (other batches), into a fresh sink.
    second_keys = write_shard(store, fmt, list(reversed(items)))
    assert sorted(second_keys) == sorted(first_keys)
    assert {p: store.read(p) for p in paths} == first


def test_tar_layout(tmp_path):
    store = RunStore(str(tmp_path), "run1")
    items = samples("webp")
    write_shard(store, "webdataset", items, "webp")
    with tarfile.open(fileobj=io.BytesIO(store.read("shards/00007.tar"))) as tar:
        members = tar.getmembers()
        assert [m.name for m in members] == [
            "a-0.webp", "a-0.json", "b-1.webp", "b-1.json", "c-2.webp", "c-2.json"]
        assert {(m.mtime, m.uid, m.gid, m.mode, m.uname, m.gname) for m in members} == {
            (0, 0, 0, 0o644, "", "")}
        meta = json.loads(tar.extractfile("c-2.json").read())
        assert meta == items[0][2]
        assert tar.extractfile("c-2.webp").read() == items[0][1]


def test_parquet_layout(tmp_path):
    store = RunStore(str(tmp_path), "run1")
    items = samples("jpeg")
    write_shard(store, "parquet", items, "jpeg")
    table = pq.read_table(io.BytesIO(store.read("shards/00007.parquet")))
    assert table.column("key").to_pylist() == ["a-0", "b-1", "c-2"]
    assert table.column("member").to_pylist() == ["a-0.jpg", "b-1.jpg", "c-2.jpg"]
    assert table.column("image").to_pylist()[2] == {"bytes": items[0][1], "path": "c-2.jpg"}
    # the storage type and schema metadata of a Hugging Face `datasets.Image` column
    assert table.schema.field("image").type == pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    assert json.loads(table.schema.metadata[b"huggingface"]) == {"info": {"features": {"image": {"_type": "Image"}}}}
    assert table.schema.field("seed").type == pa.int64()
    assert table.schema.field("guidance_scale").type == pa.float64()
    assert table.column("seed").to_pylist() == [101, 102, 100]
    assert table.column("prompt").to_pylist()[0] == "prompt 1 ✓"
    assert table.column("tags").to_pylist()[0] == '["x",1]'  # unknown keys as JSON text
    assert dict(iter_container(store, "shards/00007.parquet"))["b-1.jpg"] == items[2][1]


def test_parquet_containers_of_earlier_releases_still_read(tmp_path):
    """Before the Image struct, `image` was a plain binary column: readers take both."""
    store = RunStore(str(tmp_path), "run1")
    table = pa.table({"key": ["a"], "member": ["a.png"], "image": pa.array([b"old bytes"], pa.binary())})
    pq.write_table(table, str(tmp_path / "old.parquet"))
    store.upload("shards/00001.parquet", str(tmp_path / "old.parquet"))
    assert list(iter_container(store, "shards/00001.parquet")) == [("a.png", b"old bytes")]
    assert read_output(store, "shards/00001.parquet#a.png") == b"old bytes"


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_empty_and_discarded_shards_upload_nothing(tmp_path, fmt):
    store = RunStore(str(tmp_path), "run1")
    make_sink(fmt, store, "00001", "png").close()
    with pytest.raises(RuntimeError):
        with make_sink(fmt, store, "00002", "png") as sink:
            sink.add("a", b"bytes", {})
            spool = sink._dir
            raise RuntimeError("render crashed")
    assert not os.path.exists(spool)
    assert store.list("shards") == []


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("key", ["../x", "a/b", "", "..", "/abs", "x" * 201])
def test_unsafe_keys_refused(tmp_path, fmt, key):
    store = RunStore(str(tmp_path), "run1")
    sink = make_sink(fmt, store, "00001", "png")
    with pytest.raises(ValueError):
        sink.add(key, b"x", {})
    sink.close()
    assert not any(p.is_file() for p in tmp_path.rglob("*"))


def test_bad_format_and_shard_refused(tmp_path):
    store = RunStore(str(tmp_path), "run1")
    with pytest.raises(ValueError, match="tfrecord"):
        make_sink("tfrecord", store, "00001", "png")
    with pytest.raises(ValueError, match="gif"):
        make_sink("files", store, "00001", "gif")
    with pytest.raises(ValueError):
        make_sink("files", store, "../00001", "png")


@pytest.mark.parametrize("image_format,fmt_name", [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
def test_encode_image_is_deterministic(image_format, fmt_name):
    arr = pixels(3, 32, 48)
    data = encode_image(arr, image_format, 90)
    assert encode_image(arr.copy(), image_format, 90) == data
    with Image.open(io.BytesIO(data)) as im:
        assert im.format == fmt_name and im.size == (48, 32) and im.mode == "RGB"
        assert not im.info.get("exif") and "icc_profile" not in im.info
        if image_format == "png":
            assert np.array_equal(np.asarray(im), arr)  # lossless


def test_encode_image_quality_matters_and_bad_input_refused():
    arr = pixels(4, 32, 32)
    assert encode_image(arr, "jpeg", 30) != encode_image(arr, "jpeg", 95)
    with pytest.raises(ValueError, match="uint8"):
        encode_image(arr.astype(np.float32), "png")
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        encode_image(arr[..., :1], "png")


def test_container_upload_survives_transient_errors(tmp_path):
    from cogview_ray.storage import RetryPolicy
    from tests.test_storage import FlakyFS

    store = RunStore(str(tmp_path), "run1", retry=RetryPolicy(3, 0.001, 0.002))
    items = samples()
    keys = write_shard(store, "webdataset", items)
    clean = store.read("shards/00007.tar")
    store.delete("shards/00007.tar")
    flaky = FlakyFS(store.fs, error=lambda: ConnectionResetError("reset"))
    flaky.fail = {"put_file": 2}
    store.fs = flaky
    assert write_shard(store, "webdataset", items) == keys
    assert flaky.calls["put_file"] == 3
    assert store.read("shards/00007.tar") == clean


# --- failed attempts leave no local files ---------------------------------------------
@pytest.fixture
def spool_dir(tmp_path, monkeypatch):
    """The folder `tempfile` hands out for this test (where container sinks spool)."""
    import tempfile

    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def _left(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("fmt", FORMATS)
def test_an_attempt_that_raises_leaves_no_local_files(tmp_path, spool_dir, fmt):
    store = RunStore(str(tmp_path / "out"), "run1")
    with pytest.raises(RuntimeError, match="render crashed"):
        with make_sink(fmt, store, "00003", "png") as sink:
            for key, data, meta in samples():
                sink.add(key, data, meta)
            assert len(_left(spool_dir)) == (0 if fmt == "files" else 7)  # folder + 3 x (img, json)
            raise RuntimeError("render crashed")
    assert _left(spool_dir) == []
    assert not store.exists("shards/00003.tar") and not store.exists("shards/00003.parquet")


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_failed_upload_leaves_no_local_files(tmp_path, spool_dir, fmt, monkeypatch):
    store = RunStore(str(tmp_path / "out"), "run1")

    def store_down(*_args, **_kwargs):
        raise ConnectionError("store down")

    monkeypatch.setattr(store, "upload", store_down)  # containers: in close
    monkeypatch.setattr(store, "write", store_down)  # files: in add
    with pytest.raises(ConnectionError, match="store down"):
        with make_sink(fmt, store, "00003", "png") as sink:
            for key, data, meta in samples():
                sink.add(key, data, meta)
    assert _left(spool_dir) == []
    if fmt != "files":  # a failed close is final: the spool is gone, so is the sink
        with pytest.raises(RuntimeError, match="closed"):
            sink.add("d-3", b"x", {})


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_a_failed_container_build_leaves_no_local_files(tmp_path, spool_dir, fmt, monkeypatch):
    store = RunStore(str(tmp_path / "out"), "run1")
    sink = make_sink(fmt, store, "00003", "png")

    def build_half(out_path, keys):
        with open(out_path, "wb") as f:
            f.write(b"half a container")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sink, "_build", build_half)
    for key, data, meta in samples():
        sink.add(key, data, meta)
    with pytest.raises(OSError, match="No space"):
        sink.close()
    assert _left(spool_dir) == []
    assert store.list("shards") == []


def _worker(tmp_path, checkpoint, fmt, rows=12):
    """A RenderWorker built without Ray on the tiny checkpoint, and its one shard."""
    import fsspec

    from cogview_ray.config import load_config
    from cogview_ray.shards import plan_shards
    from cogview_ray.worker import RenderWorker

    pq.write_table(pa.table({"prompt": [f"prompt {i}" for i in range(rows)]}), str(tmp_path / "p.parquet"))
    cfg = load_config(None, [
        f"model.path={checkpoint}", "model.dtype=float32", "model.device=cpu",
        f"dataset.uri={tmp_path}/p.parquet", f"dataset.shard_size={rows}",
        "render.height=64", "render.width=64", "render.num_inference_steps=2", "render.batch_size=2",
        f"output.uri={tmp_path}/out", "output.run_id=r", f"output.format={fmt}"])
    shards, _ = plan_shards(cfg.dataset, fsspec.filesystem("file"))
    return RenderWorker(cfg, "r", "w00.0"), shards[0]


def _fail_on_call(fn, n, error, every_later=False):
    """`fn`, except that its n-th call (and, with `every_later`, every later one) raises `error`;
    the calls made are counted in `.calls`."""
    def wrapped(*args, **kwargs):
        wrapped.calls += 1
        if wrapped.calls == n or (every_later and wrapped.calls > n):
            raise error
        return fn(*args, **kwargs)

    wrapped.calls, wrapped.n = 0, n
    return wrapped


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("stage", ["render", "encode", "upload"])
def test_a_failed_shard_attempt_leaves_no_local_files(tmp_path, tiny_checkpoint, spool_dir, monkeypatch,
                                                      fmt, stage):
    from cogview_ray import worker as worker_mod

    worker, shard = _worker(tmp_path, tiny_checkpoint, fmt)
    with monkeypatch.context() as patch:
        if stage == "render":  # the third of six batches
            fault = _fail_on_call(worker.pipe.generate, 3, RuntimeError("device lost"))
            patch.setattr(worker.pipe, "generate", fault)
        elif stage == "encode":  # in the writer thread, the fifth of twelve images
            fault = _fail_on_call(worker_mod.encode_image, 5, RuntimeError("encoder crashed"))
            patch.setattr(worker_mod, "encode_image", fault)
        elif fmt == "files":  # each image is written as it is added; a few failed rows fail
            # only themselves (tests/test_worker_throughput.py): a store down from the fifth write
            # on fails the attempt once more rows than MAX_WRITE_FAILED_ROWS are lost
            worker.write_backoff_s = 0.0
            fault = _fail_on_call(worker.store.write, 5, ConnectionError("store down"), every_later=True)
            patch.setattr(worker.store, "write", fault)
        else:  # containers upload in close
            fault = _fail_on_call(worker.store.upload, 1, ConnectionError("store down"))
            patch.setattr(worker.store, "upload", fault)
        with pytest.raises((RuntimeError, ConnectionError), match="device lost|encoder crashed|store down"):
            worker.render_shard(shard, 1, 0.0)
        assert fault.calls >= fault.n  # the fault did fire
    assert _left(spool_dir) == []
    # the same worker then renders the shard in full, and that attempt leaves nothing either
    result = worker.render_shard(shard, 2, 0.0)
    assert [r.status for r in result.records] == ["ok"] * 12
    assert _left(spool_dir) == []
