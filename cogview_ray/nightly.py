"""Nightly renders: one run per calendar day (its id is the date in a configurable time zone),
so a repeated trigger resumes that day's run or finds it complete; optional retention of old nights.

The `nightly:` section (or `nightly.*` overrides) is read here and never reaches `load_config`;
everything else is an ordinary render config.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import difflib
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

from omegaconf import DictConfig, OmegaConf

from .config import RUN_ID_RE, ConfigError, RunConfig, load_config
from .driver import RunError, RunOutcome, run_render
from .manifest import read_lock, read_manifest, read_success
from .storage import RunStore, open_filesystem

SECTION = "nightly"
# A lock whose heartbeat is this recent belongs to a driver that may still run: retention skips
# that night (drivers beat every 15 s; an hour leaves room for long pauses).
LIVE_LOCK_S = 3600.0
EXIT_OK, EXIT_FAILED_SHARDS, EXIT_ERROR, EXIT_LOCKED = 0, 1, 2, 3


@dataclass(frozen=True)
class NightlyConfig:
    timezone: str = "UTC"  # IANA name: the calendar day of a trigger is taken in this zone
    run_id_format: str = "nightly-%Y-%m-%d"  # strftime of the day; must encode the date and only it
    keep_days: Optional[int] = None  # delete nights dated more than this many days before today


@dataclass
class NightlyOutcome:
    run_id: str
    run_uri: str
    day: dt.date
    status: str  # rendered | complete (nothing to do) | failed_shards | locked | error
    exit_code: int
    message: str = ""
    render: Optional[RunOutcome] = None
    deleted: list[str] = field(default_factory=list)


# -- config ---------------------------------------------------------------------------------


def load_nightly_config(path: Optional[str], overrides: list[str] = (), *,
                        day: Optional[dt.date] = None, now: Optional[dt.datetime] = None
                        ) -> tuple[NightlyConfig, RunConfig, dt.date]:
    """The nightly settings, the render config with `output.run_id` set to the night's id, and the day."""
    section, run_overrides = _split(path, list(overrides))
    ncfg = _nightly_config(section)
    day = day or today(ncfg, now)
    run_id = night_run_id(ncfg, day)
    run_overrides = [o for o in run_overrides if o.split("=", 1)[0].strip() != "output.run_id"]
    run_overrides.append(f"output.run_id={run_id}")
    cfg = load_config(path, run_overrides, ignore_sections=(SECTION,))
    return ncfg, cfg, day


def _split(path, overrides):
    """(nightly mapping, the other overrides)."""
    section: dict = {}
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"Config file {path} does not exist.")
        try:
            loaded = OmegaConf.load(path)
        except Exception as e:  # yaml scanner and parser errors
            raise ConfigError(f"Config file {path} is not valid YAML ({str(e).splitlines()[0]}).") from None
        if isinstance(loaded, DictConfig) and SECTION in loaded:
            node = loaded[SECTION]
            if not isinstance(node, DictConfig):
                raise ConfigError(f"Config key {SECTION} in {path} must be a mapping of settings, not a single value.")
            section.update(OmegaConf.to_container(node, resolve=True))
    others = []
    for item in overrides:
        key = item.split("=", 1)[0].strip() if isinstance(item, str) else ""
        if key.startswith(SECTION + ".") and "=" in item:
            section[key[len(SECTION) + 1:]] = _override_value(key, item.split("=", 1)[1].strip())
        else:
            others.append(item)
    return section, others


def _override_value(key: str, raw: str):
    """Nightly values are strings (patterns start with '%', which YAML would reject) or keep_days."""
    if len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\"":
        raw = raw[1:-1]
    if key != f"{SECTION}.keep_days":
        return raw
    if raw.lower() in ("null", "none", "~", ""):
        return None
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"Config key {key} must be a positive integer or null, got {raw!r}.") from None


def _nightly_config(section: dict) -> NightlyConfig:
    names = [f.name for f in dataclasses.fields(NightlyConfig)]
    for key in section:
        if key not in names:
            close = difflib.get_close_matches(f"{SECTION}.{key}", [f"{SECTION}.{n}" for n in names], n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"Unknown config key {SECTION}.{key}{hint}.")
    ncfg = NightlyConfig(**section)
    zone(ncfg)
    _check_format(ncfg.run_id_format)
    k = ncfg.keep_days
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ConfigError(f"Config key nightly.keep_days must be a positive integer or null, got {k!r}.")
    return ncfg


def _check_format(fmt) -> None:
    """The id must encode the whole date and nothing finer, so one day has exactly one run."""
    if not isinstance(fmt, str) or "%" not in fmt:
        raise ConfigError(f"Config key nightly.run_id_format must be a strftime pattern such as "
                          f"nightly-%Y-%m-%d, got {fmt!r}.")
    for day in (dt.date(2001, 2, 3), dt.date(2030, 12, 31)):
        start, end = dt.datetime.combine(day, dt.time(0, 0)), dt.datetime.combine(day, dt.time(23, 59, 59))
        text = start.strftime(fmt)
        if end.strftime(fmt) != text:
            raise ConfigError(f"Config key nightly.run_id_format {fmt!r} changes within a day; "
                              f"use date fields only (%Y, %m, %d).")
        if not RUN_ID_RE.fullmatch(text):
            raise ConfigError(f"Config key nightly.run_id_format {fmt!r} gives run id {text!r}, which is "
                              f"not 1-128 letters, digits, '.', '_' or '-'.")
        if parse_run_day(text, fmt) != day:
            raise ConfigError(f"Config key nightly.run_id_format {fmt!r} does not encode the full date; "
                              f"include %Y, %m and %d.")


# -- days and run ids -----------------------------------------------------------------------


def zone(ncfg: NightlyConfig) -> dt.tzinfo:
    if ncfg.timezone in ("UTC", "Etc/UTC"):  # works without a tz database (slim images)
        return dt.timezone.utc
    try:
        from zoneinfo import ZoneInfo

        return ZoneInfo(ncfg.timezone)
    except Exception:
        raise ConfigError(f"Config key nightly.timezone must be an IANA time zone such as Europe/Berlin, "
                          f"got {ncfg.timezone!r}.") from None


def today(ncfg: NightlyConfig, now: Optional[dt.datetime] = None) -> dt.date:
    """The calendar day of `now` (default: the real clock) in the nightly time zone."""
    tz = zone(ncfg)
    if now is None:
        return dt.datetime.now(tz).date()
    if now.tzinfo is None:
        raise ValueError("now must be a timezone-aware datetime")
    return now.astimezone(tz).date()


def night_run_id(ncfg: NightlyConfig, day: dt.date) -> str:
    return dt.datetime.combine(day, dt.time(0, 0)).strftime(ncfg.run_id_format)


def parse_run_day(name: str, fmt: str) -> Optional[dt.date]:
    """The day a run folder name stands for, or None unless `fmt` produced exactly this name."""
    try:
        day = dt.datetime.strptime(name, fmt).date()
    except ValueError:
        return None
    return day if dt.datetime.combine(day, dt.time(0, 0)).strftime(fmt) == name else None


# -- one night ------------------------------------------------------------------------------


def run_nightly(path: Optional[str], overrides: list[str] = (), *, day: Optional[dt.date] = None,
                now: Optional[dt.datetime] = None, out=None) -> NightlyOutcome:
    """Render (or resume) the night's run, or do nothing if it is complete; then, if the night is
    complete, apply retention. `day` (a backfill) or `now` replaces the real clock."""
    out = out or sys.stderr
    ncfg, cfg, day = load_nightly_config(path, overrides, day=day, now=now)
    run_id = cfg.output.run_id
    store = RunStore(cfg.output.uri, run_id, cfg.output.storage_options)
    say = lambda msg: print(f"[cogview-ray] nightly {run_id}: {msg}", file=out, flush=True)  # noqa: E731
    result = NightlyOutcome(run_id, store.url(), day, "rendered", EXIT_OK)
    store.invalidate()
    done = read_success(store)
    if done is not None:
        totals = done.get("totals", {})
        result.status, result.message = "complete", (
            f"already complete ({totals.get('ok')} ok of {totals.get('rows')} rows); nothing to render")
        say(result.message)
    else:
        try:
            result.render = run_render(cfg, out=out)
        except RunError as e:
            holder = read_lock(store)
            result.status = "locked" if holder is not None else "error"
            result.exit_code = EXIT_LOCKED if holder is not None else EXIT_ERROR
            result.message = (f"another trigger is rendering this night; not starting a second driver ({e})"
                              if holder is not None else str(e))
            say(result.message)
            return result
        if result.render.exit_code != 0:
            result.status, result.exit_code = "failed_shards", EXIT_FAILED_SHARDS
            result.message = f"{result.render.shards_failed} shard(s) failed; trigger again to retry them"
            say(result.message)
    if ncfg.keep_days is not None and result.exit_code == EXIT_OK:  # prune only after a good night
        result.deleted = prune_nights(cfg, ncfg, day, out=out)
    return result


def prune_nights(cfg: RunConfig, ncfg: NightlyConfig, day: dt.date, *, out=None,
                 clock=time.time) -> list[str]:
    """Delete run folders under `output.uri` whose name `run_id_format` made for a day more than
    `keep_days` before `day`. Never today's run, never a later one, never a name the pattern did
    not make, never a night whose lock has a recent heartbeat. Returns the deleted run ids."""
    out = out or sys.stderr
    keep_id = night_run_id(ncfg, day)
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
        night = parse_run_day(name, ncfg.run_id_format)
        if night is None or (day - night).days <= ncfg.keep_days:
            continue
        holder = read_lock(RunStore(cfg.output.uri, name, cfg.output.storage_options))
        if holder is not None and clock() - float(holder.get("heartbeat_at", 0)) < LIVE_LOCK_S:
            print(f"[cogview-ray] retention: keeping {name}: a driver holds its lock", file=out, flush=True)
            continue
        fs.rm(path, recursive=True)
        deleted.append(name)
        print(f"[cogview-ray] retention: deleted {name} (older than {ncfg.keep_days} days)", file=out, flush=True)
    return deleted


# -- comparing nights -----------------------------------------------------------------------


@dataclass
class NightComparison:
    same: list[str]  # ids whose image bytes are equal in both runs
    changed: list[str]  # ids ok in both runs with different bytes
    only_a: list[str]  # ok in run a only
    only_b: list[str]


def compare_runs(a: RunStore, b: RunStore) -> NightComparison:
    """Image-for-image comparison of two runs by row id (ok rows of committed shards)."""
    def ok_hashes(store: RunStore) -> dict:
        t = read_manifest(store, columns=["id", "status", "sha256"]).to_pydict()
        return {i: h for i, s, h in zip(t["id"], t["status"], t["sha256"]) if s == "ok"}

    ha, hb = ok_hashes(a), ok_hashes(b)
    both = sorted(set(ha) & set(hb))
    return NightComparison(same=[i for i in both if ha[i] == hb[i]], changed=[i for i in both if ha[i] != hb[i]],
                           only_a=sorted(set(ha) - set(hb)), only_b=sorted(set(hb) - set(ha)))
