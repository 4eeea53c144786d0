"""One run's place in object storage: an fsspec filesystem plus the run prefix, with
path confinement, create-once objects and retries of transient errors."""
from __future__ import annotations

import errno
import json
import logging
import os
import random
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Mapping, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from . import durable
from .errors import ConfigError

log = logging.getLogger(__name__)

T = TypeVar("T")

# Errno values that say "this will fail again": client errors, not infrastructure.
_PERMANENT_ERRNOS = {
    errno.EINVAL, errno.ENOSYS, errno.EPERM, errno.EACCES, errno.ENOENT, errno.EEXIST,
    errno.EISDIR, errno.ENOTDIR, errno.ENAMETOOLONG, errno.EROFS, errno.ENOTEMPTY,
}
# storage_options keys whose string values are credentials (matched as substrings).
_SECRET_HINTS = ("key", "secret", "token", "passw", "credential", "sas", "auth", "sig")
_TMP_DIR = ".tmp"
PROBE_DIR = "_probe"  # prove_create_once's short-lived objects
# The first releases that send `If-None-Match: *` for create-once (see pyproject.toml).
S3FS_CREATE_FLOOR = "2024.12.0"
BOTOCORE_CREATE_FLOOR = "1.35.2"
_WRITE_OPS = ("write", "upload", "create")


class StorageError(Exception):
    """A storage operation that failed for good (after retries, or not retryable)."""


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter: delay_i = min(max, base * 2**i) * U(0.5, 1)."""

    attempts: int = 6
    base_delay_s: float = 0.2
    max_delay_s: float = 10.0

    def delay_s(self, attempt: int) -> float:
        return min(self.max_delay_s, self.base_delay_s * 2**attempt) * random.uniform(0.5, 1.0)


def open_filesystem(uri: str, storage_options: Mapping[str, Any] | None = None):
    """`(fs, path)` for a URI on any fsspec filesystem (path has no protocol prefix)."""
    return fsspec.core.url_to_fs(str(uri), **dict(storage_options or {}))


def is_transient(err: BaseException) -> bool:
    """True for errors worth retrying: timeouts, throttling, 5xx, dropped connections."""
    if isinstance(err, (FileNotFoundError, FileExistsError, PermissionError,
                        IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(err, (TimeoutError, ConnectionError)):
        return True
    if isinstance(err, OSError):
        return err.errno not in _PERMANENT_ERRNOS
    try:  # errors s3fs lets through untranslated once its own retries are spent
        from botocore.exceptions import ConnectionError as BotoConnectionError
        from botocore.exceptions import HTTPClientError
    except ImportError:
        return False
    return isinstance(err, (BotoConnectionError, HTTPClientError))


def check_relative(rel: str, *, allow_empty: bool = False) -> str:
    """Return `rel` if it names something strictly inside a prefix, else raise ValueError.

    Refused: absolute paths, URLs, backslashes, NUL, empty segments, `.` and `..`.
    """
    if not isinstance(rel, str):
        raise ValueError(f"storage path {rel!r} is not a string")
    if rel == "" and allow_empty:
        return rel
    bad = (
        rel == ""
        or rel.startswith("/")
        or "\\" in rel
        or "\x00" in rel
        or "://" in rel
        or any(seg in ("", ".", "..") for seg in rel.split("/"))
    )
    if bad:
        raise ValueError(f"storage path {rel!r} would escape the run prefix or is malformed")
    return rel


def json_bytes(obj: Any) -> bytes:
    """The bytes of every small JSON object a run writes (markers, lock, run files): sorted keys,
    indented, UTF-8, a final newline; the same object always gives the same bytes."""
    return (json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def secret_values(options: Any, hinted: bool = False) -> list[str]:
    """String values in storage_options that sit under a credential-like key."""
    out: list[str] = []
    if isinstance(options, Mapping):
        for k, v in options.items():
            out += secret_values(v, hinted or any(h in str(k).lower() for h in _SECRET_HINTS))
    elif isinstance(options, (list, tuple)):
        for v in options:
            out += secret_values(v, hinted)
    elif isinstance(options, str) and hinted and len(options) >= 4:
        out.append(options)
    return out


class RunStore:
    """Objects of one run under `{uri}/{run_id}`, addressed by paths relative to it.

    Writes are single PUTs (local: temp file + rename), so a reader never sees half an
    object. `create_once` is a conditional PUT on S3 and `O_EXCL`-style link locally;
    `prove_create_once` checks at start that the store really refuses the second create.
    Transient errors are retried per `retry`; anything else raises `StorageError` (or
    `FileNotFoundError` for a missing object) with a message free of credentials.
    """

    def __init__(self, uri: str, run_id: str, storage_options: Mapping[str, Any] | None = None,
                 *, retry: RetryPolicy | None = None):
        if not isinstance(run_id, str) or "/" in run_id:
            raise ValueError(f"run id {run_id!r} must be one path segment")
        check_relative(run_id)
        self._storage_options = dict(storage_options or {})
        self._secrets = sorted(set(secret_values(self._storage_options)), key=len, reverse=True)
        self.fs, base = open_filesystem(uri, self._storage_options)
        self.uri = str(uri).rstrip("/")
        self.run_id = run_id
        self.root = f"{base.rstrip('/')}/{run_id}"
        self.retry = retry or RetryPolicy()
        self._local = isinstance(self.fs, LocalFileSystem)

    @classmethod
    def from_run_uri(cls, run_uri: str, storage_options: Mapping[str, Any] | None = None,
                     **kwargs) -> "RunStore":
        """A store for `{uri}/{run_id}` given as one URI (what `cogview-ray verify` takes)."""
        parent, _, run_id = str(run_uri).rstrip("/").rpartition("/")
        if not parent or parent.endswith(":/") or parent.endswith(":"):
            raise ConfigError(f"Run URI {run_uri!r} has no run id after its bucket or folder.")
        return cls(parent, run_id, storage_options, **kwargs)

    def __repr__(self) -> str:
        return f"RunStore({self.url()!r})"

    def __getstate__(self):
        # Picklable for Ray; the filesystem is rebuilt from the options on arrival.
        state = self.__dict__.copy()
        state["fs"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.fs, _ = open_filesystem(self.uri, self._storage_options)

    # --- paths -------------------------------------------------------------------
    def path(self, rel: str, *, allow_root: bool = False) -> str:
        """Filesystem path (no protocol) of `rel`; refuses paths that leave the prefix.
        `rel=""` names the run prefix itself, and only with `allow_root`."""
        check_relative(rel, allow_empty=allow_root)
        return f"{self.root}/{rel}" if rel else self.root

    def url(self, rel: str = "") -> str:
        """Display form of `rel`: `s3://bucket/run/rel` or a local path. No credentials."""
        p = self.path(rel, allow_root=True)
        if self._local:
            return p
        proto = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        return f"{proto}://{p}"

    # --- operations --------------------------------------------------------------
    def write(self, rel: str, data: bytes) -> None:
        """Put `data` at `rel` (overwrite) in one PUT."""
        data = bytes(data)
        self._retry("write", rel, lambda: self._put(self.path(rel), data, exclusive=False))

    def upload(self, rel: str, local_path: str) -> None:
        """Put a local file's bytes at `rel` (overwrite); for shard containers."""
        def op():
            dest = self.path(rel)
            if self._local:
                durable.place(lambda tmp: self.fs.put_file(local_path, tmp), self._tmp_path(), dest,
                              exclusive=False)
            else:
                self.fs.put_file(local_path, dest)
        self._retry("upload", rel, op)

    def create_once(self, rel: str, data: bytes) -> bool:
        """Create `rel` with `data` unless it exists; True if this call created it.

        Also True when `rel` already holds exactly `data`: a conditional PUT whose response
        was lost may have landed (and s3fs retries it internally, getting 412 for its own
        first write), so on every "already exists" the object is read back and compared.
        Callers must therefore make `data` unique to themselves (a uuid, a lock id) wherever
        another writer could race with equal bytes.
        """
        data = bytes(data)
        dest = self.path(rel)

        def op() -> bool:
            try:
                self._put(dest, data, exclusive=True)
                return True
            except FileExistsError:
                return self._holds(dest, data)

        return self._retry("create", rel, op)

    def prove_create_once(self) -> None:
        """Refuse a store that silently overwrites on create-once (StorageError).

        Creates a probe object twice with different bytes; the second create must be refused
        and the first bytes must survive. S3-compatible stores that ignore `If-None-Match`,
        and s3fs/botocore releases that drop it, fail here instead of double-committing later.
        The probe is removed afterwards.
        """
        token = uuid.uuid4().hex
        rel = f"{PROBE_DIR}/{token}"
        first, second = f"probe {token} first".encode(), f"probe {token} second".encode()
        try:
            if not self.create_once(rel, first):
                raise StorageError(f"storage {self._display(rel)} existed before its create-once probe, "
                                   f"so create-once on {self.url()} cannot be proven")
            overwritten = self.create_once(rel, second) or self.read(rel) != first
            if overwritten:
                raise StorageError(self._scrub(
                    f"Storage {self.url()} ignores conditional writes (If-None-Match): a second "
                    f"create-once of one object overwrote it, so exactly-once cannot be guaranteed "
                    f"there (s3fs>={S3FS_CREATE_FLOOR} with botocore>={BOTOCORE_CREATE_FLOOR} "
                    f"sends the condition; the store must honour it)."))
        finally:
            self._drop_probe(rel)

    def read(self, rel: str) -> bytes:
        return self._retry("read", rel, lambda: self.fs.cat_file(self.path(rel)))

    def exists(self, rel: str) -> bool:
        return self._retry("check", rel, lambda: self.fs.exists(self.path(rel)))

    def list(self, rel_dir: str = "") -> list[str]:
        """Sorted names directly inside `rel_dir` (files and folders); [] if absent."""
        base = self.path(rel_dir, allow_root=True)

        def op():
            try:
                entries = self.fs.ls(base, detail=False)
            except FileNotFoundError:
                return []
            names = {str(e).rstrip("/").rsplit("/", 1)[-1]
                     for e in entries if str(e).rstrip("/") != base}
            names.discard(_TMP_DIR)
            return sorted(n for n in names if n)

        return self._retry("list", rel_dir or ".", op)

    def find(self, rel_dir: str) -> list[str]:
        """Every object below `rel_dir`, as paths relative to the run prefix (one paginated
        listing on object stores, not one per folder)."""
        base = self.path(rel_dir, allow_root=True).rstrip("/")

        def op():
            try:
                found = self.fs.find(base)
            except FileNotFoundError:
                return []
            root = self.path("", allow_root=True).rstrip("/") + "/"
            return sorted(str(p)[len(root):] for p in found if str(p).startswith(root)
                          and f"/{_TMP_DIR}/" not in f"/{str(p)[len(root):]}")
        return self._retry("list", rel_dir, op)

    def delete(self, rel: str) -> None:
        """Remove `rel`; a missing object is not an error."""
        def op():
            try:
                self.fs.rm_file(self.path(rel))
            except FileNotFoundError:
                pass
        self._retry("delete", rel, op)

    def invalidate(self) -> None:
        """Drop cached listings (s3fs caches them) before a resume scan."""
        self.fs.invalidate_cache()

    def modified(self, rel: str) -> float:
        """When the store last wrote `rel` (POSIX seconds on the store's clock: S3 LastModified,
        local mtime); FileNotFoundError if absent. Asked of the store itself, never a cached listing."""
        def op() -> float:
            path = self.path(rel)
            self.fs.invalidate_cache(path)  # s3fs would answer from a listing made earlier
            info = self.fs.info(path)
            stamp = next((info[k] for k in ("LastModified", "mtime", "last_modified", "updated")
                          if info.get(k) not in (None, "")), None)
            if stamp is None:
                stamp = self.fs.modified(path)
            return stamp.timestamp() if hasattr(stamp, "timestamp") else float(stamp)
        return self._retry("check", rel, op)

    def now(self) -> float:
        """The store's clock: the modification time of a probe object written (and removed) now,
        so that ages of objects are judged without trusting this host's clock."""
        rel = f"{PROBE_DIR}/clock-{uuid.uuid4().hex}"
        try:
            self.write(rel, b"clock probe\n")
            return self.modified(rel)
        finally:
            self._drop_probe(rel)

    # --- internals ---------------------------------------------------------------

    def _drop_probe(self, rel: str) -> None:
        self.delete(rel)
        if self._local:  # leave no empty probe folder in the run listing
            try:
                os.rmdir(self.path(PROBE_DIR))
            except OSError:
                pass
    def _tmp_path(self) -> str:
        return f"{self.root}/{_TMP_DIR}/{uuid.uuid4().hex}"

    def _put(self, dest: str, data: bytes, *, exclusive: bool) -> None:
        if not self._local:
            if exclusive:
                self.fs.pipe_file(dest, data, mode="create")
            else:
                self.fs.pipe_file(dest, data)
            return
        # Local: write a temp file, then rename (overwrite) or hard-link (exclusive);
        # both are atomic, so no reader ever sees a partial object. The temp file is
        # fsynced before the link or rename and the folder after it, so an object that
        # counts (a commit marker, the lock) survives a power cut with its bytes.
        durable.place(lambda tmp: self.fs.pipe_file(tmp, data), self._tmp_path(), dest, exclusive=exclusive)

    def _holds(self, dest: str, data: bytes) -> bool:
        """True if `dest` exists with exactly `data` (a missing object holds nothing)."""
        try:
            return self.fs.cat_file(dest) == data
        except FileNotFoundError:
            return False

    def _scrub(self, text: str) -> str:
        for s in self._secrets:
            text = text.replace(s, "***")
        return text

    def _retry(self, op_name: str, rel: str, fn: Callable[[], T]) -> T:
        attempts = max(1, self.retry.attempts)
        for i in range(attempts):
            try:
                return fn()
            except ValueError:
                raise
            except FileNotFoundError:
                if op_name in _WRITE_OPS:  # a PUT cannot miss its object: the bucket is missing
                    raise StorageError(f"storage {op_name} of {self._display(rel)} failed (not retryable): "
                                       f"its bucket or folder does not exist") from None
                raise FileNotFoundError(f"no object at {self._display(rel)}") from None
            except Exception as err:  # noqa: BLE001 - classified just below
                transient = is_transient(err)
                if transient and i + 1 < attempts:
                    delay = self.retry.delay_s(i)
                    log.warning("storage %s of %s failed (%s); retry %d/%d in %.2fs",
                                op_name, self._display(rel), type(err).__name__,
                                i + 1, attempts - 1, delay)
                    time.sleep(delay)
                    continue
                detail = self._scrub(str(err))[:300]
                how = f"after {attempts} attempts" if transient else "(not retryable)"
                # `from None`: the chained error could carry request details; keep it out.
                raise StorageError(
                    f"storage {op_name} of {self._display(rel)} failed {how}: "
                    f"{type(err).__name__}: {detail}"
                ) from None
        raise AssertionError("unreachable")

    def _display(self, rel: str) -> str:
        try:
            return self.url("" if rel == "." else rel)
        except ValueError:
            return repr(rel)
