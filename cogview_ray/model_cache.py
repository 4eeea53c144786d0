"""Node-local model cache: a remote `model.path` (s3://… or any fsspec URL) is downloaded
once per node under a file lock, verified, and reused by every worker on that node."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit, urlunsplit

import fsspec
from filelock import FileLock, Timeout

from . import durable
from .storage import check_relative, secret_values

log = logging.getLogger(__name__)

CACHE_ENV = "COGVIEW_RAY_CACHE"  # the project's cache root; models live in its models/ folder
DEFAULT_CACHE_ROOT = Path("~/.cache/cogview-ray")
MARKER_NAME = ".cogview-ray-complete.json"
MARKER_FORMAT = 1

# Weights as safetensors, configs and tokenizers; pickle weights (.bin/.pt/.ckpt) are never fetched.
ALLOWED_SUFFIXES = (".safetensors", ".json", ".txt", ".model")
CHECKSUM_FILES = ("checksums.sha256", "SHA256SUMS", "sha256sums")
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
_CHUNK_BYTES = 8 * 1024 * 1024


class ModelCacheError(RuntimeError):
    """A remote checkpoint that could not be listed, downloaded or verified."""


class ModelNotFoundError(ModelCacheError, FileNotFoundError):
    """The remote checkpoint URL holds no checkpoint files."""


def ensure_local_model(
    path_or_url: str | os.PathLike,
    storage_options: Mapping[str, Any] | None = None,
    cache_dir: str | os.PathLike | None = None,
    lock_timeout_s: float | None = None,
) -> str:
    """A local folder holding the checkpoint at `path_or_url`.

    A local path is returned unchanged. A remote URL is downloaded into
    `cache_dir/<name>-<hash>` (default: `default_cache_dir()`) the first time any process on
    this node asks for it; the others wait on the entry's file lock and reuse the result.
    `cache_dir` must be on a node-local filesystem (flock is unreliable over NFS).
    Raises ModelNotFoundError for a URL without checkpoint files, ModelCacheError for one
    that cannot be listed, fetched or verified; messages never carry credentials.
    """
    raw = os.fspath(path_or_url)
    protocol = fsspec.utils.get_protocol(raw)
    if protocol in ("file", "local"):
        return raw.split("://", 1)[1] if "://" in raw else raw

    options = dict(storage_options or {})
    url = raw.rstrip("/")
    shown = redact_url(url)
    root = default_cache_dir() if cache_dir is None else Path(os.path.expanduser(cache_dir))
    root.mkdir(parents=True, exist_ok=True)
    name = cache_entry_name(url, options)
    entry = root / name

    with _node_lock(root / f".{name}.lock", shown, lock_timeout_s):
        if entry_is_valid(entry, url):
            log.info("Reusing cached model %s at %s.", shown, entry)
            return str(entry)
        _clear_leftovers(root, name)
        _download(url, options, entry)
        log.info("Cached model %s at %s.", shown, entry)
        return str(entry)


def resolve_model_path(model_path: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """A local checkpoint folder for `model.path`: `preset:NAME` (written once per node), a URL
    (downloaded once per node) or a local folder (used as is)."""
    if model_path.startswith("preset:"):
        return preset_checkpoint(model_path.split(":", 1)[1])
    return ensure_local_model(model_path, storage_options=storage_options)


def preset_checkpoint(name: str) -> str:
    """The random-weight checkpoint of preset `name` (seed 0), written once per node into
    `checkpoints/` under the cache root; the first process writes, the others wait and reuse."""
    from .model.checkpoint import make_checkpoint  # torch loads only when a preset is asked for

    target = cache_root() / "checkpoints" / f"{name}-seed0"
    target.parent.mkdir(parents=True, exist_ok=True)
    with _node_lock(Path(str(target) + ".lock"), f"preset:{name}", None):
        if not (target / ".complete").exists():
            tmp = target.with_name(target.name + ".partial")
            shutil.rmtree(tmp, ignore_errors=True)  # left by a killed writer
            make_checkpoint(name, tmp, seed=0)
            shutil.rmtree(target, ignore_errors=True)
            tmp.rename(target)
            durable.write_file(target / ".complete", b"ok\n")
    return str(target)


class _node_lock:
    """The file lock that makes one process per node build a cache entry while the others wait."""

    def __init__(self, path: Path, shown: str, timeout_s: float | None):
        self.lock, self.shown, self.timeout_s = FileLock(str(path)), shown, timeout_s

    def __enter__(self):
        try:
            self.lock.acquire(timeout=0)
        except Timeout:
            log.info("Waiting for another process on this node to fetch %s.", self.shown)
            try:
                self.lock.acquire(timeout=-1 if self.timeout_s is None else self.timeout_s)
            except Timeout:
                raise ModelCacheError(f"Timed out after {self.timeout_s} s waiting for the cache lock of "
                                      f"{self.shown} in {Path(self.lock.lock_file).parent}.") from None
        return self

    def __exit__(self, *exc) -> None:
        self.lock.release()


def cache_root() -> Path:
    """The project's node-local cache: `$COGVIEW_RAY_CACHE`, else ~/.cache/cogview-ray."""
    return Path(os.path.expanduser(os.environ.get(CACHE_ENV) or DEFAULT_CACHE_ROOT))


def default_cache_dir() -> Path:
    """Where downloaded models live: `models/` under the cache root."""
    return cache_root() / "models"


def cache_entry_name(url: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """`<readable tail>-<16 hex>`: the tail of the URL for people, a hash for uniqueness.

    The hash covers the URL and the endpoint (not credentials), so one bucket path on two
    S3-compatible services gets two entries.
    """
    url = url.rstrip("/")
    endpoint = ((storage_options or {}).get("client_kwargs") or {}).get("endpoint_url") or ""
    digest = hashlib.sha256(f"{url}\n{endpoint}".encode()).hexdigest()[:16]
    last = redact_url(url).split("://", 1)[-1].rsplit("/", 1)[-1]
    tail = re.sub(r"[^A-Za-z0-9._-]+", "_", last).strip("._") or "model"
    return f"{tail[:64]}-{digest}"


def entry_is_valid(entry: Path, url: str) -> bool:
    """Cheap check of a cache entry: its marker exists, names `url`, and every file it lists
    is present with the recorded size (hashes were checked when it was written)."""
    try:
        marker = json.loads((entry / MARKER_NAME).read_text())
        if marker.get("format") != MARKER_FORMAT or marker.get("url") != redact_url(url):
            return False
        files = marker["files"]
        return bool(files) and all(
            (entry / rel).is_file() and (entry / rel).stat().st_size == size for rel, size in files.items()
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def is_wanted(rel_path: str) -> bool:
    """Files worth fetching: safetensors, json, txt, tokenizer `.model`, checksum lists;
    never pickle weights, never hidden files or folders (`.cache/`, `.gitattributes`)."""
    parts = rel_path.split("/")
    if any(p.startswith(".") for p in parts):
        return False
    return parts[-1] in CHECKSUM_FILES or parts[-1].endswith(ALLOWED_SUFFIXES)


def _is_confined(rel: str) -> bool:
    """True for a key tail that names a file strictly inside a folder: no empty, `.` or `..`
    segment, not absolute, no backslash or NUL (see `storage.check_relative`)."""
    try:
        check_relative(rel)
    except ValueError:
        return False
    return True


def redact_url(url: str) -> str:
    """The URL without user info or query string (signed URLs carry credentials there)."""
    parts = urlsplit(url)
    if not parts.scheme:
        return url
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _download(url: str, options: dict, entry: Path) -> None:
    """Fetch into a temp folder next to `entry`, verify, write the marker, rename into place."""
    shown = redact_url(url)
    secrets = set(secret_values(options)) | _url_secrets(url)
    try:
        fs, base = fsspec.core.url_to_fs(url, **options)
        fs.invalidate_cache(base)
        listing = fs.find(base, detail=True, withdirs=False)
    except FileNotFoundError:
        raise ModelNotFoundError(f"No checkpoint found at {shown}.") from None
    except Exception as err:  # noqa: BLE001 - any backend error; re-raised without secrets
        raise ModelCacheError(f"Could not list {shown}: {_describe(err, secrets)}") from None

    prefix = base.rstrip("/") + "/"
    sizes: dict[str, int] = {}
    remote: dict[str, str] = {}
    remote_sha: dict[str, str] = {}
    for path, info in sorted(listing.items()):
        if not path.startswith(prefix) or info.get("type", "file") != "file":
            continue
        rel = path[len(prefix):]
        if not _is_confined(rel):
            # Keys are remote data: `a//b`, `/x`, `../x` would name files outside the entry.
            if rel:
                log.warning("Skipping %s/%s: its key is not a plain relative path, so it could "
                            "land outside the cache entry.", shown, rel)
            continue
        if not is_wanted(rel):
            continue
        size = info.get("size")
        if size is None:
            try:
                size = fs.size(path)
            except Exception as err:  # noqa: BLE001
                raise ModelCacheError(f"Could not stat {shown}/{rel}: {_describe(err, secrets)}") from None
        if size is None:
            raise ModelCacheError(f"{shown}/{rel} reports no size, so its download cannot be verified.")
        sizes[rel], remote[rel] = int(size), path
        digest = (info.get("lfs") or {}).get("sha256") or info.get("sha256")
        if isinstance(digest, str) and _HEX64.match(digest):
            remote_sha[rel] = digest.lower()
    if not sizes:
        raise ModelNotFoundError(
            f"No checkpoint files at {shown} (looked for *{', *'.join(ALLOWED_SUFFIXES)})."
        )
    if not any(rel.endswith(".safetensors") for rel in sizes):
        raise ModelCacheError(f"{shown} has no .safetensors weights (pickle weights are never downloaded).")

    total = sum(sizes.values())
    free = shutil.disk_usage(entry.parent).free
    if free < total:
        raise ModelCacheError(
            f"{shown} needs {total / 1e9:.2f} GB but {entry.parent} has {free / 1e9:.2f} GB free."
        )

    tmp = entry.parent / f".{entry.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        log.info("Downloading %d files (%.2f GB) from %s.", len(sizes), total / 1e9, shown)
        started = time.perf_counter()
        rels = sorted(sizes)
        inside = tmp.resolve()
        for rel in rels:
            if not (tmp / rel).resolve().is_relative_to(inside):  # second line of defence
                raise ModelCacheError(f"{shown}/{rel} would be written outside the cache entry {entry}.")
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        try:
            fs.get([remote[r] for r in rels], [str(tmp / r) for r in rels])
        except Exception as err:  # noqa: BLE001
            raise ModelCacheError(f"Could not download {shown}: {_describe(err, secrets)}") from None
        expected_sha = {**remote_sha, **_declared_sha256(tmp, sizes, shown)}
        _check_index_shards(tmp, sizes, shown)
        _verify(tmp, sizes, expected_sha, shown)
        durable.fsync_tree(tmp, rels)
        marker = {
            "format": MARKER_FORMAT,
            "url": shown,
            "files": sizes,
            "sha256_verified": sorted(expected_sha),
            "downloaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "download_s": round(time.perf_counter() - started, 3),
        }
        durable.write_file(tmp / MARKER_NAME, json.dumps(marker, indent=1, sort_keys=True).encode())
        os.rename(tmp, entry)  # atomic: the entry appears whole, marker included
        durable.fsync_path(entry.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _declared_sha256(folder: Path, sizes: Mapping[str, int], shown: str) -> dict[str, str]:
    """sha256 digests the checkpoint declares: a sha256sum-format list at its root, and a
    `sha256` map (shard file -> digest) in a safetensors index's `metadata`, where present."""
    declared: dict[str, str] = {}
    for name in CHECKSUM_FILES:
        if name not in sizes:
            continue
        for n, line in enumerate((folder / name).read_text().splitlines(), start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            digest, _, rel = line.partition(" ")
            rel = rel.strip().lstrip("*").removeprefix("./")
            if not _HEX64.match(digest) or not rel:
                raise ModelCacheError(f"{shown}/{name} line {n} is not '<sha256>  <path>'.")
            if not is_wanted(rel):
                continue  # e.g. a pickle file we skip
            if rel not in sizes:
                raise ModelCacheError(f"{shown}/{name} lists {rel}, which is missing at {shown}.")
            declared[rel] = digest.lower()
    for index in (r for r in sizes if r.endswith(".safetensors.index.json")):
        meta = _read_json(folder / index, shown, index).get("metadata") or {}
        table = meta.get("sha256") if isinstance(meta, dict) else None
        if isinstance(table, dict):
            folder_rel = index.rsplit("/", 1)[0] + "/" if "/" in index else ""
            for shard, digest in table.items():
                if isinstance(digest, str) and _HEX64.match(digest):
                    declared[folder_rel + shard] = digest.lower()
    return declared


def _check_index_shards(folder: Path, sizes: Mapping[str, int], shown: str) -> None:
    """Every shard a safetensors index names must have been downloaded."""
    for index in (r for r in sizes if r.endswith(".safetensors.index.json")):
        folder_rel = index.rsplit("/", 1)[0] + "/" if "/" in index else ""
        weight_map = _read_json(folder / index, shown, index).get("weight_map") or {}
        missing = sorted({folder_rel + s for s in weight_map.values()} - set(sizes))
        if missing:
            raise ModelCacheError(f"{shown}/{index} names shards missing at {shown}: {', '.join(missing)}.")


def _verify(folder: Path, sizes: Mapping[str, int], sha: Mapping[str, str], shown: str) -> None:
    for rel, size in sizes.items():
        got = (folder / rel).stat().st_size
        if got != size:
            raise ModelCacheError(f"Downloaded {shown}/{rel} has {got} bytes, the remote file {size}.")
    for rel, want in sha.items():
        if rel not in sizes:
            raise ModelCacheError(f"A sha256 is declared for {shown}/{rel}, which is missing.")
        h = hashlib.sha256()
        with open(folder / rel, "rb") as f:
            while chunk := f.read(_CHUNK_BYTES):
                h.update(chunk)
        if h.hexdigest() != want:
            raise ModelCacheError(f"Downloaded {shown}/{rel} has sha256 {h.hexdigest()}, expected {want}.")


def _clear_leftovers(root: Path, name: str) -> None:
    """Remove what a killed download or a damaged entry left behind (the caller holds the lock)."""
    entry = root / name
    if entry.exists() or entry.is_symlink():
        log.warning("Cache entry %s is incomplete or damaged; downloading it again.", entry)
        trash = root / f".{name}.trash-{uuid.uuid4().hex[:8]}"
        os.rename(entry, trash)
        if trash.is_dir() and not trash.is_symlink():
            shutil.rmtree(trash, ignore_errors=True)
        else:
            trash.unlink(missing_ok=True)
    for leftover in root.glob(f".{_glob_escape(name)}.t*-*"):
        if leftover.name.startswith((f".{name}.tmp-", f".{name}.trash-")):
            log.warning("Removing %s left by an interrupted download.", leftover)
            shutil.rmtree(leftover, ignore_errors=True)


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def _read_json(path: Path, shown: str, rel: str) -> dict:
    try:
        data = json.loads(path.read_text())
    except ValueError:
        raise ModelCacheError(f"{shown}/{rel} is not valid JSON.") from None
    return data if isinstance(data, dict) else {}


def _url_secrets(url: str) -> set[str]:
    parts = urlsplit(url)
    found = {parts.query} if len(parts.query) >= 4 else set()
    if "@" in parts.netloc:
        found |= {s for s in parts.netloc.rsplit("@", 1)[0].split(":") if len(s) >= 4}
    return found


def _describe(err: BaseException, secrets: set[str]) -> str:
    text = f"{type(err).__name__}: {err}"
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, "***")
    return text
