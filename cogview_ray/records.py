"""The per-row vocabulary: status and reason codes, render parameters, the manifest row
(`RowRecord`) and its Arrow schema, derived from the dataclass so the columns are spelled once."""
from __future__ import annotations

import dataclasses
import enum
import typing
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Optional

import pyarrow as pa

from cogview_ray.shards import Shard

if TYPE_CHECKING:
    from cogview_ray.rows import RowSpec

MAX_ERROR_CHARS = 300  # a bad row costs a bounded manifest entry, whatever the exception said


class _Code(str, enum.Enum):
    """A snake_case code that is its own string: equal to, hashed and written like its value."""

    def __str__(self) -> str:
        return self.value


class Status(_Code):
    PENDING = "pending"  # a RowSpec to render; never in a manifest
    OK = "ok"
    FAILED = "failed"
    REJECTED = "rejected"


class Reason(_Code):
    """Why a row is rejected or failed (or, for `prompt_truncated`, a note on an ok row).

    A code only: the detail of an infrastructure failure goes to the record's `error`."""

    # rejected: bad input, found before any rendering
    EMPTY_PROMPT = "empty_prompt"
    BAD_PROMPT = "bad_prompt"
    BAD_NEGATIVE_PROMPT = "bad_negative_prompt"
    BAD_ID = "bad_id"
    DUPLICATE_ID = "duplicate_id"
    BAD_SIZE = "bad_size"
    BAD_STEPS = "bad_steps"
    BAD_GUIDANCE = "bad_guidance"
    BAD_SEED = "bad_seed"
    PROMPT_TOO_LONG = "prompt_too_long"
    SIZE_NOT_COMPILED = "size_not_compiled"
    # failed: the row itself could not be rendered
    NONFINITE_OUTPUT = "nonfinite_output"
    OUT_OF_MEMORY = "out_of_memory"
    WRITE_FAILED = "write_failed"  # its image upload kept failing (format=files); detail in `error`
    # failed: the whole shard ran out of attempts (driver)
    WORKER_DIED = "worker_died"
    WORKER_LOST = "worker_lost"
    WORKER_ERROR = "worker_error"
    TIMEOUT = "timeout"
    BAD_RESULT = "bad_result"
    INPUT_CHANGED = "input_changed"
    # ok, with a note
    PROMPT_TRUNCATED = "prompt_truncated"


STATUSES = (Status.OK.value, Status.FAILED.value, Status.REJECTED.value)  # of a manifest row
_REASONS = frozenset(r.value for r in Reason)
_ARROW = "arrow"  # field metadata key: the column's Arrow type where the annotation is not enough


def _int32(default: Any = dataclasses.MISSING):
    """A field written as an int32 column (no default unless one is given)."""
    return field(default=default, metadata={_ARROW: pa.int32()})


@dataclass(frozen=True)
class RenderParams:
    """What makes a row's image; None only on rejected rows (the value could not be read)."""

    prompt: Optional[str]
    negative_prompt: Optional[str]
    seed: Optional[int]
    height: Optional[int] = _int32()
    width: Optional[int] = _int32()
    num_inference_steps: Optional[int] = _int32()
    guidance_scale: Optional[float]

    def render_params(self) -> dict[str, Any]:
        """The render parameters alone, by name (also of a RowSpec or RowRecord)."""
        return {name: getattr(self, name) for name in RENDER_FIELDS}


RENDER_FIELDS = tuple(f.name for f in dataclasses.fields(RenderParams))


@dataclass(frozen=True)
class _RecordHead:
    """The manifest columns before the render parameters."""

    run_id: str
    shard_id: str
    id: Optional[str]
    file: str
    row_index: int


# Dataclasses take fields from the last base first: _RecordHead, RenderParams, then these,
# which is the manifest's column order.
@dataclass(frozen=True)
class RowRecord(RenderParams, _RecordHead):
    """One manifest row: the fate of one input row."""

    status: str  # ok | failed | rejected
    reason: Optional[str] = None  # a Reason code; ok rows may carry prompt_truncated
    key: Optional[str] = None  # output key relative to the run prefix
    bytes: Optional[int] = None
    sha256: Optional[str] = None
    queue_s: Optional[float] = None
    text_encoding_s: Optional[float] = None
    denoising_s: Optional[float] = None
    decoding_s: Optional[float] = None
    image_encoding_s: Optional[float] = None
    writing_s: Optional[float] = None
    worker_id: Optional[str] = None
    node: Optional[str] = None
    device: Optional[str] = None
    attempt: int = _int32(0)
    model_path: Optional[str] = None
    model_hash: Optional[str] = None
    prompt_truncated: bool = False
    error: Optional[str] = None  # free-text detail of a failure (capped); never parsed
    # Appended last, so earlier columns keep their order; manifests written before them read as null.
    family: Optional[str] = None  # model family (model_index `_class_name`) that rendered the row
    attention: Optional[str] = None  # SDPA backend the pipeline used (its identity), e.g. flash, math

    def __post_init__(self):
        if self.error is not None and len(self.error) > MAX_ERROR_CHARS:
            object.__setattr__(self, "error", self.error[:MAX_ERROR_CHARS])

    @classmethod
    def from_spec(cls, spec: RowSpec, *, run_id: str, shard_id: str, status: str, **outcome) -> RowRecord:
        """The record of `spec`'s row: its id, place and render parameters, plus `outcome`
        (reason, error, key, timings, worker, ...)."""
        return cls(run_id=run_id, shard_id=shard_id, id=spec.row_id, file=spec.file,
                   row_index=spec.row_index, status=status, **spec.render_params(), **outcome)


def _arrow_type(f: dataclasses.Field, hint: Any) -> pa.DataType:
    if _ARROW in f.metadata:
        return f.metadata[_ARROW]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if args else hint  # Optional[X] -> X
    return {str: pa.string(), int: pa.int64(), float: pa.float64(), bool: pa.bool_()}[base]


def _schema(cls) -> pa.Schema:
    hints = typing.get_type_hints(cls)
    return pa.schema([(f.name, _arrow_type(f, hints[f.name])) for f in dataclasses.fields(cls)])


MANIFEST_SCHEMA = _schema(RowRecord)


@dataclass
class ShardResult:
    """What a worker returns for one shard: one record per input row."""

    shard_id: str
    attempt: int
    worker_id: str
    node: str
    device: str
    records: list[RowRecord] = field(default_factory=list)
    started_at: float = 0.0  # unix seconds
    finished_at: float = 0.0
    load_s: float = 0.0

    def counts(self) -> dict[str, int]:
        return count_statuses(r.status for r in self.records)


def count_statuses(statuses: Iterable[str]) -> dict[str, int]:
    counts = dict.fromkeys(STATUSES, 0)
    for s in statuses:
        if s not in counts:
            raise ValueError(f"status {s!r} is not one of {', '.join(STATUSES)}")
        counts[s] += 1
    return counts


def count_reasons(reasons: Iterable[Optional[str]]) -> dict[str, int]:
    """Rows per reason code, rows of every status (no reason: not counted). The one bucketing
    that run statistics (`_SUCCESS.json`), `verify` and `report` share."""
    return dict(Counter(str(r) for r in reasons if r))


def records_table(records: list[RowRecord]) -> pa.Table:
    """Records as a MANIFEST_SCHEMA table, in (file, row_index) order; refuses a reason that is
    not a code (details belong in `error`)."""
    rows = sorted(records, key=lambda r: (r.file, r.row_index))
    for r in rows:
        if r.reason is not None and r.reason not in _REASONS:
            raise ValueError(f"reason {r.reason!r} of row {r.row_index} of {r.file} is not a reason "
                             f"code; put the detail in `error`")
    cols = {name: [getattr(r, name) for r in rows] for name in MANIFEST_SCHEMA.names}
    return pa.table(cols, schema=MANIFEST_SCHEMA)



def failed_records(shard: Shard, rows: Optional[list[RowSpec]], *, run_id: str, attempts: int,
                   reason: str, error: Optional[str], model_path: Optional[str]) -> list[RowRecord]:
    """Records for a shard out of attempts: rejected rows stay rejected with their own reason,
    every other row is `failed` with `reason` (a code) and `error` (the detail). `rows` is the
    shard's RowSpecs, or None when they could not be read (rows then carry only their place)."""
    reason = Reason(reason)  # a code; ValueError for anything else
    if rows is not None and len(rows) != shard.num_rows:
        raise ValueError(f"{len(rows)} rows for shard {shard.shard_id} of {shard.num_rows} rows")
    common = dict(run_id=run_id, shard_id=shard.shard_id, attempt=attempts, model_path=model_path)
    if rows is None:
        unknown = dict.fromkeys(RENDER_FIELDS)
        return [RowRecord(id=None, file=shard.file, row_index=shard.row_start + i, status=Status.FAILED,
                          reason=reason, error=error, **unknown, **common)
                for i in range(shard.num_rows)]
    return [RowRecord.from_spec(r, status=Status.REJECTED, reason=r.reason, error=r.error, **common)
            if r.status == Status.REJECTED else
            RowRecord.from_spec(r, status=Status.FAILED, reason=reason, error=error, **common)
            for r in rows]
