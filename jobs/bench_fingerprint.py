"""Cost of the whole-file content digest that fingerprints local input files.

    python jobs/bench_fingerprint.py --size-mb 1024
    python jobs/bench_fingerprint.py --size-mb 256 --dir /mnt/nvme/tmp --repeat 5

Writes one Parquet file of random prompts (uncompressed, so its size is what was asked),
then times `input_version.file_version` on it: the first call per repeat streams and hashes the
whole file (the per-process cache is cleared first), the second is a cache hit. Prints
seconds and GB/s for each, and the planning time with the digest against the footer read
alone. The file was just written, so it is usually in the page cache: the figure is the
hashing cost, not the disk's; pass a `--dir` on the real data disk and drop caches to see
the cold one.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cogview_ray import input_version  # noqa: E402

PROMPT_BYTES = 200
ROWS_PER_GROUP = 100_000


def write_prompts(path: Path, size_mb: float, seed: int = 0) -> None:
    """About `size_mb` MB of random lowercase prompts, written one row group at a time."""
    rng = np.random.default_rng(seed)
    rows_left = max(1, int(size_mb * 1e6 / PROMPT_BYTES))
    schema = pa.schema([("prompt", pa.string())])
    with pq.ParquetWriter(path, schema, compression="none", use_dictionary=False) as writer:
        while rows_left:
            n = min(rows_left, ROWS_PER_GROUP)
            data = rng.integers(97, 123, size=n * PROMPT_BYTES, dtype=np.uint8)
            offsets = np.arange(0, (n + 1) * PROMPT_BYTES, PROMPT_BYTES, dtype=np.int32)
            prompts = pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(data))
            writer.write_table(pa.table({"prompt": prompts}, schema=schema))
            rows_left -= n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=1024.0, help="size of the generated file (MB)")
    parser.add_argument("--dir", default=None, help="folder for the file (default: a temp folder)")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    fs = fsspec.filesystem("file")
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        path = Path(folder) / "prompts.parquet"
        started = time.perf_counter()
        write_prompts(path, args.size_mb)
        size = path.stat().st_size
        print(f"file: {size / 1e9:.3f} GB, written in {time.perf_counter() - started:.1f} s")

        digest_s, cached_s = [], []
        for _ in range(args.repeat):
            input_version._LOCAL_DIGESTS.clear()
            t0 = time.perf_counter()
            version = input_version.file_version(str(path), fs)
            t1 = time.perf_counter()
            assert input_version.file_version(str(path), fs) == version
            t2 = time.perf_counter()
            digest_s.append(t1 - t0)
            cached_s.append(t2 - t1)

        t0 = time.perf_counter()
        pq.read_metadata(path)
        footer_s = time.perf_counter() - t0

    best, median = min(digest_s), statistics.median(digest_s)
    gb = size / 1e9
    print(f"content digest (sha256): best {best:.3f} s = {gb / best:.2f} GB/s, "
          f"median {median:.3f} s = {gb / median:.2f} GB/s = {median / gb:.2f} s per GB")
    print(f"cached (same path, size, mtime): {min(cached_s) * 1e6:.0f} us")
    print(f"footer read alone: {footer_s * 1e3:.1f} ms; digest/footer = {median / max(footer_s, 1e-9):.0f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
