"""DuplicateFinder: the same duplicates in memory and spilled to disk, in arrival order."""
import os

import numpy as np
import pyarrow as pa
import pytest

from cogview_ray.duplicates import DuplicateFinder, string_hashes

pytestmark = [pytest.mark.timeout(60)]

SCHEMA = pa.schema([("value", pa.string()), ("shard", pa.string())])


def feed(finder, parts):
    for shard, values in parts:
        finder.add({"value": pa.array(values, pa.string()), "shard": pa.array([shard] * len(values))})


PARTS = [("s0", ["x", "y", "z"]), ("s1", ["y", "w", None, None]), ("s2", ["y", "x", "q"])]
EXPECTED = [("y", "s0", "s1"), ("y", "s1", "s2"), ("x", "s0", "s2")]  # by arrival of the later one


@pytest.mark.parametrize("buffer_rows,buckets", [(1000, 256), (2, 3), (1, 1)])
def test_duplicates_in_arrival_order_whether_spilled_or_not(tmp_path, buffer_rows, buckets):
    with DuplicateFinder(SCHEMA, buffer_rows=buffer_rows, buckets=buckets, dir=str(tmp_path)) as finder:
        feed(finder, PARTS)
        spilled = bool(os.listdir(tmp_path))
        pairs, count = finder.duplicates()
        assert [(b["value"], a["shard"], b["shard"]) for a, b in pairs] == EXPECTED and count == 3
        pairs, count = finder.duplicates(limit=1)
        assert [(b["value"], a["shard"], b["shard"]) for a, b in pairs] == EXPECTED[:1] and count == 3
    assert spilled == (buffer_rows < 8)  # nulls are never held
    assert os.listdir(tmp_path) == []  # spill files removed on close


def test_many_rows_spilled_find_exactly_the_planted_duplicates(tmp_path):
    values = [f"f00000-{i:09d}" for i in range(20000)]
    planted = [values[7], values[12345], values[19999]]
    with DuplicateFinder(SCHEMA, buffer_rows=3000, buckets=16, dir=str(tmp_path)) as finder:
        for k in range(0, len(values), 1000):
            feed(finder, [(f"s{k // 1000}", values[k:k + 1000])])
        feed(finder, [("late", planted)])
        pairs, count = finder.duplicates()
    assert count == 3 and sorted(b["value"] for _, b in pairs) == sorted(planted)
    assert {a["shard"] for a, _ in pairs} == {"s0", "s12", "s19"} and {b["shard"] for _, b in pairs} == {"late"}


def test_string_hashes_depend_on_content_only():
    a = pa.array(["", "a", "ab", "ba", None, "a", "x" * 300])
    h = string_hashes(a)
    assert h[1] == h[5] and len({h[1], h[2], h[3], h[0]}) == 4
    assert np.array_equal(string_hashes(a.slice(1, 4)), h[1:5])  # offsets of a slice
    assert np.array_equal(string_hashes(a, chunk=2), h)  # hashed a few strings at a time
    assert np.array_equal(string_hashes(a.cast(pa.large_string())), h)
