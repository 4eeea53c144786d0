"""`faulty://`: a local folder behind an fsspec filesystem with object-store semantics that fails
the calls the `storage` entry of `COGVIEW_RAY_FAULTS` asks for (registered by `cogview_ray.testing`)."""
from __future__ import annotations

import errno
import os
import shutil
import threading
import uuid
from pathlib import Path

from fsspec.implementations.local import LocalFileSystem
from fsspec.spec import AbstractFileSystem

from .faults import ENV, parse_env, write_trace


class StorageFaults:
    """Which filesystem calls fail, from the `storage` entry of `COGVIEW_RAY_FAULTS`.

    Keys: `every` (transient: every Nth matching call of each operation fails, so a retry
    succeeds), `persistent_after` (after N matching calls succeeded, every one fails),
    `ops` (subset of read, write, list, info, delete; default all), `paths` (substrings of
    the path; default all). Transient errors rotate through a timeout, throttling (a
    connection error) and EIO; every other failing write lands before its error, as when a
    PUT succeeds and the response is lost. Counters are per process and per value of the
    variable, which is read at every call (tests change it between runs in one process).
    """

    _lock = threading.Lock()
    _state: dict = {}  # raw env value -> {"calls": {op: n}, "matched": n}

    @classmethod
    def check(cls, op: str, path: str) -> bool:
        """Raise now if this call fails before doing anything; True if it must fail after
        doing its work (a write that lands); False to go ahead normally."""
        raw = os.environ.get(ENV)
        if not raw:
            return False
        spec = parse_env(raw)
        rule = spec.storage
        if rule is None or op not in rule.ops:
            return False
        if rule.paths and not any(p in path for p in rule.paths):
            return False
        with cls._lock:
            state = cls._state.setdefault(raw, {"calls": {}, "matched": 0})
            state["matched"] += 1
            n = state["calls"][op] = state["calls"].get(op, 0) + 1
            if rule.persistent_after is not None and state["matched"] > rule.persistent_after:
                write_trace(spec.trace_dir, "storage_fault", op=op, path=path, kind="persistent")
                raise OSError(errno.EIO, f"injected persistent storage failure on {op}")
            if not rule.every or n % rule.every:
                return False
            kind = (n // rule.every) % 3
        write_trace(spec.trace_dir, "storage_fault", op=op, path=path, kind="transient")
        if op == "write" and (n // rule.every) % 2:
            return True
        raise _transient_error(kind, op)


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

