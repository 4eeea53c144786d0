"""Nightly renders: date-stamped run ids, the scheduler's tick naming the night, same-day reruns,
overlap refusal, retention on the store's clock, comparability."""
import datetime as dt
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from zoneinfo import ZoneInfo

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cogview_ray.cli import main as cli_main
from cogview_ray.config import NightlyConfig, parse_run_day
from cogview_ray.errors import ConfigError, RunLocked
from cogview_ray.manifest import read_manifest
from cogview_ray.nightly import (MISSED_AFTER_S, SCHEDULED_AT_ENV, load_nightly_config, prune_nights, run_nightly,
                                 scheduled_tick)
from cogview_ray.run_lock import read_lock
from cogview_ray.storage import RunStore
from cogview_ray.verify import verify_run

pytestmark = pytest.mark.timeout(300)

REPO = Path(__file__).resolve().parents[1]
DAY = dt.date(2025, 3, 2)


def write_prompts(path: Path, n: int = 4) -> str:
    rows = {"id": [f"night-{i:02d}" for i in range(n)],
            "prompt": [f"a lighthouse at night, variant {i}" for i in range(n)],
            # fixed seeds for half the rows; the others derive theirs from (render.seed, id)
            "seed": [1000 + i if i % 2 == 0 else None for i in range(n)]}
    pq.write_table(pa.table(rows, schema=pa.schema([("id", pa.string()), ("prompt", pa.string()),
                                                    ("seed", pa.int64())])), str(path))
    return str(path)


def write_config(tmp_path: Path, checkpoint: str, *, keep_days=None, extra: str = "") -> str:
    data = write_prompts(tmp_path / "prompts.parquet")
    text = f"""
nightly:
  timezone: Europe/Berlin
  run_id_format: nightly-%Y-%m-%d
  keep_days: {"null" if keep_days is None else keep_days}
model: {{path: "{checkpoint}", dtype: float32, device: cpu}}
dataset: {{uri: "{data}", id_column: id, shard_size: 2}}
render: {{height: 64, width: 64, num_inference_steps: 2, batch_size: 2, seed: 99}}
workers: {{num_workers: 2, cpus_per_worker: 1}}
output: {{uri: "{tmp_path / 'out'}", run_id: ignored-by-nightly}}
{extra}"""
    path = tmp_path / "nightly.yaml"
    path.write_text(text)
    return str(path)


# -- configuration (no Ray) -----------------------------------------------------------------


def test_run_id_is_the_day_in_the_configured_time_zone(tmp_path):
    cfg_path = write_config(tmp_path, "/nonexistent/ckpt")
    late_utc = dt.datetime(2025, 3, 1, 23, 30, tzinfo=dt.timezone.utc)  # already Mar 2 in Berlin
    cfg, day = load_nightly_config(cfg_path, [], now=late_utc)
    assert cfg.nightly == NightlyConfig(timezone="Europe/Berlin", run_id_format="nightly-%Y-%m-%d", keep_days=None)
    assert day == DAY and cfg.output.run_id == "nightly-2025-03-02"
    cfg, day = load_nightly_config(cfg_path, ["nightly.timezone=America/New_York"], now=late_utc)
    assert day == dt.date(2025, 3, 1) and cfg.output.run_id == "nightly-2025-03-01"
    cfg, _ = load_nightly_config(cfg_path, ["nightly.run_id_format=cats_%Y%m%d", "output.run_id=x",
                                            "render.seed=5"], day=DAY)
    assert cfg.output.run_id == "cats_20250302" and cfg.render.seed == 5
    assert parse_run_day("cats_20250302", "cats_%Y%m%d") == DAY
    assert parse_run_day("cats_2025032", "cats_%Y%m%d") is None  # not what the pattern would write
    assert parse_run_day("nightly-2025-02-30", "nightly-%Y-%m-%d") is None


@pytest.mark.parametrize("override,message", [
    ("nightly.timezone=Mars/Olympus", "nightly.timezone must be an IANA time zone"),
    ("nightly.run_id_format=nightly-%Y-%m-%d-%H", "changes within a day"),
    ("nightly.run_id_format=nightly-%Y-%m", "does not encode the full date"),
    ("nightly.run_id_format=nightly %Y-%m-%d", "not 1-128 letters"),
    ("nightly.keep_days=0", "nightly.keep_days must be a positive integer"),
    ("nightly.keep_day=3", r"Unknown config key nightly.keep_day on the command line "
                           r"\(did you mean nightly.keep_days\?\)"),
])
def test_bad_nightly_settings_are_refused_with_the_key(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        load_nightly_config(write_config(tmp_path, "/x"), [override], day=DAY)


def test_errors_in_the_rest_of_the_file_name_the_users_file(tmp_path):
    cfg_path = write_config(tmp_path, "/x", extra="resum: auto\n")
    with pytest.raises(ConfigError, match=rf"Unknown config key resum in {cfg_path}"):
        load_nightly_config(cfg_path, [], day=DAY)


# -- overlap and retention (no Ray: both happen before any rendering) -----------------------


def test_overlapping_trigger_is_refused_by_the_run_lock(tmp_path):
    cfg_path = write_config(tmp_path, "/x")
    run_dir = tmp_path / "out" / "nightly-2025-03-02"
    run_dir.mkdir(parents=True)
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "started_at": time.time(),
              "heartbeat_at": time.time(), "lock_id": "first-night"}
    (run_dir / "_LOCK").write_text(json.dumps(holder))
    # the script operators schedule, as a separate process
    proc = subprocess.run([sys.executable, "jobs/nightly.py", cfg_path, "--date", "2025-03-02"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == RunLocked.exit_code == 3, proc.stderr
    assert "another trigger is rendering this night" in proc.stderr
    assert f"pid {os.getpid()} on host {socket.gethostname()}" in proc.stderr
    # the first night's lock and run are untouched
    assert read_lock(RunStore(str(tmp_path / "out"), "nightly-2025-03-02"))["lock_id"] == "first-night"
    assert [p.name for p in run_dir.rglob("*") if p.is_file()] == ["_LOCK"]


def make_night(root: Path, name: str, complete: bool = True) -> None:
    (root / name / "manifest").mkdir(parents=True)
    (root / name / "manifest" / "f00000-000000.parquet").write_bytes(b"x")
    if complete:
        (root / name / "_SUCCESS.json").write_text(json.dumps({"totals": {"ok": 1, "rows": 1}}))


def test_retention_deletes_only_old_nights_made_by_the_pattern(tmp_path, capsys):
    out = tmp_path / "out"
    for d in range(20, 29):
        make_night(out, f"nightly-2025-02-{d:02d}")
    make_night(out, "nightly-2025-03-01")
    make_night(out, "nightly-2025-03-05")  # a later night (clock skew, backfill): kept
    for other in ("nightly-latest", "nightly-2025-02-30", "nightly-2025-2-1", "demo", "nightly-2024-12-31x"):
        make_night(out, other)
    (out / "nightly-2024-01-01").write_text("a file, not a run folder")
    make_night(out, "nightly-2025-02-21-locked")
    # an old night that a driver still holds (fresh heartbeat): kept
    live = out / "nightly-2025-02-22" / "_LOCK"
    live.write_text(json.dumps({"host": "other", "pid": 1, "heartbeat_at": time.time()}))
    # an old night with a long-dead lock (the store last wrote it two hours ago): deleted
    dead = out / "nightly-2025-02-23" / "_LOCK"
    dead.write_text(json.dumps({"host": "other", "pid": 1, "heartbeat_at": 0}))
    os.utime(dead, (time.time() - 7200, time.time() - 7200))

    cfg_path = write_config(tmp_path, "/x", keep_days=3)
    cfg, _ = load_nightly_config(cfg_path, [], day=DAY)
    deleted = prune_nights(cfg, DAY)
    # dated more than 3 days before Mar 2: Feb 20-26, less the live-locked Feb 22
    assert deleted == [f"nightly-2025-02-{d}" for d in (20, 21, 23, 24, 25, 26)]
    assert sorted(p.name for p in out.iterdir()) == sorted([
        "demo", "nightly-2024-01-01", "nightly-2024-12-31x", "nightly-2025-02-21-locked", "nightly-2025-02-22",
        "nightly-2025-02-27", "nightly-2025-02-28", "nightly-2025-02-30", "nightly-2025-03-01",
        "nightly-2025-03-05", "nightly-2025-2-1", "nightly-latest"])
    assert "keeping nightly-2025-02-22: a driver holds its lock" in capsys.readouterr().err
    assert prune_nights(cfg, DAY) == []  # idempotent


def test_today_is_never_pruned_even_with_a_date_format_that_sorts_oddly(tmp_path):
    out = tmp_path / "out"
    make_night(out, "02.03.2025")
    make_night(out, "01.02.2025")
    cfg_path = write_config(tmp_path, "/x", keep_days=1)
    cfg, _ = load_nightly_config(cfg_path, ["nightly.run_id_format=%d.%m.%Y"], day=DAY)
    assert prune_nights(cfg, DAY) == ["01.02.2025"]
    assert (out / "02.03.2025").is_dir()


def test_same_day_trigger_on_a_complete_night_does_nothing_but_retention(tmp_path, capsys):
    out = tmp_path / "out"
    make_night(out, "nightly-2025-03-02")
    make_night(out, "nightly-2025-02-01")
    before = sorted((out / "nightly-2025-03-02").rglob("*"))
    cfg_path = write_config(tmp_path, "/nonexistent/checkpoint", keep_days=7)
    # no Ray cluster and no model: nothing may be rendered
    assert cli_main(["nightly", cfg_path, "--date", "2025-03-02"]) == 0
    printed = capsys.readouterr()
    assert "nightly nightly-2025-03-02: already complete (1 ok of 1 rows); nothing to render" in printed.err
    summary = json.loads(printed.out)
    assert summary["status"] == "complete" and summary["deleted"] == ["nightly-2025-02-01"]
    assert sorted((out / "nightly-2025-03-02").rglob("*")) == before


def test_retention_judges_locks_on_the_store_clock_not_the_holders_or_ours(tmp_path, monkeypatch):
    out = tmp_path / "out"
    for d in (10, 11, 12):
        make_night(out, f"nightly-2025-02-{d}")
    stamp = time.time()
    # the holder's clock says it beat just now, but the store last heard from it two hours ago: stale
    lying = out / "nightly-2025-02-10" / "_LOCK"
    lying.write_text(json.dumps({"host": "other", "pid": 1, "heartbeat_at": stamp}))
    os.utime(lying, (stamp - 7200, stamp - 7200))
    # the holder's clock is a day behind, but the store wrote its lock a minute ago: live, kept
    behind = out / "nightly-2025-02-11" / "_LOCK"
    behind.write_text(json.dumps({"host": "other", "pid": 1, "heartbeat_at": stamp - 86400}))
    os.utime(behind, (stamp - 60, stamp - 60))
    # and this host's clock, a day ahead, is not asked either
    monkeypatch.setattr(time, "time", lambda: stamp + 86400)
    cfg, _ = load_nightly_config(write_config(tmp_path, "/x", keep_days=3), [], day=DAY)
    assert prune_nights(cfg, DAY) == ["nightly-2025-02-10", "nightly-2025-02-12"]
    assert sorted(p.name for p in out.iterdir()) == ["nightly-2025-02-11"]
    assert [p.name for p in (out / "nightly-2025-02-11").iterdir() if p.name.startswith("_probe")] == []


# -- the scheduler's tick names the night (no Ray: the nights are complete or skipped) ------------

TICK = dt.datetime(2025, 3, 1, 2, 0, tzinfo=dt.timezone(dt.timedelta(hours=1)))  # 02:00 in Berlin, Mar 1


def test_a_retry_after_midnight_continues_the_scheduled_night(tmp_path, capsys, monkeypatch):
    make_night(tmp_path / "out", "nightly-2025-03-01")
    cfg_path = write_config(tmp_path, "/nonexistent/checkpoint")
    retry = TICK + dt.timedelta(hours=23, minutes=30)  # 01:30 on Mar 2 in Berlin
    # by the clock alone the retry would start the next night's run
    assert load_nightly_config(cfg_path, [], now=retry)[1] == DAY
    result = run_nightly(cfg_path, [], scheduled_at=TICK, now=retry, clock=retry.timestamp)
    assert (result.run_id, result.day, result.status, result.exit_code) == (
        "nightly-2025-03-01", dt.date(2025, 3, 1), "complete", 0)
    # the wrapper's way: the tick in the environment, as the CronJob's annotation writes it
    tick = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(hours=20)).replace(microsecond=0)
    night = tick.astimezone(ZoneInfo("Europe/Berlin")).date()
    make_night(tmp_path / "out", f"nightly-{night.isoformat()}")
    monkeypatch.setenv(SCHEDULED_AT_ENV, tick.isoformat())
    assert cli_main(["nightly", cfg_path]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["day"], summary["status"]) == (night.isoformat(), "complete")
    # a tick late in the evening UTC is already the next day in the night's time zone
    assert run_nightly(cfg_path, [], scheduled_at=dt.datetime(2025, 2, 28, 23, 30, tzinfo=dt.timezone.utc),
                       clock=retry.timestamp).run_id == "nightly-2025-03-01"


def test_a_superseded_tick_is_skipped_but_a_named_night_renders(tmp_path, capsys):
    cfg_path = write_config(tmp_path, "/nonexistent/checkpoint")
    catch_up = TICK.timestamp() + MISSED_AFTER_S + 3600  # the operator came back a day and more later
    result = run_nightly(cfg_path, [], scheduled_at=TICK, clock=lambda: catch_up)
    assert (result.status, result.exit_code, result.run_id, result.render) == ("missed", 0, "nightly-2025-03-01", None)
    assert "render it with --night 2025-03-01" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing read or written: no cluster time spent on it
    # a backfill names the night and is never skipped
    make_night(tmp_path / "out", "nightly-2025-03-01")
    assert run_nightly(cfg_path, [], day=dt.date(2025, 3, 1), scheduled_at=TICK,
                       clock=lambda: catch_up).status == "complete"


def test_scheduled_tick_reads_rfc3339_or_the_raycronjob_submission_id():
    assert scheduled_tick(None, environ={}) is None
    assert scheduled_tick("2026-12-03T02:00:00Z", environ={}) == dt.datetime(2026, 12, 3, 2, tzinfo=dt.timezone.utc)
    env = {SCHEDULED_AT_ENV: "2026-12-03T03:00:00+01:00"}
    assert scheduled_tick(None, environ=env) == dt.datetime(2026, 12, 3, 2, tzinfo=dt.timezone.utc)
    # KubeRay >= 1.7 names the RayJob {cronjob}-{Unix minute of the tick}; Ray hands the driver its submission id
    minute = int(dt.datetime(2026, 12, 3, 2, tzinfo=dt.timezone.utc).timestamp()) // 60
    submission = {"metadata": {"job_submission_id": f"cogview-nightly-{minute}-x7k2p", "job_name": "whatever"}}
    ray_env = {SCHEDULED_AT_ENV: "raycronjob", "RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps(submission)}
    assert scheduled_tick(None, environ=ray_env) == dt.datetime(2026, 12, 3, 2, tzinfo=dt.timezone.utc)
    for bad, message in [("2026-12-03", "not an RFC 3339 time with an offset"),
                         ("2026-12-03T02:00:00", "not an RFC 3339 time with an offset"),
                         ("yesterday", "not an RFC 3339 time")]:
        with pytest.raises(ConfigError, match=message):
            scheduled_tick(bad, environ={})
    manual = {"RAY_JOB_CONFIG_JSON_ENV_VAR": json.dumps({"metadata": {"job_submission_id": "raysubmit_abc"}})}
    with pytest.raises(ConfigError, match="needs a Ray job submitted for a RayCronJob.*'raysubmit_abc'"):
        scheduled_tick("raycronjob", environ=manual)
    with pytest.raises(ConfigError, match="got None"):
        scheduled_tick("raycronjob", environ={})


def test_night_and_scheduled_at_together_are_refused(tmp_path, capsys):
    cfg_path = write_config(tmp_path, "/x")
    assert cli_main(["nightly", cfg_path, "--night", "2025-03-01", "--scheduled-at", "2025-03-01T02:00:00Z"]) == 2
    assert "Give --night or --scheduled-at, not both" in capsys.readouterr().err
    assert cli_main(["nightly", cfg_path, "--scheduled-at", "tonight"]) == 2
    assert "'tonight' is not an RFC 3339 time" in capsys.readouterr().err


@pytest.mark.s3
def test_retention_on_s3(s3_bucket, s3_storage_options, tmp_path):
    import dataclasses

    import fsspec

    fs = fsspec.filesystem("s3", **s3_storage_options)
    for name in ("nightly-2025-02-01", "nightly-2025-03-01", "nightly-2025-03-02", "keep-me"):
        fs.pipe_file(f"{s3_bucket}/nightly/{name}/_SUCCESS.json", b"{}")
        fs.pipe_file(f"{s3_bucket}/nightly/{name}/images/f00000-000000/a.png", b"png")
    cfg_path = write_config(tmp_path, "/x", keep_days=7)
    cfg, _ = load_nightly_config(cfg_path, [f"output.uri=s3://{s3_bucket}/nightly"], day=DAY)
    cfg = dataclasses.replace(cfg, output=dataclasses.replace(cfg.output, storage_options=s3_storage_options))
    assert prune_nights(cfg, DAY) == ["nightly-2025-02-01"]
    fs.invalidate_cache()
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{s3_bucket}/nightly")) == [
        "keep-me", "nightly-2025-03-01", "nightly-2025-03-02"]
    assert fs.find(f"{s3_bucket}/nightly/nightly-2025-02-01") == []


# -- real nights on a local Ray cluster ------------------------------------------------------


@pytest.mark.ray
def test_same_day_rerun_resumes_then_does_nothing(ray_cluster, tiny_checkpoint, tmp_path, capsys):
    cfg_path = write_config(tmp_path, tiny_checkpoint)
    first = run_nightly(cfg_path, [], day=DAY)
    assert (first.status, first.exit_code, first.run_id) == ("rendered", 0, "nightly-2025-03-02")
    assert first.render.shards_committed == 2 and first.render.totals["ok"] == 4
    store = RunStore(str(tmp_path / "out"), "nightly-2025-03-02")
    # as if the night had been cut short after its first shard
    store.delete("commits/f00000-000001.json")
    store.delete("_SUCCESS.json")
    again = run_nightly(cfg_path, [], day=DAY)
    assert again.status == "rendered" and again.exit_code == 0
    assert (again.render.shards_skipped, again.render.shards_committed) == (1, 1)
    images = sorted((tmp_path / "out" / "nightly-2025-03-02" / "images").rglob("*.png"))
    stamps = [p.stat().st_mtime_ns for p in images]
    third = run_nightly(cfg_path, [], day=DAY)
    assert (third.status, third.exit_code, third.render) == ("complete", 0, None)
    assert [p.stat().st_mtime_ns for p in images] == stamps and len(images) == 4
    report = verify_run(store.url())
    assert report.verified and report.totals["ok"] == 4, report.summary()
    assert cli_main(["verify", store.url()]) == 0


@pytest.mark.ray
def test_nights_are_comparable_image_for_image(ray_cluster, tiny_checkpoint, tmp_path):
    cfg_path = write_config(tmp_path, tiny_checkpoint)
    a = run_nightly(cfg_path, [], day=dt.date(2025, 3, 1))
    b = run_nightly(cfg_path, [], day=dt.date(2025, 3, 2))
    assert a.exit_code == b.exit_code == 0 and a.run_id != b.run_id
    out = str(tmp_path / "out")

    def images(run_id: str) -> dict:  # id -> sha256 of its image, ok rows of committed shards
        t = read_manifest(RunStore(out, run_id), columns=["id", "status", "sha256"]).to_pydict()
        return {i: h for i, st, h in zip(t["id"], t["status"], t["sha256"]) if st == "ok"}

    assert images(a.run_id) == images(b.run_id) and sorted(images(a.run_id)) == [f"night-{i:02d}" for i in range(4)]
    # a changed run seed changes the derived seeds (odd rows) but not the fixed ones (even rows)
    c = run_nightly(cfg_path, ["render.seed=100", "nightly.run_id_format=reseeded-%Y-%m-%d"], day=DAY)
    before, after = images(b.run_id), images(c.run_id)
    assert sorted(i for i in before if before[i] != after[i]) == ["night-01", "night-03"]
    assert sorted(i for i in before if before[i] == after[i]) == ["night-00", "night-02"]
