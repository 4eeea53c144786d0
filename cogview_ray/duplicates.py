"""Values that occur more than once in a stream too large to hold (ids, object keys of a run):
rows are hash-partitioned into spill files on local disk, then each partition is sorted alone."""
from __future__ import annotations

import os
import shutil
import tempfile
from typing import Iterator, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# A linear hash over byte positions: any fixed function of the string partitions correctly
# (equal strings always land together); random weights only spread the partitions evenly.
_WEIGHTS = np.random.default_rng(0x5EED).integers(1, 2**63, size=256, dtype=np.uint64) | np.uint64(1)
_MIX = np.uint64(0xFF51AFD7ED558CCD)


def string_hashes(values: pa.Array, chunk: int = 1 << 14) -> np.ndarray:
    """A uint64 hash of each (non-null) string, computed on the Arrow buffers without Python
    objects, `chunk` strings at a time (the work arrays take 8 bytes per byte of text)."""
    values = values.cast(pa.large_string())  # int64 offsets
    if len(values) > chunk:
        return np.concatenate([_hashes(values.slice(i, chunk)) for i in range(0, len(values), chunk)])
    return _hashes(values)


def _hashes(values: pa.Array) -> np.ndarray:
    _, offsets_buf, data_buf = values.buffers()
    offsets = np.frombuffer(offsets_buf, np.int64)[values.offset: values.offset + len(values) + 1]
    base = int(offsets[0]) if len(offsets) else 0
    data = (np.frombuffer(data_buf, np.uint8)[base: int(offsets[-1])] if data_buf is not None and len(offsets)
            else np.zeros(0, np.uint8))
    starts = offsets[:-1] - base
    lengths = np.diff(offsets)
    pos = np.arange(len(data), dtype=np.int64) - np.repeat(starts, lengths)  # byte index within its string
    sums = np.zeros(len(data) + 1, np.uint64)
    np.cumsum(data.astype(np.uint64) * _WEIGHTS[pos & 255], out=sums[1:])  # wraps mod 2**64 on purpose
    h = (sums[starts + lengths] - sums[starts]) ^ (lengths.astype(np.uint64) * _MIX)
    h ^= h >> np.uint64(33)
    h *= _MIX
    h ^= h >> np.uint64(33)
    return h


class DuplicateFinder:
    """Collects rows with a string `value` (and any other columns given in `schema`) and finds
    the values seen more than once, in bounded memory.

    Up to `buffer_rows` rows stay in memory; beyond that every `buffer_rows` rows are written
    to one Arrow IPC file in `dir` (a fresh temporary folder by default), one record batch per
    hash bucket. `duplicates()` then reads one bucket at a time from every file, so memory
    holds about (rows / buckets) rows, never all of them.
    """

    def __init__(self, schema: pa.Schema, buffer_rows: int = 1 << 20, buckets: int = 256,
                 dir: Optional[str] = None):
        if schema.get_field_index("value") < 0:
            raise ValueError("a DuplicateFinder schema needs a string column 'value'")
        self.schema = schema.append(pa.field("_seq", pa.int64()))
        self.buffer_rows, self.buckets, self._dir_arg = max(1, buffer_rows), max(1, buckets), dir
        self._buffer: list[pa.Table] = []
        self._buffered = 0
        self._seq = 0
        self._dir: Optional[str] = None
        self._spills: list[str] = []

    def __enter__(self) -> DuplicateFinder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Remove the spill files."""
        self._buffer, self._buffered = [], 0
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir, self._spills = None, []

    def add(self, columns: dict[str, pa.Array]) -> None:
        """Rows given as columns of `schema` (null values are skipped: they duplicate nothing)."""
        table = pa.table(columns).select([f.name for f in self.schema][:-1]).cast(
            pa.schema(list(self.schema)[:-1]))
        table = table.filter(pc.is_valid(table["value"]))
        n = table.num_rows
        if not n:
            return
        seq = pa.array(np.arange(self._seq, self._seq + n, dtype=np.int64))  # order of arrival
        self._seq += n
        self._buffer.append(table.append_column("_seq", seq))
        self._buffered += n
        if self._buffered >= self.buffer_rows:
            self._spill()

    def _spill(self) -> None:
        table = pa.concat_tables(self._buffer).combine_chunks()
        self._buffer, self._buffered = [], 0
        bucket = string_hashes(table["value"].chunk(0)) % np.uint64(self.buckets)
        order = np.argsort(bucket, kind="stable")
        table = table.take(pa.array(order)).combine_chunks()
        ends = np.cumsum(np.bincount(bucket.astype(np.int64), minlength=self.buckets))
        if self._dir is None:
            self._dir = tempfile.mkdtemp(prefix="cogview-ray-dups-", dir=self._dir_arg)
        path = os.path.join(self._dir, f"spill-{len(self._spills):05d}.arrow")
        with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, self.schema) as writer:
            start = 0
            for end in ends:  # one batch per bucket, empty ones included, so batch b is bucket b
                part = table.slice(start, int(end) - start).combine_chunks()
                writer.write_batch(pa.RecordBatch.from_arrays([c.chunk(0) for c in part.columns],
                                                              schema=self.schema))
                start = int(end)
        self._spills.append(path)

    def _partitions(self) -> Iterator[pa.Table]:
        if not self._spills:  # everything fit in memory: one partition
            if self._buffer:
                yield pa.concat_tables(self._buffer)
            return
        if self._buffer:
            self._spill()
        for b in range(self.buckets):
            batches = []
            for path in self._spills:
                with pa.OSFile(path, "rb") as f:
                    batches.append(pa.ipc.open_file(f).get_batch(b))
            yield pa.Table.from_batches(batches, schema=self.schema)

    def duplicates(self, limit: int = 1000) -> tuple[list[tuple[dict, dict]], int]:
        """`(pairs, count)`: every later occurrence of a value paired with the occurrence before
        it, the `limit` earliest-arriving pairs in arrival order, and how many pairs there are."""
        pairs: list[tuple[int, dict, dict]] = []
        count = 0
        for table in self._partitions():
            if table.num_rows < 2:
                continue
            table = table.take(pc.sort_indices(table, [("value", "ascending"), ("_seq", "ascending")]))
            values = table["value"]
            same = pc.equal(values.slice(1), values.slice(0, len(values) - 1))
            later = np.flatnonzero(same.to_numpy(zero_copy_only=False)) + 1
            count += len(later)
            if not len(later):
                continue
            seqs = table["_seq"].to_numpy()[later]
            keep = later[np.argsort(seqs, kind="stable")[:limit]]  # the earliest in this partition
            rows = table.take(pa.array(np.concatenate([keep - 1, keep]))).to_pylist()
            pairs += [(rows[len(keep) + i]["_seq"], rows[i], rows[len(keep) + i]) for i in range(len(keep))]
            pairs = sorted(pairs, key=lambda p: p[0])[:limit]
        return [(a, b) for _, a, b in pairs], count
