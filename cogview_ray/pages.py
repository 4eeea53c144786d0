"""Row-range reads of Parquet files that cost O(rows read): inside a big row group, a shard
fetches only the data pages that hold its rows (plus the dictionary page if they need it)."""
from __future__ import annotations

import bisect
import struct
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Hashable, Optional

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from cogview_ray import thrift
from cogview_ray.thrift import BINARY, I32, I64, LIST, STRUCT, Decoder, ThriftError, get

# A page header is read with this many bytes first, then more while it does not fit: headers
# carry min/max statistics, which Arrow caps at 4 KiB each.
HEADER_PROBE_BYTES = 512
MAX_HEADER_BYTES = 1 << 20
# Footers and page locations kept per process, for this many input files (by planned version).
INDEX_CACHE_FILES = 8
# Decoded pages kept per column for the next shard of the file, up to this size.
SPAN_CACHE_BYTES = 32 << 20
# The streamed fallback's batches: about a shard's rows (cells can be megabytes each), but not
# single rows, which would cost a Python round trip per row before the range.
STREAM_BATCH_ROWS = (1024, 65536)

_DATA_PAGE, _DICTIONARY_PAGE, _DATA_PAGE_V2 = 0, 2, 3
_DICTIONARY_ENCODINGS = (2, 8)  # PLAIN_DICTIONARY, RLE_DICTIONARY
_RLE = 3  # definition levels
# Thrift enums of the names pyarrow reports. Not LZ4: pyarrow names both Parquet LZ4 codecs so.
_PHYSICAL_TYPES = {"BOOLEAN": 0, "INT32": 1, "INT64": 2, "INT96": 3, "FLOAT": 4, "DOUBLE": 5,
                   "BYTE_ARRAY": 6, "FIXED_LEN_BYTE_ARRAY": 7}
_CODECS = {"UNCOMPRESSED": 0, "SNAPPY": 1, "GZIP": 2, "BROTLI": 4, "ZSTD": 6, "LZ4_RAW": 7}


class _Unsupported(Exception):
    """A layout the page reader does not handle (nested or encrypted columns, an odd footer or
    page): that row group is streamed instead, as pyarrow alone would read it."""


@dataclass(frozen=True)
class _Page:
    offset: int  # of its header, in the file
    size: int  # header and body
    first_row: int  # within the row group


@dataclass
class _FileIndex:
    """What is known of one file version: pyarrow's footer, the start of the raw footer (its
    schema; read when a range first cuts a row group) and page locations by (row group, leaf)."""

    metadata: pq.FileMetaData
    schema: Optional[dict] = None  # FileMetaData fields 1-3: version, schema, num_rows
    pages: dict[tuple[int, int], tuple[Optional[tuple[int, int]], list[_Page]]] = field(default_factory=dict)
    # per leaf column, the pages last decoded: (row group, first row, values); the next shard
    # of the file on this worker is often in the same pages (they hold ~20k rows by default)
    last_span: dict[int, tuple[int, int, pa.ChunkedArray]] = field(default_factory=dict)


_INDEX_CACHE: OrderedDict[Hashable, _FileIndex] = OrderedDict()
_INDEX_LOCK = threading.Lock()


def _cached(cache_key: Optional[Hashable]) -> Optional[_FileIndex]:
    with _INDEX_LOCK:
        index = _INDEX_CACHE.get(cache_key) if cache_key is not None else None
        if index is not None:
            _INDEX_CACHE.move_to_end(cache_key)
        return index


def open_parquet(f, cache_key: Optional[Hashable] = None, buffer_size: int = 0) -> pq.ParquetFile:
    """pyarrow's reader on the open file `f`. `cache_key` names the file's exact version (the
    caller has checked `f` is it): its footer is then parsed once per process, not per shard."""
    index = _cached(cache_key)
    pf = pq.ParquetFile(f, metadata=index.metadata if index else None, pre_buffer=False,
                        buffer_size=buffer_size)
    if index is None and cache_key is not None:
        with _INDEX_LOCK:
            _INDEX_CACHE[cache_key] = _FileIndex(pf.metadata)
            while len(_INDEX_CACHE) > INDEX_CACHE_FILES:
                _INDEX_CACHE.popitem(last=False)
    return pf


# ---------------------------------------------------------------- locating pages


def _reader(f) -> Callable[[int, int], bytes]:
    """`read_at(offset, n)`: exactly those bytes. fsspec's buffered files (s3fs) fetch the range
    with one ranged GET at the opened version, without their read-ahead block (50 MB on s3fs)."""
    def read_at(offset: int, n: int) -> bytes:
        if isinstance(f, fsspec.spec.AbstractBufferedFile):
            data = f._fetch_range(offset, offset + n) if n else b""
        else:
            f.seek(offset)
            data = f.read(n)
        if len(data) != n:
            raise _Unsupported(f"short read ({len(data)} of {n} bytes)")
        return data
    return read_at


def _footer_schema(index: _FileIndex, f, read_at) -> dict:
    """The raw footer's first fields (version, schema elements, num_rows), decoded up to its
    row groups: a footer can hold thousands of them, and pyarrow has parsed those already."""
    if index.schema is None:
        size = getattr(f, "size", None)
        size = size if isinstance(size, int) else f.seek(0, 2)
        tail = read_at(size - 8, 8)
        (length,) = struct.unpack("<I", tail[:4])
        if tail[4:] != b"PAR1" or length > size - 12:  # PARE: an encrypted footer
            raise _Unsupported("not a plaintext Parquet footer")
        n = min(length, 64 * 1024)
        while True:
            try:
                index.schema = Decoder(read_at(size - 8 - length, n)).struct(stop_at=4)
                break
            except EOFError:
                if n == length:
                    raise _Unsupported("truncated footer") from None
                n = min(length, n * 8)
            except ThriftError as e:
                raise _Unsupported(f"footer not decoded ({e})") from None
    return index.schema


def _read_header(read_at, offset: int, limit: int) -> tuple[dict, int]:
    """(page header, its length) of the page at `offset`; `limit` is the column chunk's end."""
    n = min(HEADER_PROBE_BYTES, limit - offset)
    while True:
        try:
            d = Decoder(read_at(offset, n))
            return d.struct(), d.pos
        except EOFError:
            if n >= min(MAX_HEADER_BYTES, limit - offset):
                raise _Unsupported(f"page header at byte {offset} does not fit") from None
            n = min(n * 8, MAX_HEADER_BYTES, limit - offset)
        except ThriftError as e:
            raise _Unsupported(f"page header at byte {offset} not decoded ({e})") from None


def _page_rows(header: dict) -> Optional[int]:
    """Rows in a data page of a flat column (values, nulls included); None if not a data page."""
    kind = get(header, 1)
    if kind == _DATA_PAGE:
        return get(get(header, 5, {}), 1)
    if kind == _DATA_PAGE_V2:
        return get(get(header, 8, {}), 3)
    return None


def _locate_pages(index: _FileIndex, read_at, group: int, leaf: int):
    """(dictionary page (offset, size) or None, data pages) of one column chunk, found by
    walking its page headers (one small read per page), once per file version and process."""
    if (group, leaf) in index.pages:
        return index.pages[group, leaf]
    meta = index.metadata.row_group(group).column(leaf)
    start = meta.data_page_offset
    if meta.has_dictionary_page and 0 < meta.dictionary_page_offset < start:
        start = meta.dictionary_page_offset
    end = start + meta.total_compressed_size
    dictionary, pages, offset, row = None, [], start, 0
    while offset < end:
        header, header_len = _read_header(read_at, offset, end)
        size = header_len + get(header, 3, -1)
        if size <= header_len or offset + size > end:
            raise _Unsupported(f"bad page size at byte {offset}")
        rows = _page_rows(header)
        if get(header, 1) == _DICTIONARY_PAGE:
            dictionary = (offset, size)
        elif rows is not None:
            pages.append(_Page(offset, size, row))
            row += rows
        offset += size
    if not pages or row != index.metadata.row_group(group).num_rows:
        raise _Unsupported("page row counts do not add up to the row group's")
    index.pages[group, leaf] = (dictionary, pages)
    return dictionary, pages


# ---------------------------------------------------------------- reading a cut row group


def _leaf_index(pf: pq.ParquetFile, name: str) -> int:
    """The Parquet leaf column of a flat top-level column (one value per row)."""
    found = [i for i in range(len(pf.schema))
             if pf.schema.column(i).path == name or pf.schema.column(i).path.startswith(name + ".")]
    if len(found) != 1 or pf.schema.column(found[0]).path != name \
            or pf.schema.column(found[0]).max_repetition_level != 0:
        raise _Unsupported(f"column {name!r} is nested")
    return found[0]


def _scan_pages(data: bytes) -> tuple[int, int, set[int]]:
    """(values, uncompressed bytes with headers, encodings) of consecutive data pages."""
    values = uncompressed = pos = 0
    encodings = {_RLE}
    while pos < len(data):
        d = Decoder(data, pos)
        try:
            header = d.struct()
        except (EOFError, ThriftError) as e:
            raise _Unsupported(f"page header not decoded ({e})") from None
        kind = get(header, 1)
        if kind in (_DATA_PAGE, _DATA_PAGE_V2):
            page = get(header, 5 if kind == _DATA_PAGE else 8, {})
            values += get(page, 1, 0)
            encodings.add(get(page, 2 if kind == _DATA_PAGE else 4, 0))
        uncompressed += d.pos - pos + get(header, 2, 0)
        pos = d.pos + get(header, 3, 0)
    if pos != len(data):
        raise _Unsupported("pages do not end where their locations say")
    return values, uncompressed, encodings


def _read_column(pf, index, f, read_at, group: int, name: str, lo: int, hi: int) -> pa.ChunkedArray:
    """Rows [lo, hi) of the row group's column `name`: what the pages decoded last still hold,
    then the pages that hold the rest (which become the ones decoded last)."""
    leaf = _leaf_index(pf, name)
    head = None
    span = index.last_span.get(leaf)
    if span is not None and span[0] == group and span[1] <= lo < span[1] + len(span[2]):
        span_stop = span[1] + len(span[2])
        if hi <= span_stop:
            return span[2].slice(lo - span[1], hi - lo)
        # a shard across a page boundary: only the pages after the boundary are fetched
        head, lo = span[2].slice(lo - span[1], span_stop - lo), span_stop
    first_row, values = _decode_pages(pf, index, f, read_at, group, leaf, lo, hi)
    if values.nbytes <= SPAN_CACHE_BYTES:
        index.last_span[leaf] = (group, first_row, values)
    else:
        index.last_span.pop(leaf, None)
    tail = values.slice(lo - first_row, hi - lo)
    return tail if head is None else pa.chunked_array(head.chunks + tail.chunks, type=tail.type)


def _decode_pages(pf, index, f, read_at, group: int, leaf: int, lo: int, hi: int):
    """(first row, values) of the pages that hold rows [lo, hi) of a column chunk, decoded by
    pyarrow as a one-column-chunk Parquet file assembled in memory."""
    schema = _footer_schema(index, f, read_at)
    dictionary, pages = _locate_pages(index, read_at, group, leaf)
    first_rows = [p.first_row for p in pages]
    first, last = bisect.bisect_right(first_rows, lo) - 1, bisect.bisect_left(first_rows, hi) - 1
    begin, end = pages[first].offset, pages[last].offset + pages[last].size
    data = read_at(begin, end - begin)
    values, uncompressed, encodings = _scan_pages(data)
    prefix = read_at(*dictionary) if dictionary and encodings & set(_DICTIONARY_ENCODINGS) else b""
    stop_row = first_rows[last + 1] if last + 1 < len(pages) else index.metadata.row_group(group).num_rows
    rows = stop_row - first_rows[first]
    chunk = _Chunk(leaf, len(prefix), len(data), values, uncompressed + len(prefix), encodings)
    out = bytearray(b"PAR1" + prefix + data)
    footer_start = len(out)
    thrift.encode_struct(out, _one_chunk_footer(index.metadata, schema, group, chunk, rows))
    out += struct.pack("<I", len(out) - footer_start) + b"PAR1"
    try:
        table = pq.ParquetFile(pa.BufferReader(out)).read_row_group(0, columns=[pf.schema.column(leaf).name],
                                                                   use_threads=False)
    except pa.ArrowException as e:
        raise _Unsupported(f"assembled pages not decoded ({e})") from None
    if table.num_rows != rows:
        raise _Unsupported("assembled pages hold another number of rows")
    return first_rows[first], table.column(0)


@dataclass(frozen=True)
class _Chunk:
    """The column chunk assembled after the magic: dictionary page (if needed), data pages."""

    leaf: int
    dict_len: int
    data_len: int
    values: int
    uncompressed: int  # with headers
    encodings: set[int]


def _one_chunk_footer(metadata: pq.FileMetaData, schema: dict, group: int, chunk: _Chunk, rows: int) -> dict:
    """A footer for the file's schema with one row group of `rows` rows: `chunk`, and the other
    columns empty. No statistics, page index or bloom filter: they describe the whole chunk."""
    columns = []
    for j in range(metadata.num_columns):
        col = metadata.row_group(group).column(j)
        mine = j == chunk.leaf
        physical = _PHYSICAL_TYPES.get(col.physical_type)
        codec = _CODECS.get(col.compression) if mine else 0  # empty chunks: never decompressed
        if physical is None or codec is None:
            raise _Unsupported(f"{col.physical_type} column compressed with {col.compression}")
        meta = {1: (I32, physical), 2: (LIST, (I32, sorted(chunk.encodings) if mine else [0])),
                3: (LIST, (BINARY, [p.encode() for p in col.path_in_schema.split(".")])), 4: (I32, codec),
                5: (I64, chunk.values if mine else 0), 6: (I64, chunk.uncompressed if mine else 0),
                7: (I64, chunk.dict_len + chunk.data_len if mine else 0),
                9: (I64, 4 + (chunk.dict_len if mine else 0))}
        if mine and chunk.dict_len:
            meta[11] = (I64, 4)
        columns.append({2: (I64, 4), 3: (STRUCT, meta)})
    one_group = {1: (LIST, (STRUCT, columns)), 2: (I64, chunk.uncompressed), 3: (I64, rows)}
    footer = {**schema, 3: (I64, rows), 4: (LIST, (STRUCT, [one_group]))}
    if metadata.metadata:  # ARROW:schema: pyarrow restores the column's Arrow type from it
        footer[5] = (LIST, (STRUCT, [{1: (BINARY, k), 2: (BINARY, v)} for k, v in metadata.metadata.items()]))
    if metadata.created_by:
        footer[6] = (BINARY, metadata.created_by.encode())
    return footer


def _stream_group(pf: pq.ParquetFile, group: int, columns: list[str], lo: int, hi: int) -> pa.Table:
    """Rows [lo, hi) of a row group by streaming it from its start (reads up to `hi` only)."""
    pieces, position = [], 0
    batch_size = min(max(hi - lo, STREAM_BATCH_ROWS[0]), STREAM_BATCH_ROWS[1])
    for batch in pf.iter_batches(batch_size=batch_size, row_groups=[group], columns=columns):
        a, b = max(lo - position, 0), min(hi - position, batch.num_rows)
        if b > a:
            pieces.append(batch.slice(a, b - a))
        position += batch.num_rows
        if position >= hi:
            break
    if not pieces:
        return pa.schema([pf.schema_arrow.field(c) for c in columns]).empty_table()
    return pa.Table.from_batches(pieces, schema=pieces[0].schema)


def read_row_range(f, pf: pq.ParquetFile, columns: list[str], start: int, stop: int,
                   cache_key: Optional[Hashable] = None) -> pa.Table:
    """Rows [start, stop) of `columns` of the open Parquet file `f` (`pf` reads it, opened with
    `open_parquet` and the same `cache_key`, which then also keeps page locations).

    Row groups no bigger than the range are read whole; a bigger one that the range cuts is read
    page by page, or streamed from its start where the page reader does not handle its layout."""
    schema = pa.schema([pf.schema_arrow.field(c) for c in columns])
    tables, offset = [], 0
    read_at = _reader(f)
    index = _cached(cache_key) or _FileIndex(pf.metadata)
    for group in range(pf.metadata.num_row_groups if stop > start else 0):
        n = pf.metadata.row_group(group).num_rows
        lo, hi = max(start, offset) - offset, min(stop, offset + n) - offset
        if lo < hi:
            if n <= stop - start:
                table = pf.read_row_group(group, columns=columns, use_threads=False).slice(lo, hi - lo)
            else:
                try:
                    arrays = [_read_column(pf, index, f, read_at, group, c, lo, hi) for c in columns]
                    table = pa.Table.from_arrays(arrays, schema=schema)
                except _Unsupported:
                    table = _stream_group(pf, group, columns, lo, hi)
            tables.append(pa.Table.from_arrays(table.columns, schema=schema))
        offset += n
        if offset >= stop:
            break
    return pa.concat_tables(tables) if tables else schema.empty_table()
