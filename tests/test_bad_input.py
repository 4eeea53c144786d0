"""Bad input end to end (issue 4, "Bad input"): dataset and config errors are one sentence from
`cogview-ray render` (exit code 2, no traceback) before any worker starts; bad rows become
`rejected` rows with reason codes in a real run, and the accounting holds."""
import math
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

pytest.register_assert_rewrite("tests.reliability")

from cogview_ray.cli import main as cli_main  # noqa: E402
from cogview_ray.storage import RunStore  # noqa: E402
from tests.reliability import (  # noqa: E402, F401 (tally is a fixture)
    check_invariants, check_rerun_renders_nothing, check_resources_released, make_cfg, overrides, read_trace,
    set_faults, tally, write_prompts)

pytest_plugins = ["tests.reliability"]
pytestmark = [pytest.mark.timeout(180)]


def _render_fails(tmp_path, monkeypatch, capsys, args, config_text="{}\n"):
    """Run the CLI; return its one error line after checking it stopped before any work."""
    trace = set_faults(monkeypatch, tmp_path)
    config = tmp_path / "cfg.yaml"
    config.write_text(config_text)
    rc = cli_main(["render", str(config), *args])
    err = capsys.readouterr().err
    assert rc == 2
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("cogview-ray: error: "), err
    assert not (tmp_path / "out").exists()  # no run folder, no lock, no _run.json
    assert read_trace(trace) == []  # no worker started
    return lines[0][len("cogview-ray: error: "):]


def _dataset(tmp_path, case):
    good = pa.table({"prompt": ["a house"] * 4, "id": [f"i{i}" for i in range(4)]})
    if case == "missing_file":
        return str(tmp_path / "nowhere.parquet"), r"Dataset file \S*nowhere.parquet does not exist\."
    if case == "empty_glob":
        (tmp_path / "data").mkdir()
        return str(tmp_path / "data" / "*.parquet"), r"Dataset glob \S*data/\*.parquet matches no files\."
    if case == "empty_folder":
        (tmp_path / "data").mkdir()
        return str(tmp_path / "data"), r"Dataset folder \S*data holds no \*.parquet files\."
    if case == "not_parquet":
        path = tmp_path / "prompts.parquet"
        path.write_text("prompt,id\na house,1\n")
        return str(path), r"Dataset file \S*prompts.parquet is not a readable Parquet file \(.+\)\."
    if case == "truncated":
        path = tmp_path / "prompts.parquet"
        pq.write_table(good, str(path))
        path.write_bytes(path.read_bytes()[:-40])
        return str(path), r"Dataset file \S*prompts.parquet is not a readable Parquet file \(.+\)\."
    if case == "no_prompt_column":
        path = tmp_path / "prompts.parquet"
        pq.write_table(good.rename_columns(["text", "id"]), str(path))
        return str(path), r"Dataset file \S*prompts.parquet has no prompt column 'prompt'\."
    if case == "prompt_not_strings":
        path = tmp_path / "prompts.parquet"
        pq.write_table(pa.table({"prompt": [1, 2, 3], "id": ["a", "b", "c"]}), str(path))
        return str(path), r"Dataset file \S*prompts.parquet has prompt column 'prompt' of type int64, not strings\."
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["missing_file", "empty_glob", "empty_folder", "not_parquet", "truncated",
                                  "no_prompt_column", "prompt_not_strings"])
def test_dataset_errors_are_one_sentence_before_any_work(tmp_path, monkeypatch, capsys, tiny_checkpoint, case):
    uri, expected = _dataset(tmp_path, case)
    message = _render_fails(tmp_path, monkeypatch, capsys, overrides(tiny_checkpoint, uri, tmp_path / "out", "r"))
    assert re.fullmatch(expected, message), message


@pytest.mark.parametrize("override, config_text, key", [
    ("render.heigth=64", None, "render.heigth"),  # unknown key (and a hint)
    ("render.batch_size=abc", None, "render.batch_size"),  # wrong type
    ("render.batch_size=0", None, "render.batch_size"),  # impossible value
    ("workers.num_workers=0", None, "workers.num_workers"),  # no workers
    (None, "workers:\n  max_atempts: 2\n", "workers.max_atempts"),  # unknown key in the file
    (None, "render:\n  height: big\n", "render.height"),  # wrong type in the file
])
def test_config_errors_name_the_key_before_any_work(tmp_path, monkeypatch, capsys, tiny_checkpoint, override,
                                                   config_text, key):
    data = write_prompts(tmp_path / "prompts.parquet", n=4)
    args = overrides(tiny_checkpoint, data, tmp_path / "out", "r") + ([override] if override else [])
    message = _render_fails(tmp_path, monkeypatch, capsys, args, config_text or "{}\n")
    assert key in message and message.endswith(".")
    if override == "render.heigth=64":
        assert "did you mean render.height?" in message


# (id, prompt, overrides, expected status, expected reason)
NASTY_A = [
    ("first", "a red house", {}, "ok", None),
    ("null-prompt", None, {}, "rejected", "empty_prompt"),
    ("empty-prompt", "", {}, "rejected", "empty_prompt"),
    ("blank-prompt", " \t\n  ", {}, "rejected", "empty_prompt"),
    ("huge-prompt", "a tiny red house " * 500, {}, "ok", "prompt_truncated"),
    ("control-chars", "a\x00b\x07c\x1b[31m red\r\nhouse\x7f", {}, "ok", None),
    ("unicode", "東京の夜景 🌃 café ñ Ω \u202e\u200b", {}, "ok", None),
    ("height-70", "a house", {"height": 70}, "rejected", "bad_size"),
    ("width-4096", "a house", {"width": 4096}, "rejected", "bad_size"),
    ("height-negative", "a house", {"height": -64}, "rejected", "bad_size"),
    ("height-null", "a house", {"height": None}, "ok", None),  # null override: the run's default
    ("steps-0", "a house", {"num_inference_steps": 0}, "rejected", "bad_steps"),
    ("steps-negative", "a house", {"num_inference_steps": -3}, "rejected", "bad_steps"),
    ("steps-huge", "a house", {"num_inference_steps": 10**9}, "rejected", "bad_steps"),
    ("steps-1", "a house", {"num_inference_steps": 1}, "ok", None),
    ("guidance-nan", "a house", {"guidance_scale": math.nan}, "rejected", "bad_guidance"),
    # rows 15-19 are one shard (shard_size=5): in one shard the first of two twins keeps the id
    ("dup-in-shard", "a house", {}, "ok", None),
    ("guidance-inf", "a house", {"guidance_scale": math.inf}, "rejected", "bad_guidance"),
    ("guidance-0", "a house", {"guidance_scale": 0.0}, "ok", None),
    ("dup-in-shard", "another house", {}, "rejected", "duplicate_id"),
    ("seed-negative", "a house", {"seed": -1}, "rejected", "bad_seed"),
    ("../x", "a house", {}, "ok", None),
    ("/etc/passwd", "a house", {}, "ok", None),
    ("", "a house", {}, "rejected", "bad_id"),
    ("a" * 300, "a house", {}, "rejected", "bad_id"),
    (None, "a house", {}, "rejected", "bad_id"),
    ("shared", "a house", {}, None, None),  # also in file B: exactly one of the two is ok
]
NASTY_B = [
    ("shared", "a house", {}, None, None),
    ("seed-too-big", "a house", {"seed": 2**64 - 1}, "rejected", "bad_seed"),
    ("b-ok", "a house", {}, "ok", None),
]


def _write_nasty(path, rows, seed_type):
    cols = {"id": pa.array([r[0] for r in rows], pa.string()),
            "prompt": pa.array([r[1] for r in rows], pa.string())}
    types = {"height": pa.int64(), "width": pa.int64(), "num_inference_steps": pa.int64(),
             "guidance_scale": pa.float64(), "seed": seed_type}
    for name, t in types.items():
        cols[name] = pa.array([r[2].get(name) for r in rows], t)
    pq.write_table(pa.table(cols), str(path))
    return str(path)


@pytest.mark.ray
def test_nasty_rows_are_rejected_with_reasons_in_a_real_run(ray_cluster, tiny_checkpoint, tmp_path, monkeypatch,
                                                            tally):
    (tmp_path / "data").mkdir()
    a = _write_nasty(tmp_path / "data" / "a.parquet", NASTY_A, pa.int64())
    b = _write_nasty(tmp_path / "data" / "b.parquet", NASTY_B, pa.uint64())
    set_faults(monkeypatch, tmp_path)
    cfg = make_cfg(tiny_checkpoint, str(tmp_path / "data"), tmp_path / "out", "nasty", "dataset.shard_size=5",
                   "render.max_sequence_length=64")
    outcome = tally.run(cfg)
    assert outcome.exit_code == 0
    store = RunStore(str(tmp_path / "out"), "nasty")
    rows = check_invariants(tally, store, {a: len(NASTY_A), b: len(NASTY_B)})
    got = {(r["file"], r["row_index"]): r for r in rows}
    for path, table in ((a, NASTY_A), (b, NASTY_B)):
        for i, (row_id, _, _, status, reason) in enumerate(table):
            if status is None:
                continue
            r = got[(path, i)]
            assert (r["status"], r["reason"]) == (status, reason), (row_id, r["status"], r["reason"])
    assert [NASTY_A[i][0] for i in (16, 19)] == ["dup-in-shard"] * 2  # the twins share shard 3 (rows 15-19)
    # in two shards (two workers at once) the first claim wins: either one, exactly once
    shared = [got[(a, len(NASTY_A) - 1)], got[(b, 0)]]
    assert sorted((r["status"], r["reason"]) for r in shared) == [("ok", None), ("rejected", "duplicate_id")]
    huge = next(r for r in rows if r["id"] == "huge-prompt")
    assert huge["prompt_truncated"] is True and huge["prompt"] == NASTY_A[4][1]  # the manifest keeps it whole
    assert not any(r["prompt_truncated"] for r in rows if r["id"] != "huge-prompt")
    assert next(r for r in rows if r["id"] == "height-null")["height"] == 64
    # ids that look like paths stay inside the run prefix
    run_dir = tmp_path / "out" / "nasty"
    for row_id in ("../x", "/etc/passwd"):
        key = next(r["key"] for r in rows if r["id"] == row_id)
        assert key.startswith("images/f0000") and ".." not in key and key.count("/") == 2
        assert (run_dir / key).is_file()
    outside = [p for p in (tmp_path / "out").rglob("*") if p.is_file() and run_dir not in p.parents]
    assert outside == [] and not (tmp_path / "out" / "x").exists() and not (tmp_path / "x").exists()
    check_resources_released()
    check_rerun_renders_nothing(tally, cfg, store)
