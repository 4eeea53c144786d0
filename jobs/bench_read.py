"""Cost of reading one shard's rows by its position in a big row group.

    python jobs/bench_read.py --stream             # 5M rows, one row group, shard_size 1000
    python jobs/bench_read.py --rows 1000000 --row-group-rows 100000 --workers 1 8

Writes one Parquet file of short prompts (pyarrow's defaults, `--row-group-rows` per row
group), plans it, then reads shards through `rows.read_shard_rows` on a filesystem that
counts the bytes read. Prints, for the first, middle and last shard: seconds (median of
`--repeat`) and bytes, and their ratio to the first shard's; then the bytes a whole run reads,
as a multiple of the file's size, for `--workers` simulated worker processes (each with its own
per-process cache) fed shards round robin, in contiguous blocks, or by the driver's `ShardQueue`
(`pop(worker)`, workers asking in turn or in a seeded random order). The cost a process pays
once per file (footer, page locations) is printed apart ("cold"). "read only" times reading
the prompts alone (no validation); `--stream` adds the old way, streaming the cut row group
from its start. `--pop-cost N` also times `ShardQueue.pop` over N shards.
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileOpener, LocalFileSystem

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cogview_ray import pages, rows  # noqa: E402
from cogview_ray.config import DatasetConfig, RenderConfig  # noqa: E402
from cogview_ray.shard_queue import ShardQueue  # noqa: E402
from cogview_ray.input_version import open_planned  # noqa: E402
from cogview_ray.shards import Shard, plan_shards  # noqa: E402

RENDER = RenderConfig(height=1024, width=1024)
LIMITS = rows.SizeLimits(multiple_px=16, max_px=2048)


class CountingOpener(LocalFileOpener):
    """A local file that adds every byte it hands out to `CountingFileSystem.bytes_read`."""

    def read(self, *args, **kwargs):
        data = super().read(*args, **kwargs)
        CountingFileSystem.bytes_read += len(data)
        return data

    def readinto(self, buf):
        n = self.f.readinto(buf)
        CountingFileSystem.bytes_read += n or 0
        return n


class CountingFileSystem(LocalFileSystem):
    protocol = "counting"
    bytes_read = 0

    def _open(self, path, mode="rb", block_size=None, **kwargs):
        return CountingOpener(self._strip_protocol(path), mode, fs=self, **kwargs)


def write_file(path: Path, num_rows: int, row_group_rows: int) -> None:
    """Short, unique prompts, built 100k rows at a time, cut into row groups of `row_group_rows`
    (a single write: pyarrow starts a new row group on every write call)."""
    chunks = [pa.array([f"a photo of item {i} on a table" for i in range(start, min(num_rows, start + 100_000))])
              for start in range(0, num_rows, 100_000)]
    pq.write_table(pa.table({"prompt": pa.chunked_array(chunks)}), path, row_group_size=row_group_rows)


def forget_spans() -> None:
    """Drop the pages each process keeps decoded (page locations stay): the next read of a shard
    costs what it costs when another worker read the shard before it."""
    for index in pages._INDEX_CACHE.values():
        index.last_span.clear()


def read_cost(shard, cfg, fs, repeat: int) -> tuple[float, int]:
    """(median seconds, bytes) of reading one shard's rows, the file's index already cached."""
    times, n_bytes = [], 0
    for _ in range(repeat):
        forget_spans()
        before = CountingFileSystem.bytes_read
        t0 = time.perf_counter()
        got = rows.read_shard_rows(shard, cfg, RENDER, fs, LIMITS)
        times.append(time.perf_counter() - t0)
        n_bytes = CountingFileSystem.bytes_read - before
        assert len(got) == shard.num_rows
    return statistics.median(times), n_bytes


def read_only_cost(shard, fs, old: bool) -> tuple[float, int]:
    """(seconds, bytes) of only reading the shard's prompts: through `pages` (with its
    per-process index warm), or the old way, streaming the cut row group from its start."""
    key = (shard.file, shard.file_version)
    before = CountingFileSystem.bytes_read
    t0 = time.perf_counter()
    with open_planned(shard, fs) as f:
        if old:
            pf = pq.ParquetFile(f, pre_buffer=False, buffer_size=rows.READ_BUFFER_BYTES)
            offset, group = 0, 0
            while offset + pf.metadata.row_group(group).num_rows <= shard.row_start:
                offset += pf.metadata.row_group(group).num_rows
                group += 1
            pages._stream_group(pf, group, ["prompt"], shard.row_start - offset, shard.row_stop - offset)
        else:
            pf = pages.open_parquet(f, key, buffer_size=rows.READ_BUFFER_BYTES)
            pages.read_row_range(f, pf, ["prompt"], shard.row_start, shard.row_stop, key)
    return time.perf_counter() - t0, CountingFileSystem.bytes_read - before


def median_read_only_cost(shard, fs, old: bool, repeat: int) -> tuple[float, int]:
    runs = []
    for _ in range(repeat):
        forget_spans()
        runs.append(read_only_cost(shard, fs, old))
    return statistics.median(r[0] for r in runs), runs[-1][1]


ORDERS = ("round-robin", "blocks", "queue", "queue-random")


def deal(shards, workers: int, order: str):
    """(worker, shard) in the order a run hands them out: round robin (a FIFO queue feeding
    whichever worker is free), contiguous blocks, or the driver's `ShardQueue` with workers asking
    in turn (`queue`) or in a seeded random order (`queue-random`: workers of uneven speed)."""
    if order in ("round-robin", "blocks"):
        for i, shard in enumerate(shards):
            yield (i % workers if order == "round-robin" else i * workers // len(shards)), shard
        return
    queue, rng = ShardQueue(shards, max_attempts=1), random.Random(0)
    for i in range(len(shards)):
        worker = i % workers if order == "queue" else rng.randrange(workers)
        yield worker, queue.pop(worker).shard


def run_bytes(shards, fs, workers: int, order: str) -> int:
    """Bytes read by a whole run of `workers` processes, each with its own cache, shards dealt
    as `deal` says."""
    caches = [OrderedDict() for _ in range(workers)]
    total = 0
    try:
        for worker, shard in deal(shards, workers, order):
            pages._INDEX_CACHE = caches[worker]
            total += read_only_cost(shard, fs, old=False)[1]
    finally:
        pages._INDEX_CACHE = OrderedDict()
    return total


def pop_cost(n: int, workers: int = 8) -> tuple[float, float]:
    """Microseconds per `ShardQueue.pop`: (with a worker, asking in a random order; without)."""
    shards = [Shard(f"f00000-{i:07d}", "p.parquet", 0, i * 10, i * 10 + 10) for i in range(n)]
    out, rng = [], random.Random(0)
    for worker in (True, False):
        queue = ShardQueue(shards, max_attempts=1)
        t0 = time.perf_counter()
        while queue:
            queue.pop(rng.randrange(workers) if worker else None)
        out.append((time.perf_counter() - t0) / n * 1e6)
    return out[0], out[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=5_000_000)
    ap.add_argument("--row-group-rows", type=int, default=None, help="default: all rows in one group")
    ap.add_argument("--shard-size", type=int, default=1000)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 8, 64], help="simulated worker processes")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--stream", action="store_true", help="also time the old streaming read")
    ap.add_argument("--orders", nargs="+", choices=ORDERS, default=list(ORDERS), help="how shards are dealt")
    ap.add_argument("--pop-cost", type=int, default=0, metavar="N", help="also time ShardQueue.pop over N shards")
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "prompts.parquet"
        t0 = time.perf_counter()
        write_file(path, args.rows, args.row_group_rows or args.rows)
        size = path.stat().st_size
        meta = pq.read_metadata(path)
        print(f"file: {args.rows} rows, {meta.num_row_groups} row group(s), {size / 1e6:.1f} MB, "
              f"written in {time.perf_counter() - t0:.1f} s")
        fs = CountingFileSystem()
        cfg = DatasetConfig(uri=str(path), shard_size=args.shard_size)
        shards, _ = plan_shards(cfg, fs)
        first, middle, last = shards[0], shards[len(shards) // 2], shards[-1]

        for name, shard in (("first", first), ("last", last)):
            pages._INDEX_CACHE.clear()
            before = CountingFileSystem.bytes_read
            t0 = time.perf_counter()
            rows.read_shard_rows(shard, cfg, RENDER, fs, LIMITS)
            print(f"cold {name:6s} shard: {time.perf_counter() - t0:8.4f} s "
                  f"{(CountingFileSystem.bytes_read - before) / 1e3:10.1f} kB (footer and page locations included)")

        costs = {name: read_cost(shard, cfg, fs, args.repeat)
                 for name, shard in (("first", first), ("middle", middle), ("last", last))}
        base_s, base_b = costs["first"]
        for (name, (s, b)), shard in zip(costs.items(), (first, middle, last)):
            print(f"warm {name:6s} shard {shard.shard_id}: {s:8.4f} s {b / 1e3:10.1f} kB   "
                  f"time x{s / base_s:5.2f}  bytes x{b / max(base_b, 1):5.2f} of the first shard's")

        for workers in args.workers:
            for order in args.orders if workers > 1 else args.orders[:1]:
                n_bytes = run_bytes(shards, fs, workers, order)
                print(f"whole run, {workers} worker(s), shards dealt {order:12s}: {n_bytes / 1e6:8.1f} MB read, "
                      f"x{n_bytes / size:.2f} the file's size")

        read_only_cost(first, fs, old=False), read_only_cost(last, fs, old=False)  # page locations
        for old in ((False, True) if args.stream else (False,)):
            (s0, b0), (s1, b1) = (median_read_only_cost(shard, fs, old, args.repeat) for shard in (first, last))
            print(f"{'old streaming' if old else 'page'} read only: first {s0:.4f} s {b0 / 1e3:.1f} kB, "
                  f"last {s1:.4f} s {b1 / 1e3:.1f} kB: time x{s1 / s0:.1f}, bytes x{b1 / max(b0, 1):.1f}")
    if args.pop_cost:
        with_worker, fifo = pop_cost(args.pop_cost)
        print(f"ShardQueue.pop over {args.pop_cost} shards: {with_worker:.2f} us with a worker (8, random order), "
              f"{fifo:.2f} us without")


if __name__ == "__main__":
    main()
