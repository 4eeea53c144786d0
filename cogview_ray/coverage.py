"""Row coverage of a run: which rows of which input files its committed shards hold, kept as
intervals per file, checked against the planned input for gaps, overlaps and strays."""
from __future__ import annotations

from collections import defaultdict
from typing import Optional

import numpy as np

_SHOWN_GAPS = 3  # gaps named in the note of a run in progress


def row_runs(row_index: np.ndarray) -> tuple[list[tuple[int, int]], np.ndarray]:
    """`([(start, stop), ...], repeated)`: the sorted half-open runs of consecutive rows in
    `row_index`, and the row numbers that occur more than once."""
    rows = np.sort(np.asarray(row_index, dtype=np.int64))
    repeated = np.unique(rows[1:][rows[1:] == rows[:-1]])
    rows = np.unique(rows)
    if not len(rows):
        return [], repeated
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = rows[np.concatenate(([0], breaks))]
    stops = rows[np.concatenate((breaks - 1, [len(rows) - 1]))] + 1
    return list(zip(starts.tolist(), stops.tolist())), repeated


def describe_rows(start: int, stop: int) -> str:
    """'row 7' or 'rows 7-9' for the half-open range [start, stop)."""
    return f"row {start}" if stop - start == 1 else f"rows {start}-{stop - 1}"


def _is(start: int, stop: int) -> str:
    return "is" if stop - start == 1 else "are"


def describe_runs(runs: list[tuple[int, int]], shown: int = 4) -> str:
    text = ", ".join(f"{a}" if b - a == 1 else f"{a}-{b - 1}" for a, b in runs[:shown])
    return text + (f" and {len(runs) - shown} more ranges" if len(runs) > shown else "")


def planned_rows(fingerprint: object) -> Optional[dict[str, int]]:
    """Rows planned per input file (path relative to the dataset root), from `_run.json`'s
    fingerprint: every file's `num_rows`, the last ones cut to `planned_rows` (a `limit`).
    None when the fingerprint does not record per-file row counts."""
    if not isinstance(fingerprint, dict) or not isinstance(fingerprint.get("files"), list):
        return None
    files = fingerprint["files"]
    if not all(isinstance(f, dict) and isinstance(f.get("path"), str) and isinstance(f.get("num_rows"), int)
               for f in files):
        return None
    left = fingerprint.get("planned_rows")
    left = left if isinstance(left, int) else sum(f["num_rows"] for f in files)
    planned = {}
    for f in files:
        planned[f["path"]] = min(f["num_rows"], max(left, 0))
        left -= planned[f["path"]]
    return planned


class RowCoverage:
    """Intervals of input rows per file, each owned by the shard that holds it."""

    def __init__(self, planned: Optional[dict[str, int]]):
        self.planned = planned  # None: the input's extent is unknown, only overlaps can be found
        self._spans: dict[str, list[tuple[int, int, str]]] = defaultdict(list)
        self._paths: dict[str, Optional[str]] = {}

    def add(self, file: str, runs: list[tuple[int, int]], shard: str) -> None:
        self._spans[file].extend((a, b, shard) for a, b in runs)

    def input_path(self, file: str) -> Optional[str]:
        """The fingerprint path of a manifest's `file` (a path on the dataset's filesystem):
        the longest fingerprint path it equals or ends with after a '/'."""
        if file not in self._paths:
            found, tail = None, file
            while self.planned is not None:
                if tail in self.planned:
                    found = tail
                    break
                cut = tail.find("/")
                if cut < 0:
                    break
                tail = tail[cut + 1:]
            self._paths[file] = found
        return self._paths[file]

    def check(self, complete: bool) -> tuple[list[str], list[str]]:
        """`(problems, notes)`. Rows held twice and rows outside the input are problems; rows of
        the input that no shard holds are problems of a `complete` run, a note of one in progress."""
        problems: list[str] = []
        gaps: list[tuple[int, int, str]] = []
        seen_inputs = set()
        for file in sorted(self._spans):
            spans = sorted(self._spans[file])
            path = self.input_path(file)
            limit = None
            if self.planned is not None:
                if path is None:
                    problems.append(f"shard {spans[0][2]} holds rows of {file}, which is not an input "
                                    f"file of this run (_run.json)")
                else:
                    limit = self.planned[path]
                    seen_inputs.add(path)
            end, owner = 0, None
            for start, stop, shard in spans:
                if owner is not None and start < end:
                    b = min(stop, end)
                    verb = "appears" if b - start == 1 else "appear"
                    problems.append(f"shard {shard} {describe_rows(start, b)} of {file} also {verb} in shard {owner}")
                elif limit is not None and start > end and end < limit:
                    gaps.append((end, min(start, limit), file))
                if limit is not None and stop > limit:
                    a = max(start, limit)
                    problems.append(f"shard {shard} {describe_rows(a, stop)} of {file} {_is(a, stop)} past "
                                    f"the {limit} rows planned from that file")
                if stop > end:
                    end, owner = stop, shard
            if limit is not None and end < limit:
                gaps.append((end, limit, file))
        for path, limit in (self.planned or {}).items():
            if path not in seen_inputs and limit > 0:
                gaps.append((0, limit, path))
        notes: list[str] = []
        if complete:
            problems += [f"{describe_rows(a, b)} of {f} {_is(a, b)} in no committed shard" for a, b, f in gaps]
        elif gaps:
            total, missing = sum(self.planned.values()), sum(b - a for a, b, _ in gaps)
            shown = "; ".join(f"{describe_rows(a, b)} of {f}" for a, b, f in gaps[:_SHOWN_GAPS])
            if len(gaps) > _SHOWN_GAPS:
                shown += f"; and {len(gaps) - _SHOWN_GAPS} more"
            notes.append(f"run in progress: {missing} of {total} planned rows are in no committed shard yet ({shown})")
        return problems, notes
