"""Input file versions: what pins one planned Parquet file (content digest, object version id or
ETag), and opening exactly that version in a worker, or failing with `input_changed`."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Optional

import fsspec
from fsspec.implementations.local import LocalFileSystem

from cogview_ray.errors import DatasetError

if TYPE_CHECKING:
    from cogview_ray.shards import Shard

# Content digests stream the file through this buffer: bounded memory, few syscalls.
_DIGEST_CHUNK_BYTES = 256 * 1024
_DIGEST_CACHE_MAX = 65536


class InputChanged(DatasetError):
    """The file a worker is about to read is not the version that was planned."""

    reason = "input_changed"


@dataclass(frozen=True)
class FileVersion:
    """What identifies one planned input file: its size and a whole-file sha256 (local and
    other plain filesystems), or the object version id and/or ETag (object stores)."""

    size: int
    sha256: Optional[str] = None
    version_id: Optional[str] = None
    etag: Optional[str] = None

    @property
    def key(self) -> str:
        """The field that identifies the content: sha256, else version_id, else etag."""
        return "sha256" if self.sha256 else "version_id" if self.version_id else "etag"

    def identity(self) -> dict:
        """The fingerprint field besides the size: {'sha256': ...}, {'version_id': ...} or {'etag': ...}."""
        return {self.key: getattr(self, self.key)}


def file_version(path: str, fs: fsspec.AbstractFileSystem, info: Optional[dict] = None) -> FileVersion:
    """The version of one input file: version id, else ETag, as the store reports them (no
    data read); else a sha256 of the whole file, streamed (cached per process for local
    files by path, size and mtime, so a planner reads each file once).

    Never the modification time alone: `ray job submit --working-dir` unpacks files with
    fresh mtimes, and an in-place edit of equal size can keep the footer unchanged.
    """
    if _is_local(fs):
        size, digest, _ = _local_sha256(fs._strip_protocol(path))
        return FileVersion(size, sha256=digest)
    if info is None:
        info = fs.info(path)
    size = int(info.get("size") or 0)
    version_id = info.get("VersionId") or info.get("version_id")
    if version_id == "null":  # S3's name for "written while versioning was off"
        version_id = None
    etag = info.get("ETag") or info.get("etag")
    if version_id or etag:
        return FileVersion(size, version_id=version_id and str(version_id),
                           etag=etag and str(etag).strip('"'))
    with fs.open(path, "rb") as f:
        return FileVersion(size, sha256=_sha256_stream(f))


def planned_version(path: str, fs: fsspec.AbstractFileSystem) -> FileVersion:
    """The version a planner pins for `path` (with the object version id where `fs` keeps them)."""
    info = None if _is_local(fs) else _info(path, fs, getattr(fs, "version_aware", False))
    return file_version(path, fs, info)


def check_file_version(shard: "Shard", fs: fsspec.AbstractFileSystem) -> None:
    """Raise InputChanged unless the file at `shard.file` is still the planned version.

    Local files: size and content digest (cached per process by path, size, mtime).
    Object stores: version id or ETag from a fresh `fs.info`. Use `open_planned` to read:
    where the store keeps versions it opens the planned one even after an overwrite.
    """
    planned = shard.file_version
    if planned is None:
        return
    try:
        if _is_local(fs):
            size, digest, _ = _local_sha256(fs._strip_protocol(shard.file))
            now = FileVersion(size, sha256=digest)
        else:
            fs.invalidate_cache(shard.file)  # a cached listing would show the planned version
            now = file_version(shard.file, fs, _info(shard.file, fs, bool(planned.version_id)))
    except FileNotFoundError:
        raise _gone(shard.file) from None
    _refuse_mismatch(shard.file, planned, now)


def open_planned(shard: "Shard", fs: fsspec.AbstractFileSystem) -> IO[bytes]:
    """Open `shard.file` for reading at exactly its planned version, or raise InputChanged.

    S3 with a version id: that object version (through a version-aware twin of `fs`).
    S3 with an ETag: the object is opened fresh and must carry the planned ETag; s3fs then
    sends every ranged read with `If-Match` on it, so a later overwrite fails the read
    instead of mixing versions. Local: the opened file's inode is the one whose digest
    matched. Other filesystems: checked, then opened.
    """
    path, planned = shard.file, shard.file_version
    if planned is None:
        return fs.open(path, "rb")
    if planned.version_id:
        try:
            return _version_aware(fs).open(path, "rb", version_id=planned.version_id)
        except FileNotFoundError:
            raise InputChanged(f"Dataset file {path} version {planned.version_id} planned for this run "
                               f"no longer exists.") from None
    if _is_local(fs):
        try:
            f = fs.open(path, "rb")
        except FileNotFoundError:
            raise _gone(path) from None
        try:
            opened = _stat_key(os.fstat(f.fileno()))
            size, digest, checked = _local_sha256(fs._strip_protocol(path))
            if opened != checked:  # the path was replaced or rewritten after our open
                raise InputChanged(f"Dataset file {path} changed while it was being opened, after "
                                   f"the run was planned; restore it or start a new run.")
            _refuse_mismatch(path, planned, FileVersion(size, sha256=digest))
        except FileNotFoundError:
            f.close()
            raise _gone(path) from None
        except BaseException:
            f.close()
            raise
        return f
    if planned.etag:
        fs.invalidate_cache(path)
        try:
            f = fs.open(path, "rb")
        except FileNotFoundError:
            raise _gone(path) from None
        etag = (getattr(f, "details", None) or {}).get("ETag")
        if etag is not None:
            try:
                _refuse_mismatch(path, planned, FileVersion(int(f.details.get("size") or 0),
                                                            etag=str(etag).strip('"')))
            except BaseException:
                f.close()
                raise
            return f
        f.close()
    check_file_version(shard, fs)
    return fs.open(path, "rb")


def _refuse_mismatch(path: str, planned: FileVersion, now: FileVersion) -> None:
    """InputChanged if `now` differs from `planned` in size or in the planned identity field."""
    key = planned.key
    changes = [f"{name} {old} -> {new}" for name, old, new in (
        ("size", planned.size, now.size), (key, getattr(planned, key), getattr(now, key))) if old != new]
    if changes:
        raise InputChanged(f"Dataset file {path} changed since the run was planned ({', '.join(changes)}); "
                           f"restore it or start a new run.")


def _gone(path: str) -> InputChanged:
    return InputChanged(f"Dataset file {path} no longer exists; it was planned for this run.")


def _info(path: str, fs: fsspec.AbstractFileSystem, want_version_id: bool) -> dict:
    info = fs.info(path)
    if want_version_id and not info.get("VersionId"):
        info = fs.info(path, refresh=True)  # s3fs: HEAD the object; listings carry no version ids
    return info


def _version_aware(fs: fsspec.AbstractFileSystem) -> fsspec.AbstractFileSystem:
    """`fs` itself if it can open object versions, else its twin that can (s3fs needs
    `version_aware=True` to accept `version_id=`)."""
    if getattr(fs, "version_aware", True):
        return fs
    return type(fs)(**{**fs.storage_options, "version_aware": True})


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def _stat_key(st: os.stat_result) -> tuple:
    return (st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)


# (path, size, mtime_ns, inode, device) -> sha256 of a local file, for this process.
_LOCAL_DIGESTS: dict[tuple, str] = {}


def _local_sha256(path: str) -> tuple[int, str, tuple]:
    """(size, sha256, stat key) of a local file; read once per process per (path, size, mtime)."""
    key = _stat_key(os.stat(path))
    cached = _LOCAL_DIGESTS.get((path, *key))
    if cached is not None:
        return key[0], cached, key
    with open(path, "rb", buffering=0) as f:
        before = _stat_key(os.fstat(f.fileno()))
        digest = _sha256_stream(f)
        after = _stat_key(os.fstat(f.fileno()))
    if before != after:  # InputChanged is a DatasetError: a planner reports it the same way
        raise InputChanged(f"Dataset file {path} changed while it was being read; "
                           f"wait until it is written completely.")
    if len(_LOCAL_DIGESTS) >= _DIGEST_CACHE_MAX:
        _LOCAL_DIGESTS.pop(next(iter(_LOCAL_DIGESTS)))
    _LOCAL_DIGESTS[(path, *after)] = digest
    return after[0], digest, after


def _sha256_stream(f) -> str:
    """sha256 of everything left in a binary file, read through one reused buffer."""
    h = hashlib.sha256()
    buf = bytearray(_DIGEST_CHUNK_BYTES)
    view = memoryview(buf)
    readinto = getattr(f, "readinto", None)
    while True:
        if readinto is not None:
            n = readinto(buf)
            if not n:
                break
            h.update(view[:n])
        else:
            chunk = f.read(_DIGEST_CHUNK_BYTES)
            if not chunk:
                break
            h.update(chunk)
    return h.hexdigest()
