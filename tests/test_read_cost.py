"""Reading a shard costs O(its rows) wherever it lies in a big row group (pages.py), and reads
exactly what pyarrow alone would read."""
import io
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fsspec.implementations.local import LocalFileOpener, LocalFileSystem

from cogview_ray import pages, thrift
from cogview_ray.config import DatasetConfig, RenderConfig
from cogview_ray.rows import SizeLimits, read_shard_rows
from cogview_ray.shards import plan_shards

pytestmark = pytest.mark.timeout(120)

RENDER = RenderConfig(height=1024, width=1024)
LIMITS = SizeLimits(multiple_px=16, max_px=2048)
ROWS = 200_000


class _CountingOpener(LocalFileOpener):
    def read(self, *args, **kwargs):
        data = super().read(*args, **kwargs)
        self.fs.bytes_read += len(data)
        return data

    def readinto(self, buf):
        n = self.f.readinto(buf) or 0
        self.fs.bytes_read += n
        return n


class CountingFileSystem(LocalFileSystem):
    """Local files that count the bytes readers take from them."""

    cachable = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.bytes_read = 0

    def _open(self, path, mode="rb", block_size=None, **kwargs):
        return _CountingOpener(self._strip_protocol(path), mode, fs=self, **kwargs)


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch):
    """Each test starts as a fresh worker process: no footers or pages known."""
    monkeypatch.setattr(pages, "_INDEX_CACHE", type(pages._INDEX_CACHE)())


def prompts(start, stop):
    return [f"a photo of item {i} on a table" for i in range(start, stop)]


@pytest.fixture(scope="module")
def big_file(tmp_path_factory):
    """200k short prompts in one row group, written with pyarrow's defaults."""
    path = tmp_path_factory.mktemp("big") / "prompts.parquet"
    pq.write_table(pa.table({"prompt": prompts(0, ROWS)}), path, row_group_size=ROWS)
    assert pq.read_metadata(path).num_row_groups == 1
    return path


def plan(path, fs, shard_size=1000):
    cfg = DatasetConfig(uri=str(path), shard_size=shard_size)
    shards, _ = plan_shards(cfg, fs)
    return cfg, shards


def read_counted(fs, shard, cfg):
    before = fs.bytes_read
    got = read_shard_rows(shard, cfg, RENDER, fs, LIMITS)
    assert [r.prompt for r in got] == prompts(shard.row_start, shard.row_stop)
    return fs.bytes_read - before


def test_the_last_shard_of_a_big_row_group_reads_what_the_first_does(big_file, monkeypatch):
    fs = CountingFileSystem()
    cfg, shards = plan(big_file, fs)
    size = big_file.stat().st_size
    cold_first = read_counted(fs, shards[0], cfg)
    monkeypatch.setattr(pages, "_INDEX_CACHE", type(pages._INDEX_CACHE)())  # another worker
    cold_last = read_counted(fs, shards[-1], cfg)
    # the old reader streamed the row group from its start: the last shard read the whole file
    assert cold_last <= 2 * cold_first
    assert cold_last < size / 4
    # a worker that knows the file: one page (20k rows by default) or two, never more
    for shard in (shards[0], shards[100], shards[-1]):
        for index in pages._INDEX_CACHE.values():
            index.last_span.clear()
        assert read_counted(fs, shard, cfg) < 2.5 * size / 10


def test_a_whole_run_in_order_reads_the_file_about_once(big_file):
    fs = CountingFileSystem()
    cfg, shards = plan(big_file, fs)
    total = sum(read_counted(fs, shard, cfg) for shard in shards)
    # pages decoded for one shard serve the next ones; the rest is the footer and page headers
    assert total < 1.3 * big_file.stat().st_size


def test_cached_pages_are_those_of_the_planned_version(tmp_path):
    path = tmp_path / "p.parquet"
    fs = CountingFileSystem()
    pq.write_table(pa.table({"prompt": prompts(0, 50_000)}), path)
    cfg, shards = plan(path, fs)
    read_counted(fs, shards[30], cfg)
    # rewritten: same path and row count, other prompts, planned again
    pq.write_table(pa.table({"prompt": [p.upper() for p in prompts(0, 50_000)]}), path)
    cfg, shards = plan(path, fs)
    got = read_shard_rows(shards[30], cfg, RENDER, fs, LIMITS)
    assert [r.prompt for r in got] == [p.upper() for p in prompts(30_000, 31_000)]


# ---------------------------------------------------------------- same values as pyarrow

N = 60_000
_rng = random.Random(1)
TABLE = pa.table({
    "prompt": [None if i % 17 == 0 else f"prompt {i} " + "x" * _rng.randrange(50) for i in range(N)],
    "id": [f"id-{i}" for i in range(N)],
    "seed": pa.array([None if i % 5 == 0 else i * 7 for i in range(N)], pa.int64()),
    "height": pa.array([512 if i % 3 else 1024 for i in range(N)], pa.int32()),
    "guidance_scale": [None if i % 4 == 0 else 3.5 + i % 3 for i in range(N)],
    "tags": [[str(i)] for i in range(N)],
})
FLAT = ["prompt", "id", "seed", "height", "guidance_scale"]
LAYOUTS = {
    "defaults": dict(row_group_size=N),
    "row groups of 25k": dict(row_group_size=25_000),
    "v2 pages, zstd": dict(row_group_size=N, data_page_version="2.0", compression="zstd"),
    "plain, 4 KiB pages": dict(row_group_size=N, use_dictionary=False, data_page_size=4096),
    "page index": dict(row_group_size=N, write_page_index=True),
    "uncompressed, no statistics": dict(row_group_size=N, compression="none", write_statistics=False),
}


def ranges(n):
    rng = random.Random(0)
    out = [(a, a + 1000) for a in range(0, 45_000, 1000)]  # consecutive shards, as one worker sees
    out += [(a, min(n, a + rng.choice([1, 7, 1000, 5000]))) for a in (rng.randrange(n) for _ in range(30))]
    return out + [(n - 1, n), (0, n)]


def assert_reads_like_pyarrow(table, columns, **write_options):
    buf = io.BytesIO()
    pq.write_table(table, buf, **write_options)
    whole = pq.read_table(io.BytesIO(buf.getvalue()), columns=columns)
    f = io.BytesIO(buf.getvalue())
    pf = pages.open_parquet(f, "key")
    for start, stop in ranges(table.num_rows):
        got = pages.read_row_range(f, pf, columns, start, stop, "key")
        assert got.schema == whole.schema
        assert got.to_pydict() == whole.slice(start, stop - start).to_pydict(), (start, stop)


def spy_on_fallback(monkeypatch):
    calls = []
    stream = pages._stream_group
    monkeypatch.setattr(pages, "_stream_group", lambda *a: calls.append(a) or stream(*a))
    return calls


@pytest.mark.parametrize("layout", LAYOUTS)
def test_page_reads_give_what_pyarrow_gives(layout, monkeypatch):
    fallbacks = spy_on_fallback(monkeypatch)
    assert_reads_like_pyarrow(TABLE, FLAT, **LAYOUTS[layout])
    assert fallbacks == []


@pytest.mark.parametrize("column, cast", [
    ("prompt", lambda a: a.dictionary_encode()), ("prompt", lambda a: a.cast(pa.large_string())),
    ("prompt", lambda a: pa.chunked_array([["same prompt"] * N])), ("seed", lambda a: a.cast(pa.float64()))])
def test_page_reads_keep_arrow_types(column, cast, monkeypatch):
    fallbacks = spy_on_fallback(monkeypatch)
    table = TABLE.select(FLAT)
    table = table.set_column(table.schema.get_field_index(column), column, cast(table.column(column)))
    assert_reads_like_pyarrow(table, FLAT, row_group_size=N)
    assert fallbacks == []


def test_a_nested_column_is_streamed_and_others_are_not_affected(monkeypatch):
    fallbacks = spy_on_fallback(monkeypatch)
    assert_reads_like_pyarrow(TABLE, FLAT, row_group_size=N)  # the list column is in the file
    assert fallbacks == []
    assert_reads_like_pyarrow(TABLE, ["prompt", "tags"], row_group_size=N)
    assert len(fallbacks) > 0


def test_lz4_is_streamed(monkeypatch):
    # pyarrow names both Parquet LZ4 codecs "LZ4": the page reader cannot tell which to write
    fallbacks = spy_on_fallback(monkeypatch)
    assert_reads_like_pyarrow(TABLE, FLAT, row_group_size=N, compression="lz4")
    assert len(fallbacks) > 0


def test_an_unreadable_page_layout_falls_back_to_streaming(monkeypatch):
    fallbacks = spy_on_fallback(monkeypatch)

    def odd(*_args):
        raise pages._Unsupported("odd pages")

    monkeypatch.setattr(pages, "_locate_pages", odd)
    assert_reads_like_pyarrow(TABLE, FLAT, row_group_size=N)
    assert len(fallbacks) == len(ranges(N)) - 1  # all but the whole-file range (read whole)


def test_thrift_round_trip_gives_the_same_footer_bytes():
    buf = io.BytesIO()
    pq.write_table(TABLE, buf, row_group_size=20_000, write_page_index=True)
    data = buf.getvalue()
    length = int.from_bytes(data[-8:-4], "little")
    raw = data[-8 - length:-8]
    decoded = thrift.Decoder(raw).struct()
    assert thrift.get(decoded, 3) == N  # num_rows
    out = bytearray()
    thrift.encode_struct(out, decoded)
    assert bytes(out) == raw


def test_thrift_decodes_a_footer_up_to_its_row_groups():
    buf = io.BytesIO()
    pq.write_table(TABLE, buf, row_group_size=1000)
    data = buf.getvalue()
    length = int.from_bytes(data[-8:-4], "little")
    head = thrift.Decoder(data[-8 - length:-8]).struct(stop_at=4)
    assert sorted(head) == [1, 2, 3]
    names = [thrift.get(element, 4) for element in thrift.items(head, 2)]
    assert names[0] == b"schema" and b"prompt" in names and b"tags" in names


def test_thrift_refuses_garbage():
    with pytest.raises(EOFError):
        thrift.Decoder(b"\x15").struct()  # a field header, then nothing
    with pytest.raises(thrift.ThriftError):
        thrift.Decoder(b"\x1d").struct()  # type 13 does not exist


@pytest.mark.s3
def test_shards_read_from_s3_fetch_only_their_pages(s3_bucket, s3_storage_options, monkeypatch):
    import s3fs

    fs = s3fs.S3FileSystem(**s3_storage_options)
    table = pa.table({"prompt": prompts(0, ROWS)})
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=ROWS)
    fs.pipe(f"{s3_bucket}/p.parquet", buf.getvalue())
    fetched = []
    fetch = s3fs.core.S3File._fetch_range
    monkeypatch.setattr(s3fs.core.S3File, "_fetch_range",
                        lambda self, start, end: fetched.append(end - start) or fetch(self, start, end))
    cfg = DatasetConfig(uri=f"s3://{s3_bucket}/p.parquet", shard_size=1000)
    shards, _ = plan_shards(cfg, fs)
    assert shards[-1].file_version.etag
    fetched.clear()
    got = read_shard_rows(shards[-1], cfg, RENDER, fs, LIMITS)
    assert [r.prompt for r in got] == prompts(ROWS - 1000, ROWS)
    assert sum(fetched) < len(buf.getvalue()) / 4
