"""The fault plan for tests and chaos drills: a `Hooks` configured by `COGVIEW_RAY_FAULTS`, with
typed rules validated up front (an unknown key or value is refused, never silently ignored).

The variable holds JSON, read by the driver and forwarded to every worker:

    {"rules": [{"match": "POISON", "action": "raise", "times": 2}],
     "state_dir": "/tmp/x", "trace_dir": "/tmp/t",
     "storage": {"every": 3}}

Worker rules fire for a batch (`scope: batch`, the default) or a shard (`scope: shard`) holding
a pending row whose prompt contains `match` (default "": every row). Actions: raise (an exception
while rendering), exit (the worker process dies at once), hang (sleeps `seconds`, default far past
any timeout), nan (the matching rows' output is non-finite), oom (device out of memory for batches
of more than `batch_over` rows), slow (sleeps `seconds`, default 1, before each batch).

Driver rules have a `point` instead of `match`: `before_manifest` (a shard's images are
written, its manifest part is not) or `after_manifest` (the part is written, the marker is
not); `shard` limits them to one shard id. Their action is `exit`: the driver dies at once.

`times` caps how often a rule fires across all processes (counted with files in `state_dir`).
`trace_dir` makes workers append what they do (init, ready, shard, rendered, fault) as JSON lines,
one file per process, so a test can see which rows were rendered twice and which pid to kill.
`storage` configures `FaultyFileSystem` (see `faulty_fs.py`).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from ..hooks import FAULTS_ENV as ENV
from ..hooks import Hooks, HooksError

EXIT_CODE = 137  # what a SIGKILLed process reports, so an injected death looks like a real one
WORKER_ACTIONS = ("raise", "exit", "hang", "nan", "oom", "slow")
SCOPES = ("batch", "shard")
DRIVER_POINTS = ("before_manifest", "after_manifest")
STORAGE_OPS = ("read", "write", "list", "info", "delete")
_DEFAULT_SECONDS = {"hang": 3600.0, "slow": 1.0}
_COUNTED = tuple(a for a in WORKER_ACTIONS if a != "nan")  # nan marks every matching row, uncounted


class FaultSpecError(HooksError):
    """`COGVIEW_RAY_FAULTS` is malformed; the message names the key."""


@dataclass(frozen=True)
class WorkerRule:
    action: str
    match: str = ""
    scope: str = "batch"
    times: Optional[int] = None
    seconds: float = 0.0  # hang and slow only
    batch_over: int = 0  # oom only


@dataclass(frozen=True)
class DriverRule:
    point: str
    shard: Optional[str] = None
    action: str = "exit"
    times: Optional[int] = None


@dataclass(frozen=True)
class StorageRule:
    """Which filesystem calls fail: see `faulty_fs.StorageFaults`."""

    every: int = 0
    persistent_after: Optional[int] = None
    ops: tuple = STORAGE_OPS
    paths: tuple = ()


@dataclass(frozen=True)
class FaultSpec:
    rules: tuple = ()  # WorkerRule and DriverRule, in the order given (their index names state files)
    state_dir: str = ""
    trace_dir: str = ""
    storage: Optional[StorageRule] = None


# ---------------------------------------------------------------- parsing


def parse_spec(spec: Any) -> FaultSpec:
    """A validated `FaultSpec` from the decoded JSON of `COGVIEW_RAY_FAULTS`."""
    if not isinstance(spec, dict):
        raise FaultSpecError(f"{ENV} must hold a JSON object, not {type(spec).__name__}.")
    _check_keys(spec, ("rules", "state_dir", "trace_dir", "storage"), ENV)
    state_dir = _typed(spec, "state_dir", str, ENV, "")
    trace_dir = _typed(spec, "trace_dir", str, ENV, "")
    raw_rules = _typed(spec, "rules", list, ENV, [])
    rules = tuple(_parse_rule(r, f"{ENV} rules[{i}]") for i, r in enumerate(raw_rules))
    if any(r.times is not None for r in rules) and not state_dir:
        raise FaultSpecError(f"{ENV}: rules with 'times' need a 'state_dir' to count firings in.")
    storage = spec.get("storage")
    return FaultSpec(rules, state_dir, trace_dir, _parse_storage(storage) if storage else None)


@functools.lru_cache(maxsize=8)
def parse_env(raw: str) -> FaultSpec:
    """`parse_spec` of one value of the variable (cached: storage faults look it up per call)."""
    try:
        spec = json.loads(raw)
    except json.JSONDecodeError as e:
        raise FaultSpecError(f"{ENV} is not valid JSON ({e}).") from None
    return parse_spec(spec)


def spec_from_env() -> FaultSpec:
    raw = os.environ.get(ENV)
    return parse_env(raw) if raw else FaultSpec()


def _parse_rule(rule: Any, where: str) -> Union[WorkerRule, DriverRule]:
    if not isinstance(rule, dict):
        raise FaultSpecError(f"{where} must be a JSON object, not {type(rule).__name__}.")
    if "point" in rule:
        _check_keys(rule, ("point", "shard", "action", "times"), where + " (a driver rule)")
        point = _choice(rule, "point", DRIVER_POINTS, where, None)
        action = _choice(rule, "action", ("exit",), where, "exit")
        return DriverRule(point, _typed(rule, "shard", str, where, None), action, _count(rule, "times", where))
    _check_keys(rule, ("match", "action", "scope", "times", "seconds", "batch_over"), where + " (a worker rule)")
    if "action" not in rule:
        raise FaultSpecError(f"{where} has no 'action' (one of {', '.join(WORKER_ACTIONS)}).")
    action = _choice(rule, "action", WORKER_ACTIONS, where, None)
    # a key its action ignores is as likely a mistake as a typo: refuse it too
    for key, actions in (("seconds", ("hang", "slow")), ("batch_over", ("oom",)), ("times", _COUNTED)):
        if key in rule and action not in actions:
            raise FaultSpecError(f"{where}: {key!r} does nothing for action {action!r}.")
    seconds = _typed(rule, "seconds", (int, float), where, _DEFAULT_SECONDS.get(action, 0.0))
    if seconds < 0:
        raise FaultSpecError(f"{where}: 'seconds' must be >= 0, not {seconds!r}.")
    return WorkerRule(action, _typed(rule, "match", str, where, ""), _choice(rule, "scope", SCOPES, where, "batch"),
                      _count(rule, "times", where), float(seconds), _count(rule, "batch_over", where) or 0)


def _parse_storage(storage: Any) -> StorageRule:
    where = f"{ENV} storage"
    if not isinstance(storage, dict):
        raise FaultSpecError(f"{where} must be a JSON object, not {type(storage).__name__}.")
    _check_keys(storage, ("every", "persistent_after", "ops", "paths"), where)
    ops = tuple(_typed(storage, "ops", list, where, list(STORAGE_OPS)))
    bad = [op for op in ops if op not in STORAGE_OPS]
    if bad:
        raise FaultSpecError(f"{where}: 'ops' has {bad[0]!r}, not one of {', '.join(STORAGE_OPS)}.")
    paths = tuple(_typed(storage, "paths", list, where, []))
    if not all(isinstance(p, str) for p in paths):
        raise FaultSpecError(f"{where}: 'paths' must be a list of strings.")
    return StorageRule(_count(storage, "every", where) or 0, _count(storage, "persistent_after", where), ops, paths)


def _check_keys(obj: dict, allowed: Sequence[str], where: str) -> None:
    for key in obj:
        if key not in allowed:
            raise FaultSpecError(f"{where} has unknown key {key!r} (allowed: {', '.join(allowed)}).")


def _typed(obj: dict, key: str, types, where: str, default):
    if key not in obj:
        return default
    value = obj[key]
    if isinstance(value, bool) or not isinstance(value, types):
        kind = {int: "an integer", str: "a string", list: "a list"}.get(types, "a number")
        raise FaultSpecError(f"{where}: {key!r} must be {kind}, not {value!r}.")
    return value


def _count(obj: dict, key: str, where: str) -> Optional[int]:
    value = _typed(obj, key, int, where, None)
    if value is not None and value < 0:
        raise FaultSpecError(f"{where}: {key!r} must be >= 0, not {value!r}.")
    return value


def _choice(obj: dict, key: str, choices: Sequence[str], where: str, default):
    value = obj.get(key, default)
    if value not in choices:
        raise FaultSpecError(f"{where}: {key!r} is {value!r}, not one of {', '.join(choices)}.")
    return value


# ---------------------------------------------------------------- tracing


def write_trace(trace_dir: str, event: str, **fields) -> None:
    """Append one JSON line to this process's trace file (no-op without `trace_dir`)."""
    if not trace_dir:
        return
    line = json.dumps({"event": event, "pid": os.getpid(), "t": time.time(), **fields}, sort_keys=True)
    with open(Path(trace_dir) / f"{os.getpid()}.jsonl", "a") as f:
        f.write(line + "\n")


# ---------------------------------------------------------------- the plan


class FaultPlan(Hooks):
    """Fires the rules of a `FaultSpec` (by default the one in `COGVIEW_RAY_FAULTS`) at the hooks."""

    def __init__(self, spec: Optional[FaultSpec] = None):
        self.spec = spec_from_env() if spec is None else spec
        self.worker_id = ""  # set by worker_started; one RenderWorker per process

    def trace(self, event: str, **fields) -> None:
        write_trace(self.spec.trace_dir, event, **fields)

    # -- worker side ----------------------------------------------------------------------

    def worker_started(self, worker_id: str) -> None:
        self.worker_id = worker_id
        self.trace("init", worker_id=worker_id)

    def worker_ready(self, worker_id: str) -> None:
        self.trace("ready", worker_id=worker_id)

    def wrap_pipeline(self, pipeline):
        matches = [r.match for r in self.spec.rules if isinstance(r, WorkerRule) and r.action == "nan"]
        return NanPipeline(pipeline, matches) if matches else pipeline

    def shard_started(self, shard_id: str, attempt: int) -> None:
        self.trace("shard", worker_id=self.worker_id, shard=shard_id, attempt=attempt)

    def before_shard(self, shard_id: str, rows) -> None:
        self._fire(rows, scope="shard")

    def before_batch(self, rows) -> None:
        self._fire(rows, scope="batch")

    def after_batch(self, rows) -> None:
        self.trace("rendered", worker_id=self.worker_id, rows=[[r.file, r.row_index] for r in rows])

    def _fire(self, rows, scope: str) -> None:
        prompts = [r.prompt or "" for r in rows if r.status == "pending"]
        for i, rule in enumerate(self.spec.rules):
            if not isinstance(rule, WorkerRule) or rule.scope != scope or rule.action == "nan":
                continue  # nan is the pipeline wrapper's
            if not any(rule.match in p for p in prompts):
                continue
            if rule.action == "oom" and len(rows) <= rule.batch_over:
                continue
            if not self._take(i, rule.times):
                continue
            self.trace("fault", action=rule.action, match=rule.match)
            if rule.action == "raise":
                raise RuntimeError(f"injected fault: rendering crashed on a prompt matching {rule.match!r}")
            if rule.action == "exit":
                os._exit(EXIT_CODE)
            if rule.action in ("hang", "slow"):
                time.sleep(rule.seconds)
            if rule.action == "oom":
                import torch

                raise torch.cuda.OutOfMemoryError("injected fault: CUDA out of memory")

    def _take(self, i: int, times: Optional[int]) -> bool:
        """Consume one firing of rule `i` with a `times` cap (atomic across processes)."""
        if times is None:
            return True
        for n in range(times):
            token = Path(self.spec.state_dir) / f"rule{i}-{n}"
            try:
                fd = os.open(token, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                continue
            os.close(fd)
            return True
        return False

    # -- driver side ----------------------------------------------------------------------

    def at_driver(self, point: str, shard_id: str) -> None:
        """A matching `exit` rule kills the driver here."""
        for i, rule in enumerate(self.spec.rules):
            if not isinstance(rule, DriverRule) or rule.point != point:
                continue
            if rule.shard not in (None, shard_id):
                continue
            if self._take(i, rule.times):
                os._exit(EXIT_CODE)


class NanPipeline:
    """A pipeline whose `generate` reports non-finite output for prompts containing any of
    `matches`; everything else is the wrapped pipeline's."""

    def __init__(self, pipeline, matches: Sequence[str]):
        self._pipeline, self._matches = pipeline, tuple(matches)

    def __getattr__(self, name):
        if name == "_pipeline":  # not set yet (copy, unpickle): no endless recursion
            raise AttributeError(name)
        return getattr(self._pipeline, name)

    def generate(self, prompts, *args, **kwargs):
        res = self._pipeline.generate(prompts, *args, **kwargs)
        finite = [ok and not any(m in (p or "") for m in self._matches) for p, ok in zip(prompts, res.finite)]
        return dataclasses.replace(res, finite=finite)
