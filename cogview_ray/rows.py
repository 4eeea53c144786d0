"""Rows of one shard: read its row range, validate every row into a `RowSpec` (pending with all
render parameters, or rejected with a reason code), derive ids, object keys and seeds."""
from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from typing import Any, Optional

import fsspec
import pyarrow as pa

from cogview_ray.records import Reason, RenderParams, Status
from cogview_ray.errors import DatasetError, first_line
from cogview_ray.pages import open_parquet, read_row_range
from cogview_ray.input_version import open_planned
from cogview_ray.shards import Shard, is_string_type

MAX_SEED = 2**63 - 1
MAX_STEPS = 1000
MAX_ID_CHARS = 256
OVERRIDE_COLUMNS = ("seed", "negative_prompt", "height", "width", "num_inference_steps", "guidance_scale")
# Buffered column-chunk reads (pages.py reads only the pages a shard's rows are in).
READ_BUFFER_BYTES = 1 << 20

# No dots: webdataset readers split a tar member's name at its first dot into key and
# extension, so `v1.2` would group with `v1`. No capitals: on a case-insensitive filesystem
# (macOS, SMB, the webdataset spool there) `Cat` and `cat` would be one file.
_SAFE_ID_RE = re.compile(r"[a-z0-9_-]{1,128}")
# Hashed keys end in -<16 hex>; ids with that tail are hashed too, so the two never collide.
_HASHED_TAIL_RE = re.compile(r"-[0-9a-f]{16}")
_UNSAFE_RUN_RE = re.compile(r"[^A-Za-z0-9_-]+")
_INVALID = object()  # a value that could not be decoded (invalid UTF-8)


@dataclass(frozen=True)
class RowSpec(RenderParams):
    """One input row after validation: its render parameters (RenderParams' fields), then these."""

    row_id: str
    key: Optional[str]  # object-safe key; None for rejected rows (they write nothing)
    file: str
    row_index: int  # row number within the file
    status: Status  # pending | rejected
    reason: Optional[Reason]
    error: Optional[str] = None  # what validation cut or refused, for the manifest's `error`


def derived_id(file_index: int, row_index: int) -> str:
    return f"f{file_index:05d}-{row_index:09d}"


def derive_seed(run_seed: int, row_id: str) -> int:
    """First 8 bytes (big-endian) of sha256('{run_seed}:{row_id}'), masked to 63 bits."""
    digest = hashlib.sha256(f"{run_seed}:{row_id}".encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") & MAX_SEED


def object_key(row_id: str) -> str:
    """A flat, lower-case key that cannot leave the run prefix: safe ids as they are, others
    slug + hash.

    Safe ids: 1-128 of [a-z0-9_-] (no dots, no capitals), not ending like a hashed key. Anything
    else (`Cat`, `v1.2`, `../x`, `/etc/passwd`, `a/b`, '', long or non-ASCII ids) becomes
    '{lower-cased slug}-{first 16 hex of sha256(id)}', at most 81 characters of [a-z0-9_-].
    Every key is lower case, so ids differing only in case (`Cat`, `cat`) get keys that differ
    also on a case-insensitive filesystem.
    """
    row_id = str(row_id)
    if _SAFE_ID_RE.fullmatch(row_id) and not _HASHED_TAIL_RE.search(row_id[-17:]):
        return row_id
    digest = hashlib.sha256(row_id.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    slug = _UNSAFE_RUN_RE.sub("_", row_id)[:64].strip("_-").lower()
    return f"{slug or 'id'}-{digest}"


def group_for_render(rows: list[RowSpec]) -> dict[tuple[int, int, int, float], list[RowSpec]]:
    """Pending rows by (height, width, steps, guidance), groups and rows in input order."""
    groups: dict[tuple[int, int, int, float], list[RowSpec]] = {}
    for row in rows:
        if row.status == Status.PENDING:
            key = (row.height, row.width, row.num_inference_steps, row.guidance_scale)
            groups.setdefault(key, []).append(row)
    return groups


# ---------------------------------------------------------------- reading


@dataclass(frozen=True)
class SizeLimits:
    """The sizes a loaded pipeline renders: multiples of `multiple_px` up to `max_px`."""

    multiple_px: int
    max_px: int

    @classmethod
    def of(cls, pipeline: Any) -> "SizeLimits":
        return cls(int(pipeline.size_multiple), int(pipeline.max_size_px))

    def allows(self, size: int) -> bool:
        return self.multiple_px <= size <= self.max_px and size % self.multiple_px == 0


def read_shard_rows(shard: Shard, dataset_cfg: Any, render_cfg: Any,
                    fs: Optional[fsspec.AbstractFileSystem] = None,
                    limits: Optional[SizeLimits] = None) -> list[RowSpec]:
    """Exactly one RowSpec per row of the shard, in row order; only the needed columns are read.

    Sizes are checked against `limits` (the loaded pipeline's); without them, any positive size
    passes. The file is read at its planned version (InputChanged otherwise)."""
    if fs is None:
        fs, _ = fsspec.core.url_to_fs(dataset_cfg.uri)
    prompt_col, id_col = dataset_cfg.prompt_column, dataset_cfg.id_column
    where = f"Dataset file {shard.file} rows {shard.row_start}-{shard.row_stop}"
    # Footer and page locations are reused across shards of one file version (never without one).
    cache_key = None if shard.file_version is None else (shard.file, shard.file_version)
    try:
        with open_planned(shard, fs) as f:
            pf = open_parquet(f, cache_key, buffer_size=READ_BUFFER_BYTES)
            names = pf.schema_arrow.names
            for col, what in ((prompt_col, "prompt"), (id_col, "id")):
                if col is not None and col not in names:
                    raise DatasetError(f"{where}: the file has no {what} column {col!r}.")
            if shard.row_stop > pf.metadata.num_rows:
                raise DatasetError(f"{where}: the file has only {pf.metadata.num_rows} rows (changed since planning?).")
            columns = list(dict.fromkeys(
                [prompt_col] + ([id_col] if id_col else []) + [c for c in OVERRIDE_COLUMNS if c in names]
            ))
            # costs O(the shard's rows) wherever they lie: pages of a big row group before them
            # are not read
            table = read_row_range(f, pf, columns, shard.row_start, shard.row_stop, cache_key)
    except DatasetError:
        raise
    except FileNotFoundError:
        raise DatasetError(f"{where}: the file does not exist.") from None
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DatasetError(f"{where} could not be read ({first_line(e)}).") from None
    if table.num_rows != shard.num_rows:
        raise DatasetError(f"{where}: read {table.num_rows} rows instead of {shard.num_rows}.")
    values = {name: _column_values(table.column(name)) for name in columns}
    return _validate_rows(shard, values, prompt_col, id_col, render_cfg, limits)


def _column_values(column: pa.ChunkedArray) -> list:
    try:
        return column.to_pylist()
    except (UnicodeDecodeError, pa.ArrowException):
        if not is_string_type(column.type):
            raise
        # Invalid UTF-8 in a string column: mark those values, keep the rest.
        if pa.types.is_dictionary(column.type):
            column = column.cast(column.type.value_type)
        raw = column.cast(pa.large_binary()).to_pylist()
        return [None if v is None else _decode(v) for v in raw]


def _decode(raw: bytes) -> Any:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return _INVALID


# ---------------------------------------------------------------- validation


def _validate_rows(shard: Shard, values: dict[str, list], prompt_col: str, id_col: Optional[str],
                   render_cfg: Any, limits: Optional[SizeLimits] = None) -> list[RowSpec]:
    n = shard.num_rows

    def column(name: str) -> list:  # absent override columns read as all-null
        return values.get(name) or [None] * n

    prompts = values[prompt_col]
    ids = values[id_col] if id_col else [None] * n
    seeds, negatives = column("seed"), column("negative_prompt")
    heights, widths = column("height"), column("width")
    steps, guidances = column("num_inference_steps"), column("guidance_scale")

    # Lengths are checked before anything else touches a cell (strip, tokenizer): a 10 MB prompt
    # costs a len() and a bounded prefix in the manifest.
    max_chars = render_cfg.max_prompt_chars
    seen: set[str] = set()
    rows = []
    for i in range(n):
        row_index = shard.row_start + i
        reasons: list[Reason] = []
        errors: list[str] = []

        if id_col:
            row_id, id_ok = _parse_id(ids[i])
            row_id = _capped(row_id, MAX_ID_CHARS, "id", errors)  # only a bad id is longer
            if not id_ok:
                reasons.append(Reason.BAD_ID)
            elif row_id in seen:
                reasons.append(Reason.DUPLICATE_ID)
            else:
                seen.add(row_id)
        else:
            row_id, id_ok = derived_id(shard.file_index, row_index), True

        prompt = prompts[i]
        if prompt is not None and not isinstance(prompt, str):
            reasons.append(Reason.BAD_PROMPT)
            prompt = None
        elif prompt is not None and len(prompt) > max_chars:
            reasons.append(Reason.PROMPT_TOO_LONG)
            prompt = _capped(prompt, max_chars, "prompt", errors)
        elif prompt is None or not prompt.strip():
            reasons.append(Reason.EMPTY_PROMPT)

        negative = negatives[i]
        if negative is None:
            negative = render_cfg.negative_prompt
        elif not isinstance(negative, str):
            reasons.append(Reason.BAD_NEGATIVE_PROMPT)
            negative = None
        if negative is not None and len(negative) > max_chars:
            reasons.append(Reason.PROMPT_TOO_LONG)
            negative = _capped(negative, max_chars, "negative_prompt", errors)

        height = parse_size(heights[i], render_cfg.height, limits)
        width = parse_size(widths[i], render_cfg.width, limits)
        if height is None or width is None:
            reasons.append(Reason.BAD_SIZE)
        num_steps = _parse_steps(steps[i], render_cfg.num_inference_steps)
        if num_steps is None:
            reasons.append(Reason.BAD_STEPS)
        guidance = _parse_guidance(guidances[i], render_cfg.guidance_scale)
        if guidance is None:
            reasons.append(Reason.BAD_GUIDANCE)
        if seeds[i] is None:
            seed = derive_seed(render_cfg.seed, row_id) if id_ok else None
        else:
            seed = _parse_seed(seeds[i])
            if seed is None:
                reasons.append(Reason.BAD_SEED)

        reason = reasons[0] if reasons else None
        rows.append(RowSpec(
            row_id=row_id,
            key=None if reason else object_key(row_id),
            prompt=prompt,
            negative_prompt=negative,
            seed=seed,
            height=height,
            width=width,
            num_inference_steps=num_steps,
            guidance_scale=guidance,
            file=shard.file,
            row_index=row_index,
            status=Status.REJECTED if reason else Status.PENDING,
            reason=reason,
            error="; ".join(errors) or None,
        ))
    return rows


def _capped(text: str, limit: int, what: str, errors: list[str]) -> str:
    """`text`, or its first `limit` characters with a note in `errors`: the manifest keeps a
    bounded prefix of an oversized cell."""
    if len(text) <= limit:
        return text
    errors.append(f"{what} has {len(text)} characters; limit {limit}")
    return text[:limit]


def _parse_id(value: Any) -> tuple[str, bool]:
    """(id as text, valid?) — invalid ids keep a printable form for the manifest."""
    if value is None:
        return "", False
    if value is _INVALID:
        return "<invalid utf-8>", False
    if isinstance(value, bytes):
        return value[:MAX_ID_CHARS // 2].hex(), False
    text = str(value)
    return text, len(text) <= MAX_ID_CHARS and bool(text.strip())


def _as_int(value: Any) -> Optional[int]:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return None


def parse_size(value: Any, default: int, limits: Optional[SizeLimits]) -> Optional[int]:
    size = default if value is None else _as_int(value)
    if size is None or size < 1 or (limits is not None and not limits.allows(size)):
        return None
    return size


def _parse_steps(value: Any, default: int) -> Optional[int]:
    steps = default if value is None else _as_int(value)
    return steps if steps is not None and 1 <= steps <= MAX_STEPS else None


def _parse_guidance(value: Any, default: float) -> Optional[float]:
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        value = float(value)
    except OverflowError:
        return None
    return value if math.isfinite(value) and value >= 0 else None


def _parse_seed(value: Any) -> Optional[int]:
    seed = _as_int(value)
    return seed if seed is not None and 0 <= seed <= MAX_SEED else None
