"""RowCoverage: row runs, planned rows from the fingerprint, gaps, overlaps and strays."""
import numpy as np
import pytest

from cogview_ray.coverage import RowCoverage, describe_runs, planned_rows, row_runs

pytestmark = [pytest.mark.timeout(60)]


def test_row_runs_and_repeats():
    runs, repeated = row_runs(np.array([9, 3, 4, 5, 4, 7, 8, 4]))
    assert runs == [(3, 6), (7, 10)] and repeated.tolist() == [4]
    assert row_runs(np.array([], np.int64))[0] == []
    assert describe_runs([(0, 3), (5, 6)]) == "0-2, 5"


def test_planned_rows_cut_by_the_limit():
    fp = {"files": [{"path": "a", "num_rows": 10}, {"path": "b", "num_rows": 10}, {"path": "c", "num_rows": 5}],
          "planned_rows": 13}
    assert planned_rows(fp) == {"a": 10, "b": 3, "c": 0}
    assert planned_rows({"files": [{"path": "a"}]}) is None and planned_rows(None) is None


def test_input_path_is_the_longest_suffix():
    cov = RowCoverage({"a.parquet": 1, "sub/a.parquet": 1})
    assert cov.input_path("/data/sub/a.parquet") == "sub/a.parquet"
    assert cov.input_path("/data/a.parquet") == "a.parquet"
    assert cov.input_path("/data/xa.parquet") is None
    assert RowCoverage(None).input_path("/data/a.parquet") is None


def test_check_names_gaps_overlaps_and_strays():
    cov = RowCoverage({"in": 10})
    cov.add("/d/in", [(0, 4)], "s0")
    cov.add("/d/in", [(2, 5)], "s1")
    cov.add("/d/in", [(7, 12)], "s2")
    cov.add("/d/x", [(0, 1)], "s3")
    problems, notes = cov.check(complete=True)
    assert problems == ["shard s1 rows 2-3 of /d/in also appear in shard s0",
                        "shard s2 rows 10-11 of /d/in are past the 10 rows planned from that file",
                        "shard s3 holds rows of /d/x, which is not an input file of this run (_run.json)",
                        "rows 5-6 of /d/in are in no committed shard"]
    assert notes == []
    problems, notes = cov.check(complete=False)
    assert len(problems) == 3
    assert notes == ["run in progress: 2 of 10 planned rows are in no committed shard yet (rows 5-6 of /d/in)"]
