"""Nightly renders: one run per calendar day (its id is the date in a configurable time zone),
so a repeated trigger resumes that day's run or finds it complete; optional retention of old nights.

The settings are the config's `nightly:` section (config.NightlyConfig); everything else is an
ordinary render config.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

from .config import RunConfig, load_config, night_run_id, night_zone, parse_run_day
from .errors import RunLocked
from .manifest import read_success
from .run_lock import lock_staleness, read_lock
from .storage import RunStore, open_filesystem

if TYPE_CHECKING:
    from .driver import RunOutcome

# Retention deletes a whole night, so it wants a far older heartbeat than a takeover does: a lock
# fresher than this (drivers beat every 15 s) may belong to a paused driver, and its night is kept.
LIVE_LOCK_S = 3600.0


@dataclass
class NightlyOutcome:
    run_id: str
    run_uri: str
    day: dt.date
    status: str  # rendered | complete (nothing to do) | failed_shards | locked
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


def run_nightly(path: Optional[str], overrides: list[str] = (), *, day: Optional[dt.date] = None,
                now: Optional[dt.datetime] = None, out=None) -> NightlyOutcome:
    """Render (or resume) the night's run, or do nothing if it is complete; then, if the night is
    complete, apply retention. `day` (a backfill) or `now` replaces the real clock."""
    out = out or sys.stderr
    cfg, day = load_nightly_config(path, overrides, day=day, now=now)
    run_id = cfg.output.run_id
    store = RunStore(cfg.output.uri, run_id, cfg.output.storage_options)
    say = lambda msg: print(f"[cogview-ray] nightly {run_id}: {msg}", file=out, flush=True)  # noqa: E731
    result = NightlyOutcome(run_id, store.url(), day, "rendered", 0)
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


def prune_nights(cfg: RunConfig, day: dt.date, *, out=None, clock=time.time) -> list[str]:
    """Delete run folders under `output.uri` whose name `nightly.run_id_format` made for a day more
    than `nightly.keep_days` before `day`. Never today's run, never a later one, never a name the
    pattern did not make, never a night whose lock is live (run_lock's rule, judged against
    LIVE_LOCK_S). Returns the deleted run ids."""
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
        holder = read_lock(RunStore(cfg.output.uri, name, cfg.output.storage_options))
        if holder is not None and lock_staleness(holder, LIVE_LOCK_S, now=clock()) is None:
            print(f"[cogview-ray] retention: keeping {name}: a driver holds its lock", file=out, flush=True)
            continue
        fs.rm(path, recursive=True)
        deleted.append(name)
        print(f"[cogview-ray] retention: deleted {name} (older than {nightly.keep_days} days)", file=out, flush=True)
    return deleted
