"""Fault injection for tests and chaos drills; inert unless `COGVIEW_RAY_FAULTS` is set.

The variable holds JSON, read by the driver and forwarded to every worker:

    {"rules": [{"match": "POISON", "action": "raise", "times": 2}],
     "state_dir": "/tmp/x", "trace_dir": "/tmp/t",
     "storage": {"every": 3}}

Worker rules fire for a batch (`scope: batch`, the default) or a shard (`scope: shard`) holding
a prompt that contains `match`. Actions: raise (an exception while rendering), exit (the worker
process dies at once), hang (sleeps `seconds`, default far past any timeout), nan (the row's
output is non-finite), oom (device out of memory for batches larger than `batch_over`), slow
(sleeps `seconds` before each batch).

Driver rules have a `point` instead of `match`: `before_manifest` (a shard's images are
written, its manifest part is not) or `after_manifest` (the part is written, the marker is
not); `shard` limits them to one shard id. Their action is `exit`: the driver dies at once.

`times` caps how often a rule fires across all processes (counted with files in `state_dir`).
`trace_dir` makes workers append what they do (start, shard, rows rendered) as JSON lines, one
file per process, so a test can see which rows were rendered twice and which pid to kill.
`storage` configures `FaultyFileSystem` (protocol `faulty://`, a local folder behind a wrapper
with object-store semantics) to fail operations: see `StorageFaults`.
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import fsspec
from fsspec.implementations.local import LocalFileSystem
from fsspec.spec import AbstractFileSystem

ENV = "COGVIEW_RAY_FAULTS"
EXIT_CODE = 137  # what a SIGKILLed process reports, so an injected death looks like a real one


def _spec() -> dict:
    raw = os.environ.get(ENV)
    if not raw:
        return {}
    spec = json.loads(raw)
    if not isinstance(spec, dict):
        raise ValueError(f"{ENV} must hold a JSON object")
    return spec


@dataclass
class FaultPlan:
    rules: list = field(default_factory=list)
    state_dir: str = ""
    trace_dir: str = ""

    @classmethod
    def from_env(cls) -> "FaultPlan":
        spec = _spec()
        plan = cls(spec.get("rules", []), spec.get("state_dir", ""), spec.get("trace_dir", ""))
        if any(r.get("times") is not None for r in plan.rules) and not plan.state_dir:
            raise ValueError(f"{ENV}: rules with 'times' need a 'state_dir' to count firings in")
        return plan

    # -- observation ----------------------------------------------------------------------

    def trace(self, event: str, **fields) -> None:
        """Append one JSON line to this process's trace file (no-op without `trace_dir`)."""
        if not self.trace_dir:
            return
        line = json.dumps({"event": event, "pid": os.getpid(), "t": time.time(), **fields}, sort_keys=True)
        with open(Path(self.trace_dir) / f"{os.getpid()}.jsonl", "a") as f:
            f.write(line + "\n")

    # -- worker side ----------------------------------------------------------------------

    def _hits(self, rows) -> list[dict]:
        prompts = [r.prompt or "" for r in rows if r.status == "pending"]
        return [rule for rule in self.rules
                if "point" not in rule and any(rule.get("match", "") in p for p in prompts)]

    def _take(self, i: int, rule: dict) -> bool:
        """Consume one firing of a rule with a `times` cap (atomic across processes)."""
        times = rule.get("times")
        if times is None:
            return True
        for n in range(int(times)):
            token = Path(self.state_dir) / f"rule{i}-{n}"
            try:
                fd = os.open(token, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                continue
            os.close(fd)
            return True
        return False

    def before_shard(self, rows) -> None:
        self._fire(rows, scope="shard")

    def before_batch(self, rows) -> None:
        self._fire(rows, scope="batch")

    def _fire(self, rows, scope: str) -> None:
        hits = self._hits(rows)
        for i, rule in enumerate(self.rules):
            if rule.get("scope", "batch") != scope or rule not in hits:
                continue
            action = rule.get("action")
            if action == "oom" and len(rows) <= int(rule.get("batch_over", 0)):
                continue
            if action in ("nan",) or not self._take(i, rule):
                continue
            self.trace("fault", action=action, match=rule.get("match", ""))
            if action == "raise":
                raise RuntimeError(f"injected fault: rendering crashed on a prompt matching {rule['match']!r}")
            if action == "exit":
                os._exit(EXIT_CODE)
            if action == "hang":
                time.sleep(float(rule.get("seconds", 3600)))
            if action == "slow":
                time.sleep(float(rule.get("seconds", 1)))
            if action == "oom":
                import torch

                raise torch.cuda.OutOfMemoryError("injected fault: CUDA out of memory")

    def finite(self, rows, finite: list[bool]) -> list[bool]:
        """Mark rows matching a `nan` rule as non-finite output."""
        nan_matches = [r.get("match", "") for r in self.rules if r.get("action") == "nan" and "point" not in r]
        return [ok and not any(m in (row.prompt or "") for m in nan_matches) for row, ok in zip(rows, finite)]

    # -- driver side ----------------------------------------------------------------------

    def at_driver(self, point: str, shard_id: str) -> None:
        """The driver reached `point` for `shard_id`; a matching `exit` rule kills it here."""
        for i, rule in enumerate(self.rules):
            if rule.get("point") != point or rule.get("shard", shard_id) != shard_id:
                continue
            if rule.get("action", "exit") == "exit" and self._take(i, rule):
                os._exit(EXIT_CODE)


# ---------------------------------------------------------------- storage faults


class StorageFaults:
    """Which filesystem calls fail, from the `storage` entry of `COGVIEW_RAY_FAULTS`.

    Keys: `every` (transient: every Nth matching call of each operation fails, so a retry
    succeeds), `persistent_after` (after N matching calls succeeded, every one fails),
    `ops` (subset of read, write, list, info, delete; default all), `paths` (substrings of
    the path; default all). Transient errors rotate through a timeout, throttling (a
    connection error) and EIO; every other failing write lands before its error, as when a
    PUT succeeds and the response is lost. Counters are per process.
    """

    OPS = ("read", "write", "list", "info", "delete")
    _lock = threading.Lock()
    _state: dict = {}  # raw env value -> {"calls": {op: n}, "matched": n}

    @classmethod
    def check(cls, op: str, path: str) -> bool:
        """Raise now if this call fails before doing anything; True if it must fail after
        doing its work (a write that lands); False to go ahead normally."""
        raw = os.environ.get(ENV)
        if not raw:
            return False
        spec = json.loads(raw).get("storage")
        if not spec:
            return False
        if op not in spec.get("ops", cls.OPS):
            return False
        paths = spec.get("paths")
        if paths and not any(p in path for p in paths):
            return False
        with cls._lock:
            state = cls._state.setdefault(raw, {"calls": {}, "matched": 0})
            state["matched"] += 1
            n = state["calls"][op] = state["calls"].get(op, 0) + 1
            persistent = spec.get("persistent_after")
            if persistent is not None and state["matched"] > int(persistent):
                cls._record(spec, op, path, "persistent")
                raise OSError(errno.EIO, f"injected persistent storage failure on {op}")
            every = int(spec.get("every") or 0)
            if not every or n % every:
                return False
            kind = (n // every) % 3
        cls._record(spec, op, path, "transient")
        if op == "write" and (n // every) % 2:
            return True
        raise _transient_error(kind, op)

    @staticmethod
    def _record(spec: dict, op: str, path: str, kind: str) -> None:
        trace_dir = json.loads(os.environ.get(ENV, "{}")).get("trace_dir")
        if trace_dir:
            FaultPlan(trace_dir=trace_dir).trace("storage_fault", op=op, path=path, kind=kind)


def _transient_error(kind: int, op: str) -> Exception:
    if kind == 0:
        return TimeoutError(f"injected: {op} timed out")
    if kind == 1:
        return ConnectionError(f"injected: SlowDown, please reduce your request rate ({op})")
    return OSError(errno.EIO, f"injected: I/O error on {op}")


class FaultyFileSystem(AbstractFileSystem):
    """A local folder behind `faulty://`, with object-store semantics (atomic PUTs, exclusive
    create, no rename) and the failures `StorageFaults` asks for. Instantiated per process,
    like every fsspec filesystem, so the faults reach the driver and every worker."""

    protocol = "faulty"
    root_marker = "/"
    cachable = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.local = LocalFileSystem()

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        if path.startswith("faulty://"):
            path = path[len("faulty://"):]
        return LocalFileSystem._strip_protocol(path)

    def _fail(self, op: str, path: str) -> bool:
        return StorageFaults.check(op, str(path))

    def _landed(self, op: str) -> None:
        raise TimeoutError(f"injected: {op} timed out after the object was stored")

    # reads
    def ls(self, path, detail=True, **kwargs):
        path = self._strip_protocol(path)
        self._fail("list", path)
        return self.local.ls(path, detail=detail)

    def info(self, path, **kwargs):
        path = self._strip_protocol(path)
        self._fail("info", path)
        return self.local.info(path)

    def exists(self, path, **kwargs):
        # not the base class's (which turns every error into False): a transient error is raised
        path = self._strip_protocol(path)
        self._fail("info", path)
        return self.local.exists(path)

    def cat_file(self, path, start=None, end=None, **kwargs):
        path = self._strip_protocol(path)
        self._fail("read", path)
        return self.local.cat_file(path, start=start, end=end)

    def _open(self, path, mode="rb", **kwargs):
        path = self._strip_protocol(path)
        self._fail("read" if "r" in mode else "write", path)
        if "r" not in mode:
            self.local.makedirs(self.local._parent(path), exist_ok=True)
        return self.local._open(path, mode=mode, **kwargs)

    # writes: a temp file beside the target, then link (create) or replace (overwrite)
    def pipe_file(self, path, value, mode="overwrite", **kwargs):
        path = self._strip_protocol(path)
        landed = self._fail("write", path)
        self._store(path, lambda tmp: Path(tmp).write_bytes(bytes(value)), exclusive=mode == "create")
        if landed:
            self._landed("write")

    def put_file(self, lpath, rpath, callback=None, mode="overwrite", **kwargs):
        rpath = self._strip_protocol(rpath)
        landed = self._fail("write", rpath)
        self._store(rpath, lambda tmp: shutil.copyfile(lpath, tmp), exclusive=mode == "create")
        if landed:
            self._landed("write")

    def _store(self, path: str, fill, exclusive: bool) -> None:
        parent = os.path.dirname(path)
        os.makedirs(parent, exist_ok=True)
        tmp = os.path.join(parent, f".~faulty-{uuid.uuid4().hex}")
        try:
            fill(tmp)
            if exclusive:
                os.link(tmp, path)  # FileExistsError if present, like a conditional PUT
            else:
                os.replace(tmp, path)
        finally:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass

    def rm_file(self, path, **kwargs):
        path = self._strip_protocol(path)
        self._fail("delete", path)
        self.local.rm_file(path)

    def _rm(self, path):
        self.rm_file(path)

    def rm(self, path, recursive=False, maxdepth=None):
        self.local.rm(self._strip_protocol(path), recursive=recursive, maxdepth=maxdepth)

    def mkdir(self, path, create_parents=True, **kwargs):
        self.local.mkdir(self._strip_protocol(path), create_parents=create_parents, **kwargs)

    def makedirs(self, path, exist_ok=False):
        self.local.makedirs(self._strip_protocol(path), exist_ok=exist_ok)

    def modified(self, path):
        return self.local.modified(self._strip_protocol(path))

    def invalidate_cache(self, path=None):
        pass


fsspec.register_implementation(FaultyFileSystem.protocol, FaultyFileSystem, clobber=True)
