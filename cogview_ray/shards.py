"""Planning: list the input Parquet files and cut them into row-range shards from their footers,
and pin each file's version (content digest, object version id or ETag) for the workers."""
from __future__ import annotations

import glob as _glob
import posixpath
from dataclasses import dataclass
from typing import Any, Optional

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from cogview_ray.errors import DatasetError, first_line
from cogview_ray.input_version import FileVersion, planned_version

# Footer reads fetch this much from the end of the file in one request; enough for the
# footers of files with thousands of row groups, far less than any prompt data.
FOOTER_BLOCK_BYTES = 64 * 1024
FINGERPRINT_VERSION = 3  # 3: whole-file content digests (2 digested footers only)


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
            version = planned_version(path, fs)
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
