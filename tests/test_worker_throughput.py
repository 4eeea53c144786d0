"""What keeps a worker's device busy, without Ray: claims issued concurrently, the next shard's rows
read while this one renders (used only for exactly that shard), writers in parallel with container
members added in row order, per-row retries of image writes, uint8 conversion before the copy."""
import threading
import time

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cogview_ray import layout
from cogview_ray import worker as worker_mod
from cogview_ray.config import load_config
from cogview_ray.input_version import FileVersion
from cogview_ray.model import to_uint8_hwc
from cogview_ray.rows import read_shard_rows
from cogview_ray.shards import Shard, plan_shards
from cogview_ray.worker import WRITE_TRIES, RenderWorker, _InOrder, _Prefetch

pytestmark = pytest.mark.timeout(300)

IDS = [f"row-{i}" for i in range(10)]


@pytest.fixture(scope="module")
def setup(tiny_checkpoint, tmp_path_factory):
    """One worker (format=files, user ids) and the three shards of a 10-row file (4 + 4 + 2 rows)."""
    tmp = tmp_path_factory.mktemp("throughput")
    pq.write_table(pa.table({"id": IDS, "prompt": [f"a cat #{i}" for i in range(10)]}), str(tmp / "p.parquet"))
    cfg = load_config(None, [
        f"model.path={tiny_checkpoint}", "model.dtype=float32", "model.device=cpu",
        f"dataset.uri={tmp}/p.parquet", "dataset.id_column=id", "dataset.shard_size=4",
        "render.height=32", "render.width=32", "render.num_inference_steps=1", "render.batch_size=2",
        f"output.uri={tmp}/out", "output.run_id=r", "output.format=files"])
    shards, _ = plan_shards(cfg.dataset, fsspec.filesystem("file"))
    worker = RenderWorker(cfg, "r", "w00.0")
    worker.write_backoff_s = 0.001
    return worker, shards


class CountingStore:
    """The worker's store, with each create-once slowed down and the calls in flight counted."""

    def __init__(self, real):
        self.real, self.active, self.peak, self.calls = real, 0, 0, 0
        self.lock = threading.Lock()

    def create_once(self, rel, data):
        with self.lock:
            self.active += 1
            self.calls += 1
            self.peak = max(self.peak, self.active)
        time.sleep(0.05)
        try:
            return self.real.create_once(rel, data)
        finally:
            with self.lock:
                self.active -= 1

    def read(self, rel):
        return self.real.read(rel)


def test_claims_are_issued_concurrently_with_results_in_row_order(setup, monkeypatch):
    worker, shards = setup
    shard = shards[1]
    rows = read_shard_rows(shard, worker.cfg.dataset, worker.cfg.render, worker.fs, worker.limits)
    # row-5's key is already owned by a row of another file: it becomes a duplicate
    worker.store.create_once(layout.claim("row-5"), b'{"file": "other.parquet", "id": "row-5", "row_index": 0}')
    counting = CountingStore(worker.store)
    monkeypatch.setattr(worker, "store", counting)
    claimed = worker._claim_all(shard, rows)
    assert [(r.row_id, r.status, r.reason) for r in claimed] == [
        ("row-4", "pending", None), ("row-5", "rejected", "duplicate_id"), ("row-6", "pending", None),
        ("row-7", "pending", None)]
    assert counting.calls == 4 and counting.peak >= 2  # in series the peak is 1
    # a second attempt of the same shard holds its claims already (same owner bytes)
    assert [r.status for r in worker._claim_all(shard, rows)] == ["pending", "rejected", "pending", "pending"]


def test_the_next_shard_is_prefetched_and_used_only_when_it_is_exactly_that_shard(setup, monkeypatch):
    worker, shards = setup
    reads = []
    real_read = worker_mod.read_shard_rows

    def counted(shard, *args):
        reads.append((shard.shard_id, shard.row_start, shard.row_stop))
        return real_read(shard, *args)

    monkeypatch.setattr(worker_mod, "read_shard_rows", counted)
    worker._prefetch = None
    first = worker.render_shard(shards[0], 1, 0.0)
    assert worker._prefetch.shard == shards[1]  # the successor, as planned (same file version)
    second = worker.render_shard(shards[1], 1, 0.0)
    third = worker.render_shard(shards[2], 1, 0.0)
    # shard 1 came from the prefetch; the guess after it (rows 8-12) missed shard 2 (rows 8-10),
    # which was read again; a short shard is its file's last, so nothing is read after it
    assert reads == [("f00000-000000", 0, 4), ("f00000-000001", 4, 8), ("f00000-000002", 8, 12),
                     ("f00000-000002", 8, 10)]
    assert worker._prefetch is None
    got = [(r.id, r.status) for res in (first, second, third) for r in res.records]
    assert [i for i, _ in got] == IDS and {s for _, s in got} <= {"ok", "rejected"}
    assert sum(s == "ok" for _, s in got) >= 9  # row-5 may be a duplicate from the claims test


def test_a_prefetch_is_never_used_for_another_version_or_range(setup):
    worker, shards = setup
    shard = shards[1]
    rows = read_shard_rows(shard, worker.cfg.dataset, worker.cfg.render, worker.fs, worker.limits)
    done = worker._reader.submit(lambda: rows)
    other_version = Shard(shard.shard_id, shard.file, shard.file_index, shard.row_start, shard.row_stop,
                          FileVersion(shard.file_version.size, sha256="0" * 64))
    assert _Prefetch(shard, done).take(other_version) is None
    assert _Prefetch(shard, done).take(shards[0]) is None
    assert _Prefetch(shard, done).take(shard) is rows
    failed = worker._reader.submit(lambda: 1 / 0)
    assert _Prefetch(shard, failed).take(shard) is None  # the caller reads (and raises) itself


def test_one_failing_image_write_fails_only_its_row(setup, monkeypatch):
    worker, shards = setup
    tries, real_write = {}, worker.store.write

    def write(rel, data):
        tries[rel] = tries.get(rel, 0) + 1
        if "row-1" in rel:  # always
            raise ConnectionError("store down")
        if "row-2" in rel and tries[rel] == 1:  # once: the retry writes it
            raise ConnectionError("slow down")
        return real_write(rel, data)

    monkeypatch.setattr(worker.store, "write", write)
    worker._prefetch = None
    result = worker.render_shard(shards[0], 2, 0.0)
    by_id = {r.id: r for r in result.records}
    bad = by_id["row-1"]
    assert (bad.status, bad.reason, bad.error, bad.key, bad.sha256) == (
        "failed", "write_failed", "ConnectionError: store down", None, None)
    assert tries["images/f00000-000000/row-1.png"] == WRITE_TRIES == 3
    assert tries["images/f00000-000000/row-2.png"] == 2
    assert [by_id[i].status for i in ("row-0", "row-2", "row-3")] == ["ok"] * 3
    assert by_id["row-2"].key == "images/f00000-000000/row-2.png"
    assert {(r.family, r.attention) for r in result.records} == {("cogview3plus", worker.pipe.identity["attention"])}


def test_a_store_that_fails_many_rows_fails_the_shard(setup, monkeypatch):
    worker, shards = setup
    tries = []

    def write(rel, data):
        tries.append(rel)
        raise PermissionError("access denied")

    monkeypatch.setattr(worker.store, "write", write)
    monkeypatch.setattr(worker_mod, "MAX_WRITE_FAILED_ROWS", 1)  # the shard has only 4 rows
    worker._prefetch = None
    with pytest.raises(RuntimeError, match="image writes failed for 2 rows of the shard, the last with "
                                           "PermissionError: access denied"):
        worker.render_shard(shards[0], 3, 0.0)
    assert len(tries) >= 2 * WRITE_TRIES


def test_container_members_are_added_in_row_order_whoever_encodes_first():
    order, added = _InOrder(enabled=True), []

    def task(n):
        time.sleep((7 - n) * 0.01)  # later rows finish encoding first
        if n == 3:
            with order.turn(n):  # a failed encode passes its turn on
                raise RuntimeError("encoder crashed")
        with order.turn(n):
            added.append(n)

    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = [pool.submit(task, n) for n in range(8)]
    assert added == [0, 1, 2, 4, 5, 6, 7]
    assert isinstance(futures[3].exception(), RuntimeError)


def test_uint8_conversion_before_the_copy_gives_the_host_conversions_bytes():
    def on_host(images):  # the conversion as it was, after the copy to the host
        arr = images.detach().float().cpu().clamp(0, 1).permute(0, 2, 3, 1).numpy()
        return (arr * 255).round().astype(np.uint8)

    ramp = (torch.arange(255 * 64, dtype=torch.float32) / (255 * 64)).reshape(1, 1, 120, 136).expand(2, 3, -1, -1)
    halves = (torch.arange(256, dtype=torch.float32) + 0.5).div(255).reshape(1, 1, 16, 16).expand(1, 3, -1, -1)
    noisy = torch.rand(2, 3, 40, 24, generator=torch.Generator().manual_seed(0)) * 1.4 - 0.2
    for images in (ramp, halves, noisy, noisy.bfloat16()):
        got = to_uint8_hwc(images)
        assert got.dtype == np.uint8 and np.array_equal(got, on_host(images))
