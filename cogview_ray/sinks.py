"""Image writers: one small protocol (`add`, `close`) and three layouts (files, a
webdataset tar per shard, a Parquet file per shard), all byte-deterministic.

Output keys are relative to the run prefix. `files` keys are object paths
(`images/{shard}/{key}.{ext}`); container keys are locators `{container}#{member}`
(`shards/{shard}.tar#{key}.png`, `shards/{shard}.parquet#{key}.png`): the member is the
tar member name, or for Parquet the row whose `member` column equals it.
`read_output` and `iter_container` resolve them.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tarfile
import tempfile
from typing import Any, Iterator, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from cogview_ray import layout
from cogview_ray.layout import check_key
from cogview_ray.storage import RunStore, check_relative

IMAGE_EXTENSIONS = {"png": "png", "jpeg": "jpg", "webp": "webp"}
FORMATS = ("files", "webdataset", "parquet")
PNG_COMPRESS_LEVEL = 6
PARQUET_ROW_GROUP_ROWS = 64
# Types of known metadata columns in the parquet layout; other keys are stored as JSON text.
_META_TYPES = {
    "id": pa.string(), "prompt": pa.string(), "negative_prompt": pa.string(),
    "file": pa.string(), "row_index": pa.int64(), "seed": pa.int64(),
    "height": pa.int64(), "width": pa.int64(), "num_inference_steps": pa.int64(),
    "guidance_scale": pa.float64(), "prompt_truncated": pa.bool_(),
    "run_id": pa.string(), "shard_id": pa.string(),
    "model_path": pa.string(), "model_hash": pa.string(),
}
_RESERVED_COLUMNS = ("key", "member", "image")
# The parquet layout's image column: the storage type of Hugging Face `datasets.Image`, which
# `datasets` only recognises when the column has exactly this type (a plain binary column is not).
IMAGE_TYPE = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])
# Schema metadata that declares `image` an Image feature (the other columns are inferred from
# their Arrow types); fixed bytes, so containers stay byte-deterministic.
HF_METADATA = {b"huggingface": json.dumps({"info": {"features": {"image": {"_type": "Image"}}}},
                                          sort_keys=True, separators=(",", ":")).encode()}
_TAR_MTIME = 0


def image_extension(image_format: str) -> str:
    if image_format not in IMAGE_EXTENSIONS:
        raise ValueError(f"image format {image_format!r} is not one of png, jpeg, webp")
    return IMAGE_EXTENSIONS[image_format]


def encode_image(image: np.ndarray, image_format: str, quality: int = 95) -> bytes:
    """Encode a uint8 [H, W, 3] array; same pixels give the same bytes (no metadata)."""
    image_extension(image_format)
    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"image must be uint8 [H, W, 3], got {arr.dtype} {list(arr.shape)}")
    pil = Image.fromarray(np.ascontiguousarray(arr), mode="RGB")
    buf = io.BytesIO()
    if image_format == "png":
        pil.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL, optimize=False)
    elif image_format == "jpeg":
        pil.save(buf, format="JPEG", quality=int(quality), subsampling="4:2:0",
                 optimize=False, progressive=False)
    else:
        pil.save(buf, format="WEBP", quality=int(quality), method=4, lossless=False, exact=False)
    return buf.getvalue()


def meta_json(meta: dict) -> bytes:
    """Canonical JSON for a sample's metadata (sorted keys, no whitespace)."""
    return json.dumps(meta, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      default=_json_default).encode("utf-8")


def _json_default(value: Any):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"metadata value {value!r} is not JSON serializable")


class Sink(Protocol):
    """Where a worker puts one shard's images. `meta` must be deterministic (no timings)."""

    def add(self, key: str, image_bytes: bytes, meta: dict) -> str:
        """Store one image; return its output key (relative to the run prefix)."""

    def close(self) -> None:
        """Finish the shard (containers are uploaded here, in one PUT)."""

    def discard(self) -> None:
        """Give up the shard: nothing more is uploaded and no local file is left."""

    # As a context manager: `close` when the block succeeds, `discard` when it raises.


class FilesSink:
    """`images/{shard}/{key}.{ext}`, each written as soon as it is added."""

    def __init__(self, store: RunStore, shard_id: str, image_format: str):
        check_key(shard_id)
        self.store, self.shard_id, self.ext = store, shard_id, image_extension(image_format)

    def add(self, key: str, image_bytes: bytes, meta: dict) -> str:
        rel = layout.image(self.shard_id, key, self.ext)
        self.store.write(rel, image_bytes)
        return rel

    def close(self) -> None:
        pass

    def discard(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        # images already written stay: a retry overwrites them with the same bytes
        if exc_type is None:
            self.close()
        else:
            self.discard()


class _SpooledSink:
    """Base for container sinks: members spool to a local temp folder (bounded memory)
    and the container is built in key order and uploaded once, on close."""

    suffix = ""

    def __init__(self, store: RunStore, shard_id: str, image_format: str):
        check_key(shard_id)
        self.store, self.shard_id, self.ext = store, shard_id, image_extension(image_format)
        self.rel = layout.container(shard_id, self.suffix)
        self._dir = tempfile.mkdtemp(prefix=f"cogview-sink-{shard_id}-")
        self._keys: set[str] = set()
        self._closed = False

    def add(self, key: str, image_bytes: bytes, meta: dict) -> str:
        if self._closed:
            raise RuntimeError(f"sink for shard {self.shard_id} is already closed")
        check_key(key)
        # A re-added key (a re-rendered batch) replaces the earlier member: same bytes.
        with open(os.path.join(self._dir, key + ".img"), "wb") as f:
            f.write(image_bytes)
        with open(os.path.join(self._dir, key + ".json"), "wb") as f:
            f.write(meta_json(meta))
        self._keys.add(key)
        return f"{self.rel}#{key}.{self.ext}"

    def close(self) -> None:
        """Build and upload the container (nothing is uploaded for an empty shard). The spool
        is removed whether or not the upload succeeds: a failed attempt is redone from scratch,
        and at 1024 px a 1000-row spool is about 1.5 GB."""
        if self._closed:
            return
        try:
            if self._keys:
                out = os.path.join(self._dir, "_container")
                self._build(out, sorted(self._keys))
                self.store.upload(self.rel, out)
        finally:
            self.discard()

    def discard(self) -> None:
        """Drop spooled members without uploading."""
        self._closed = True
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *_):
        if exc_type is None:
            self.close()
        else:
            self.discard()

    def _read(self, key: str, what: str) -> bytes:
        with open(os.path.join(self._dir, f"{key}.{what}"), "rb") as f:
            return f.read()

    def _build(self, out_path: str, keys: list[str]) -> None:
        raise NotImplementedError


class WebDatasetSink(_SpooledSink):
    """`shards/{shard}.tar` with `{key}.{ext}` and `{key}.json` members, sorted by key."""

    suffix = "tar"

    def _build(self, out_path: str, keys: list[str]) -> None:
        with tarfile.open(out_path, "w", format=tarfile.PAX_FORMAT, encoding="utf-8") as tar:
            for key in keys:
                for name, data in ((f"{key}.{self.ext}", self._read(key, "img")),
                                   (f"{key}.json", self._read(key, "json"))):
                    info = tarfile.TarInfo(name)
                    info.size, info.mtime, info.mode = len(data), _TAR_MTIME, 0o644
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    tar.addfile(info, io.BytesIO(data))


class ParquetSink(_SpooledSink):
    """`shards/{shard}.parquet`: columns `key`, `member` (`{key}.{ext}`), `image` (a struct
    {bytes, path=member}, declared a Hugging Face `Image` in the schema metadata, so
    `datasets.load_dataset("parquet", ...)` decodes it) and one column per metadata key
    (known ones typed, others JSON text)."""

    suffix = "parquet"

    def _build(self, out_path: str, keys: list[str]) -> None:
        metas = {k: json.loads(self._read(k, "json")) for k in keys}
        names = sorted({n for m in metas.values() for n in m} - set(_RESERVED_COLUMNS))
        fields = [pa.field("key", pa.string()), pa.field("member", pa.string()),
                  pa.field("image", IMAGE_TYPE)]
        fields += [pa.field(n, _META_TYPES.get(n, pa.string())) for n in names]
        schema = pa.schema(fields, metadata=HF_METADATA)
        compression = {f.name: "snappy" for f in fields}
        del compression["image"]  # nested: compression is set per leaf column
        compression.update({"image.bytes": "none", "image.path": "snappy"})  # image bytes are compressed already
        with pq.ParquetWriter(out_path, schema, compression=compression,
                              write_statistics=False, store_schema=True) as writer:
            for start in range(0, len(keys), PARQUET_ROW_GROUP_ROWS):
                chunk = keys[start:start + PARQUET_ROW_GROUP_ROWS]
                cols: dict[str, list] = {
                    "key": chunk,
                    "member": [f"{k}.{self.ext}" for k in chunk],
                    "image": [{"bytes": self._read(k, "img"), "path": f"{k}.{self.ext}"} for k in chunk],
                }
                for n in names:
                    cols[n] = [_meta_cell(metas[k].get(n), n) for k in chunk]
                writer.write_table(pa.table(cols, schema=schema))


def _meta_cell(value: Any, name: str):
    if value is None or name in _META_TYPES:
        return value
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def make_sink(fmt: str, store: RunStore, shard_id: str, image_format: str):
    """The writer for `output.format`: `files`, `webdataset` or `parquet`."""
    sinks = {"files": FilesSink, "webdataset": WebDatasetSink, "parquet": ParquetSink}
    if fmt not in sinks:
        raise ValueError(f"output format {fmt!r} is not one of {', '.join(FORMATS)}")
    return sinks[fmt](store, shard_id, image_format)


# --- reading outputs back (verify, tests, users) ------------------------------------
def split_locator(key: str) -> tuple[str, str | None]:
    """`"shards/00001.tar#a.png"` -> `("shards/00001.tar", "a.png")`; files -> `(key, None)`."""
    rel, sep, member = key.partition("#")
    return rel, (member if sep else None)


def iter_container(store: RunStore, rel: str) -> Iterator[tuple[str, bytes]]:
    """`(member, image bytes)` for each image in a shard container, streaming."""
    with store.fs.open(store.path(rel), "rb") as f:
        if rel.endswith(".tar"):
            with tarfile.open(fileobj=f, mode="r|") as tar:
                for info in tar:
                    if info.isfile() and not info.name.endswith(".json"):
                        yield info.name, tar.extractfile(info).read()
        elif rel.endswith(".parquet"):
            pf = pq.ParquetFile(f)
            for batch in pf.iter_batches(columns=["member", "image"], batch_size=16):
                images = batch.column("image")
                if pa.types.is_struct(images.type):  # containers before the Image struct held plain bytes
                    images = images.field("bytes")
                yield from zip(batch.column("member").to_pylist(), images.to_pylist())
        else:
            raise ValueError(f"{rel!r} is not a .tar or .parquet shard container")


def read_output(store: RunStore, key: str) -> bytes:
    """Bytes of one image by output key (a file, or a member of a container)."""
    rel, member = split_locator(key)
    check_relative(rel)
    if member is None:
        return store.read(rel)
    for name, data in iter_container(store, rel):
        if name == member:
            return data
    raise FileNotFoundError(f"no member {member!r} in {store.url(rel)}")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
