"""Planning: list the input Parquet files and cut them into row-range shards from their footers,
and pin each file's version (content digest, object version id or ETag) for the workers."""
from __future__ import annotations

import glob as _glob
import hashlib
import os
import posixpath
from dataclasses import dataclass
from typing import IO, Any, Optional

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from cogview_ray.errors import DatasetError, first_line

# Footer reads fetch this much from the end of the file in one request; enough for the
# footers of files with thousands of row groups, far less than any prompt data.
FOOTER_BLOCK_BYTES = 64 * 1024
FINGERPRINT_VERSION = 3  # 3: whole-file content digests (2 digested footers only)
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


@dataclass(frozen=True)
class Shard:
    """Rows [row_start, row_stop) of one input file, and the version of that file planned."""

    shard_id: str
    file: str  # path on the dataset's filesystem, as that filesystem names it
    file_index: int
    row_start: int
    row_stop: int
    file_version: Optional[FileVersion] = None  # None: planned before versions were recorded

    @property
    def num_rows(self) -> int:
        return self.row_stop - self.row_start


def shard_id_for(file_index: int, shard_number: int) -> str:
    return f"f{file_index:05d}-{shard_number:06d}"


# ---------------------------------------------------------------- listing


def _list_with_root(uri: str, fs: fsspec.AbstractFileSystem) -> tuple[list[str], str]:
    """The sorted files and the folder they are named relative to in the fingerprint."""
    if _glob.has_magic(uri):
        found = fs.glob(uri, detail=True)
        paths = sorted(p for p, info in found.items() if info.get("type") != "directory")
        if not paths:
            raise DatasetError(f"Dataset glob {uri} matches no files.")
        return paths, _static_prefix(fs._strip_protocol(uri))
    try:
        is_dir = fs.isdir(uri)
        is_file = not is_dir and fs.isfile(uri)
    except OSError as e:
        raise DatasetError(f"Dataset uri {uri} could not be listed ({e}).") from None
    if is_dir:
        root = fs._strip_protocol(uri).rstrip("/")
        paths = sorted(p for p in fs.find(uri) if p.lower().endswith(".parquet"))
        if not paths:
            raise DatasetError(f"Dataset folder {uri} holds no *.parquet files.")
        return paths, root
    if is_file:
        path = fs._strip_protocol(uri)
        return [path], posixpath.dirname(path)
    raise DatasetError(f"Dataset file {uri} does not exist.")


def _static_prefix(pattern: str) -> str:
    """The folder part of a glob before its first wildcard: 'b/data/*/x.parquet' -> 'b/data'."""
    parts = pattern.split("/")
    static = []
    for part in parts[:-1]:
        if _glob.has_magic(part):
            break
        static.append(part)
    return "/".join(static)


def _relative(path: str, root: str) -> str:
    if root and path.startswith(root.rstrip("/") + "/"):
        return path[len(root.rstrip("/")) + 1:]
    return path


# ---------------------------------------------------------------- footers


def read_footer(path: str, fs: fsspec.AbstractFileSystem) -> pq.FileMetaData:
    """The Parquet footer of one file; never its data pages."""
    try:
        with fs.open(path, "rb", block_size=FOOTER_BLOCK_BYTES, cache_type="bytes") as f:
            return pq.ParquetFile(f).metadata
    except FileNotFoundError:
        raise DatasetError(f"Dataset file {path} does not exist.") from None
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DatasetError(f"Dataset file {path} is not a readable Parquet file ({first_line(e)}).") from None


def is_string_type(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def check_schema(path: str, schema: pa.Schema, prompt_column: str, id_column: Optional[str]) -> None:
    """The columns a render needs exist and the prompts are strings (an all-null column is allowed)."""
    if schema.get_field_index(prompt_column) < 0:
        raise DatasetError(f"Dataset file {path} has no prompt column {prompt_column!r}.")
    prompt_type = schema.field(prompt_column).type
    if not (is_string_type(prompt_type) or pa.types.is_null(prompt_type)):
        raise DatasetError(
            f"Dataset file {path} has prompt column {prompt_column!r} of type {prompt_type}, not strings."
        )
    if id_column is not None:
        if schema.get_field_index(id_column) < 0:
            raise DatasetError(f"Dataset file {path} has no id column {id_column!r}.")
        id_type = schema.field(id_column).type
        if not (is_string_type(id_type) or pa.types.is_integer(id_type) or pa.types.is_null(id_type)):
            raise DatasetError(
                f"Dataset file {path} has id column {id_column!r} of type {id_type}, not strings or integers."
            )


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


def check_file_version(shard: Shard, fs: fsspec.AbstractFileSystem) -> None:
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


def open_planned(shard: Shard, fs: fsspec.AbstractFileSystem) -> IO[bytes]:
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


# ---------------------------------------------------------------- planning


def plan_shards(
    dataset_cfg: Any,
    fs: Optional[fsspec.AbstractFileSystem] = None,
    base_path: Optional[str] = None,
) -> tuple[list[Shard], dict]:
    """Shards of at most `shard_size` rows within one file, and a fingerprint of the input.

    `fs` defaults to the filesystem of `dataset.uri`. A relative local uri is taken relative to
    `base_path` when given (else the current directory). Fingerprint paths are relative to the
    dataset root (folder, glob prefix, or the file's folder), so moving the whole dataset or
    the working directory does not change it; sizes, versions and row counts do.
    """
    uri = dataset_cfg.uri
    if fs is None:
        fs, _ = fsspec.core.url_to_fs(uri)
    if base_path is not None and "://" not in uri and not posixpath.isabs(uri):
        uri = posixpath.join(str(base_path), uri)
    shard_size = int(dataset_cfg.shard_size)
    if shard_size < 1:
        raise DatasetError(f"Dataset shard_size must be at least 1, got {shard_size}.")
    limit = dataset_cfg.limit

    paths, root = _list_with_root(uri, fs)
    shards: list[Shard] = []
    files: list[dict] = []
    planned = 0
    for file_index, path in enumerate(paths):
        if limit is not None and planned >= limit:
            break  # files past the limit define nothing; do not even open them
        meta = read_footer(path, fs)
        check_schema(path, meta.schema.to_arrow_schema(), dataset_cfg.prompt_column, dataset_cfg.id_column)
        num_rows = meta.num_rows
        try:
            info = None if _is_local(fs) else _info(path, fs, getattr(fs, "version_aware", False))
            version = file_version(path, fs, info)
        except OSError as e:
            raise DatasetError(f"Dataset file {path} could not be inspected ({e}).") from None
        files.append({
            "path": _relative(path, root),
            "size": version.size,
            **version.identity(),
            "num_rows": num_rows,
        })
        usable = num_rows if limit is None else min(num_rows, limit - planned)
        for number, start in enumerate(range(0, usable, shard_size)):
            stop = min(start + shard_size, usable)
            shards.append(Shard(shard_id_for(file_index, number), path, file_index, start, stop, version))
        planned += usable
        del meta

    fingerprint = {
        "version": FINGERPRINT_VERSION,
        "files": files,
        "num_files": len(files),
        "num_rows": sum(f["num_rows"] for f in files),
        "size_bytes": sum(f["size"] for f in files),
        "planned_rows": planned,
    }
    return shards, fingerprint


def diff_fingerprints(old: dict, new: dict) -> list[str]:
    """Human-readable input changes, one line per file, e.g.
    'part-1.parquet: size 100 -> 120, sha256 1f0c... -> 9ab2...'; empty when equal."""
    if old == new:
        return []
    if old.get("version") != new.get("version"):
        return [f"fingerprint format {old.get('version')} -> {new.get('version')} (the input was "
                f"fingerprinted by another cogview-ray version; start a new run)"]
    before = {f["path"]: f for f in old.get("files", [])}
    after = {f["path"]: f for f in new.get("files", [])}
    lines = []
    for path in sorted(set(before) | set(after)):
        a, b = before.get(path), after.get(path)
        if a is None:
            lines.append(f"{path}: added")
        elif b is None:
            lines.append(f"{path}: removed")
        else:
            changes = [f"{key} {a.get(key)} -> {b.get(key)}"
                       for key in sorted(set(a) | set(b)) if key != "path" and a.get(key) != b.get(key)]
            if changes:
                lines.append(f"{path}: {', '.join(changes)}")
    if not lines:
        for key in sorted(set(old) | set(new)):
            if key != "files" and old.get(key) != new.get(key):
                lines.append(f"{key}: {old.get(key)} -> {new.get(key)}")
    if not lines:  # same files, other order
        lines.append("file order changed")
    return lines
