"""Nightly renders: one run per calendar day (its id is the date in a configurable time zone),
so a repeated trigger resumes that day's run or finds it complete; optional retention of old nights.

The night is the date of the scheduler's tick (`--scheduled-at`), never of the moment a retry or a
late start happens to run; `--night` names it directly (a backfill). The settings are the config's
`nightly:` section (config.NightlyConfig); everything else is an ordinary render config.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

from .config import RunConfig, load_config, night_run_id, night_zone, parse_run_day
from .errors import ConfigError, RunLocked
from .manifest import read_success
from .run_lock import holder_staleness, read_holder
from .storage import RunStore, open_filesystem

if TYPE_CHECKING:
    from .driver import RunOutcome

# Retention deletes a whole night, so it wants a far older heartbeat than a takeover does: a lock
# fresher than this (drivers beat every 15 s) may belong to a paused driver, and its night is kept.
LIVE_LOCK_S = 3600.0

# The tick reaches the driver in this variable when no --scheduled-at is given: cronjob.yaml's
# wrapper puts the CronJob's tick there, raycronjob.yaml puts RAYCRONJOB there (see scheduled_tick).
SCHEDULED_AT_ENV = "COGVIEW_RAY_SCHEDULED_AT"
RAYCRONJOB = "raycronjob"
# A tick older than this when its job starts has been superseded by a later one: a scheduler that
# catches up after downtime (KubeRay >= 1.7's RayCronJob) creates one RayJob per missed tick, and
# only the newest may render. A retry or late start of the same night is well inside it.
MISSED_AFTER_S = 24 * 3600.0
# Ray's job supervisor hands the entrypoint its job config (submission id included) in this variable.
_RAY_JOB_CONFIG_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
# KubeRay names a RayCronJob's RayJob `{cronjob}-{Unix minute of the tick}` (>= 1.7) and its Ray
# submission id `{rayjob}-{5 random characters}` when the template sets no jobId.
_RAYCRONJOB_SUBMISSION = re.compile(r"^[a-z0-9.-]+-(?P<minute>\d{1,12})-[a-z0-9]{5}$")


@dataclass
class NightlyOutcome:
    run_id: str
    run_uri: str
    day: dt.date
    status: str  # rendered | complete (nothing to do) | failed_shards | locked | missed (superseded tick)
    exit_code: int
    message: str = ""
    render: Optional[RunOutcome] = None
    deleted: list[str] = field(default_factory=list)


def load_nightly_config(path: Optional[str], overrides: list[str] = (), *,
                        day: Optional[dt.date] = None, now: Optional[dt.datetime] = None
                        ) -> tuple[RunConfig, dt.date]:
    """The config with `output.run_id` set to the night's id (whatever the file or overrides
    say), and the night's day: `day` if given, else the day of `now` (default: the real clock)."""
    cfg = load_config(path, overrides)
    day = day or today(cfg, now)
    output = dataclasses.replace(cfg.output, run_id=night_run_id(cfg.nightly, day))
    return dataclasses.replace(cfg, output=output), day


def today(cfg: RunConfig, now: Optional[dt.datetime] = None) -> dt.date:
    """The calendar day of `now` (default: the real clock) in the nightly time zone."""
    tz = night_zone(cfg.nightly)
    if now is None:
        return dt.datetime.now(tz).date()
    if now.tzinfo is None:
        raise ValueError("now must be a timezone-aware datetime")
    return now.astimezone(tz).date()


def scheduled_tick(value: Optional[str], environ=os.environ) -> Optional[dt.datetime]:
    """The scheduler's tick from `value` (else $COGVIEW_RAY_SCHEDULED_AT), or None when neither is set.

    Either an RFC 3339 time with its offset (`2026-12-03T02:00:00Z`: what a CronJob's
    `batch.kubernetes.io/cronjob-scheduled-timestamp` annotation and the API server's timestamps
    hold), or `raycronjob`: the tick KubeRay (>= 1.7) wrote into the name of the RayJob it created
    for a RayCronJob, read from this Ray job's submission id."""
    text = (value if value is not None else environ.get(SCHEDULED_AT_ENV, "")).strip()
    if not text:
        return None
    if text == RAYCRONJOB:
        return _raycronjob_tick(environ)
    try:
        tick = dt.datetime.fromisoformat(text)
    except ValueError:
        tick = None
    if tick is None or tick.tzinfo is None:
        raise ConfigError(f"The scheduled time {text!r} is not an RFC 3339 time with an offset such as "
                          f"2026-12-03T02:00:00Z, nor {RAYCRONJOB!r}.")
    return tick


def _raycronjob_tick(environ) -> dt.datetime:
    try:
        job_id = json.loads(environ.get(_RAY_JOB_CONFIG_ENV, "{}"))["metadata"]["job_submission_id"]
    except (ValueError, KeyError, TypeError):
        job_id = None
    match = _RAYCRONJOB_SUBMISSION.match(job_id) if isinstance(job_id, str) else None
    if match is None:
        raise ConfigError(f"{SCHEDULED_AT_ENV}={RAYCRONJOB} needs a Ray job submitted for a RayCronJob by "
                          f"KubeRay >= 1.7 (submission id like cogview-nightly-29412345-x7k2p), got {job_id!r}.")
    return dt.datetime.fromtimestamp(int(match["minute"]) * 60, dt.timezone.utc)


def run_nightly(path: Optional[str], overrides: list[str] = (), *, day: Optional[dt.date] = None,
                now: Optional[dt.datetime] = None, scheduled_at: Optional[dt.datetime] = None,
                clock=time.time, out=None) -> NightlyOutcome:
    """Render (or resume) the night's run, or do nothing if it is complete; then, if the night is
    complete, apply retention. The night is `day` (a backfill), else the date of `scheduled_at`
    (the scheduler's tick: a retry or late start continues that night), else of `now` (default:
    the real clock). A tick older than MISSED_AFTER_S by `clock` is skipped (status `missed`)."""
    out = out or sys.stderr
    tick = scheduled_at if day is None else None  # a named night is rendered whenever asked
    cfg, day = load_nightly_config(path, overrides, day=day, now=tick or now)
    run_id = cfg.output.run_id
    store = RunStore(cfg.output.uri, run_id, cfg.output.storage_options)
    say = lambda msg: print(f"[cogview-ray] nightly {run_id}: {msg}", file=out, flush=True)  # noqa: E731
    result = NightlyOutcome(run_id, store.url(), day, "rendered", 0)
    late_s = clock() - tick.timestamp() if tick is not None else 0.0
    if late_s > MISSED_AFTER_S:
        result.status, result.message = "missed", (
            f"skipped: its tick {tick.isoformat()} is {late_s / 3600:.0f} h old, so a later tick has "
            f"come (a scheduler catching up); render it with --night {day.isoformat()} if it is still wanted")
        say(result.message)
        return result
    store.invalidate()
    done = read_success(store)
    if done is not None:
        totals = done.get("totals", {})
        result.status, result.message = "complete", (
            f"already complete ({totals.get('ok')} ok of {totals.get('rows')} rows); nothing to render")
        say(result.message)
    else:
        from .driver import run_render  # Ray and the model layer load only when a night renders

        try:
            result.render = run_render(cfg, out=out)
        except RunLocked as e:  # an overlapping trigger: not an error of this night
            result.status, result.exit_code = "locked", e.exit_code
            result.message = f"another trigger is rendering this night; not starting a second driver ({e})"
            say(result.message)
            return result
        if result.render.exit_code != 0:
            result.status, result.exit_code = "failed_shards", result.render.exit_code
            result.message = f"{result.render.shards_failed} shard(s) failed; trigger again to retry them"
            say(result.message)
    if cfg.nightly.keep_days is not None and result.exit_code == 0:  # prune only after a good night
        result.deleted = prune_nights(cfg, day, out=out)
    return result


def prune_nights(cfg: RunConfig, day: dt.date, *, out=None) -> list[str]:
    """Delete run folders under `output.uri` whose name `nightly.run_id_format` made for a day more
    than `nightly.keep_days` before `day`. Never today's run, never a later one, never a name the
    pattern did not make, never a night whose lock is live (run_lock's rule against LIVE_LOCK_S,
    on the store's clock: no host's clock, nor the holder's own `heartbeat_at`, is trusted).
    Returns the deleted run ids."""
    out = out or sys.stderr
    nightly = cfg.nightly
    keep_id = night_run_id(nightly, day)
    fs, base = open_filesystem(cfg.output.uri, cfg.output.storage_options)
    fs.invalidate_cache()
    try:
        entries = fs.ls(base, detail=True)
    except FileNotFoundError:
        return []
    deleted = []
    for entry in sorted(entries, key=lambda e: e["name"]):
        path = str(entry["name"]).rstrip("/")
        name = path.rsplit("/", 1)[-1]
        if entry.get("type") != "directory" or name == keep_id:
            continue
        night = parse_run_day(name, nightly.run_id_format)
        if night is None or (day - night).days <= nightly.keep_days:
            continue
        night_store = RunStore(cfg.output.uri, name, cfg.output.storage_options)
        holder = read_holder(night_store)
        if holder is not None and not holder.released and holder_staleness(night_store, holder, LIVE_LOCK_S)[0] is None:
            print(f"[cogview-ray] retention: keeping {name}: a driver holds its lock", file=out, flush=True)
            continue
        fs.rm(path, recursive=True)
        deleted.append(name)
        print(f"[cogview-ray] retention: deleted {name} (older than {nightly.keep_days} days)", file=out, flush=True)
    return deleted
