"""The image sizes a run's input asks for, read at planning from two integer columns (never the
prompts), so workers compile them before they report ready instead of meeting them mid-shard."""
from __future__ import annotations

from collections import Counter
from typing import Any, Iterable

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .errors import DatasetError, first_line
from .input_version import open_planned
from .rows import parse_size
from .shards import Shard

# Each size costs a compile at worker start (minutes with max-autotune): the most frequent few
# are warmed, rarer ones run eagerly (same bytes on every attempt: the warmed set is fixed per run).
MAX_SURVEYED_SIZES = 8


def survey_sizes(shards: Iterable[Shard], render_cfg: Any, fs: fsspec.AbstractFileSystem,
                 limit: int = MAX_SURVEYED_SIZES) -> list[tuple[int, int]]:
    """Per-row (height, width) pairs of the planned rows that differ from the run's default and
    `render.sizes`, most frequent first, at most `limit`. Values are not checked against the
    pipeline's limits here (the worker skips sizes it cannot render; such rows are rejected).
    Counting runs in Arrow: memory is two columns of one file, never a Python object per row."""
    by_file: dict[str, list[Shard]] = {}
    for shard in shards:
        by_file.setdefault(shard.file, []).append(shard)
    counts: Counter = Counter()
    for file_shards in by_file.values():
        counts.update(_file_sizes(file_shards, render_cfg, fs))
    known = {(render_cfg.height, render_cfg.width)} | {(int(h), int(w)) for h, w in render_cfg.sizes}
    ranked = sorted((c for c in counts.items() if c[0] not in known), key=lambda kv: (-kv[1], kv[0]))
    return [size for size, _ in ranked[:limit]]


def _file_sizes(shards: list[Shard], render_cfg: Any, fs: fsspec.AbstractFileSystem) -> Counter:
    """(height, width) -> rows, over the rows of `shards` (one file's pending shards)."""
    first = shards[0]
    try:
        with open_planned(first, fs) as f:
            pf = pq.ParquetFile(f)
            names = set(pf.schema_arrow.names)
            wanted = [c for c in ("height", "width") if c in names]
            if not wanted:
                return Counter()
            table = pf.read(columns=wanted)
    except DatasetError:
        raise
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DatasetError(f"Dataset file {first.file}: the height/width columns could not be read "
                           f"({first_line(e)}).") from None
    table = pa.concat_tables([table.slice(s.row_start, s.num_rows) for s in shards])  # zero-copy slices
    columns = []
    for name, default in (("height", render_cfg.height), ("width", render_cfg.width)):
        if name not in wanted:
            columns.append(pc.fill_null(pa.nulls(table.num_rows, pa.int64()), default))
            continue
        col = table.column(name)
        if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)):
            return Counter()  # such rows are rejected as bad sizes; nothing to compile for them
        columns.append(pc.fill_null(col, default).combine_chunks())
    pairs = pa.table(columns, names=["height", "width"]).group_by(["height", "width"]).aggregate(
        [([], "count_all")])
    found: Counter = Counter()
    for item in pairs.to_pylist():  # distinct pairs only: a handful
        h = parse_size(item["height"], render_cfg.height, None)
        w = parse_size(item["width"], render_cfg.width, None)
        if h is not None and w is not None:
            found[(h, w)] += item["count_all"]
    return found
