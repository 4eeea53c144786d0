"""`cogview-ray` command line: render, verify, make-checkpoint, nightly, report.

Errors a user can cause are printed as one line and mapped to an exit code in one place (`main`):
2 configuration, input or storage, 3 the run's lock is held by (or was lost to) another driver."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Optional


def _render(args) -> int:
    from .config import load_config

    cfg = load_config(args.config, args.overrides)
    from .driver import run_render  # after the config: a config error needs no Ray

    outcome = run_render(cfg)
    print(json.dumps({"run": outcome.run_uri, "totals": outcome.totals,
                      "shards_skipped": outcome.shards_skipped, "shards_committed": outcome.shards_committed,
                      "shards_failed": outcome.shards_failed}, sort_keys=True))
    return outcome.exit_code


def _verify(args) -> int:
    from .verify import verify_run

    report = verify_run(args.run_uri, _storage_options(args.storage_options), check_objects=not args.no_objects)
    print(report.summary())
    return 0 if report.verified else 1


def _make_checkpoint(args) -> int:
    from .model.checkpoint import make_checkpoint

    path = make_checkpoint(args.preset, args.out_dir, seed=args.seed)
    print(path)
    return 0


def _nightly(args) -> int:
    import datetime as dt

    from .errors import ConfigError
    from .nightly import run_nightly, scheduled_tick

    try:
        day = dt.date.fromisoformat(args.date) if args.date else None
    except ValueError:
        raise ConfigError(f"--night {args.date!r} is not a date like 2025-01-31.") from None
    if day is not None and args.scheduled_at:
        raise ConfigError("Give --night or --scheduled-at, not both: each names the night to render.")
    tick = None if day is not None else scheduled_tick(args.scheduled_at)
    result = run_nightly(args.config, args.overrides, day=day, scheduled_at=tick)
    render = result.render
    print(json.dumps({"run": result.run_uri, "day": result.day.isoformat(), "status": result.status,
                      "totals": render.totals if render else None, "deleted": result.deleted}, sort_keys=True))
    return result.exit_code


def _report(args) -> int:
    from .report import build_report

    result = build_report(args.run_uri, args.out, _storage_options(args.storage_options), sample_size=args.sample)
    print(result.html)
    return 0


def _storage_options(text: Optional[str]) -> Optional[dict]:
    """`--storage-options` as a dict. The text may hold credentials, so errors never quote it."""
    from .errors import ConfigError

    if not text:
        return None
    try:
        options = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"--storage-options is not valid JSON ({e.msg} at character {e.pos}); "
                          f"give a JSON object such as '{{\"anon\": true}}'.") from None
    if not isinstance(options, dict):
        raise ConfigError(f"--storage-options must be a JSON object such as '{{\"anon\": true}}', "
                          f"not a JSON {type(options).__name__}.")
    return options


def _user_errors() -> tuple[type[BaseException], ...]:
    """What a user can cause and read. Imported only when an exception is on its way out (the
    model layer loads torch); UserError carries its exit code, the others are 2."""
    from .errors import UserError
    from .model.loading import CheckpointError  # the model layer imports nothing of ours
    from .storage import StorageError

    return UserError, CheckpointError, StorageError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cogview-ray", description="Batch rendering of CogView3-Plus on Ray.")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("render", help="render a prompt dataset (resumes a run with the same settings)")
    r.add_argument("config", help="YAML config file (configs/demo.yaml is the embedded default)")
    r.add_argument("overrides", nargs="*", help="key=value overrides, e.g. render.batch_size=4")
    r.set_defaults(fn=_render)

    v = sub.add_parser("verify", help="check a run's accounting, commit markers and objects")
    v.add_argument("run_uri", help="{output.uri}/{run_id}")
    v.add_argument("--storage-options", help="JSON dict passed to fsspec (credentials otherwise from env)")
    v.add_argument("--no-objects", action="store_true", help="read no images: markers, coverage and accounting only")
    v.set_defaults(fn=_verify)

    m = sub.add_parser("make-checkpoint", help="write a random-weight checkpoint in the official layout")
    m.add_argument("--preset", choices=["tiny", "small", "full", "tiny-cogview4", "small-cogview4", "full-cogview4"],
                   required=True)
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("out_dir")
    m.set_defaults(fn=_make_checkpoint)

    n = sub.add_parser("nightly", help="render today's run (date-stamped id); resumes it, or does nothing if "
                                       "it is complete; applies nightly.keep_days retention")
    n.add_argument("config", help="YAML config file; an optional `nightly:` section holds timezone, "
                                  "run_id_format and keep_days")
    n.add_argument("overrides", nargs="*", help="key=value overrides, nightly.* included")
    n.add_argument("--night", "--date", dest="date",
                   help="render the run of this day (YYYY-MM-DD) instead of today's, e.g. a backfill")
    n.add_argument("--scheduled-at", help="the scheduler's tick (RFC 3339, e.g. 2026-12-03T02:00:00Z, or "
                                          "`raycronjob`): its date names the night, so a retry or late start "
                                          "continues it; default $COGVIEW_RAY_SCHEDULED_AT, else the clock")
    n.set_defaults(fn=_nightly)

    rp = sub.add_parser("report", help="write report.html with a contact sheet and timing charts for a run")
    rp.add_argument("run_uri", help="{output.uri}/{run_id}")
    rp.add_argument("--out", help="output folder (default ./report-{run_id})")
    rp.add_argument("--sample", type=int, default=24, help="images on the contact sheet (default 24)")
    rp.add_argument("--storage-options", help="JSON dict passed to fsspec (credentials otherwise from env)")
    rp.set_defaults(fn=_report)
    return p


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        code = args.fn(args)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return code
    except _user_errors() as e:  # evaluated only when an exception is on its way out
        from .credentials import redact_text

        print(f"cogview-ray: error: {redact_text(str(e))}", file=sys.stderr)
        return getattr(e, "exit_code", 2)
    except BrokenPipeError:  # `cogview-ray verify ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 141  # what a shell reports for SIGPIPE


if __name__ == "__main__":
    sys.exit(main())
