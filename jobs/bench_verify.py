"""Time and memory of `cogview-ray verify --no-objects` on a large synthetic run.

    python jobs/bench_verify.py                    # 10M manifest rows, shards of 1000
    python jobs/bench_verify.py --rows 2000000 --shard-size 5000 --dir /mnt/nvme/tmp

Builds a run folder on local disk with `--rows` manifest rows over `--files` input files:
manifest parts, commit markers (with row ranges), `_run.json` (with the input fingerprint)
and `_SUCCESS.json`, but no images. Then runs verify in a child process and prints the rows,
seconds, rows per second and the child's peak RSS (ru_maxrss), and verify's first lines.
"""
from __future__ import annotations

import argparse
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cogview_ray import layout  # noqa: E402
from cogview_ray import manifest as mf  # noqa: E402
from cogview_ray.shards import shard_id_for  # noqa: E402
from cogview_ray.storage import RunStore  # noqa: E402

RUN_ID = "bench"


def part_table(shard: str, file: str, file_index: int, start: int, stop: int) -> pa.Table:
    """A manifest part of rows [start, stop): mostly ok, every 50th rejected, every 97th failed."""
    rows = np.arange(start, stop, dtype=np.int64)
    status = np.where(rows % 50 == 0, "rejected", np.where(rows % 97 == 0, "failed", "ok"))
    ids = [f"f{file_index:05d}-{r:09d}" for r in rows.tolist()]
    ok = status == "ok"
    n = len(rows)
    columns = {
        "run_id": [RUN_ID] * n, "shard_id": [shard] * n, "id": ids, "file": [file] * n, "row_index": rows,
        "prompt": [f"prompt {r}" for r in rows.tolist()], "seed": rows, "height": np.full(n, 1024, np.int32),
        "width": np.full(n, 1024, np.int32), "num_inference_steps": np.full(n, 50, np.int32),
        "guidance_scale": np.full(n, 7.0), "status": status.tolist(),
        "reason": [None if s == "ok" else "empty_prompt" if s == "rejected" else "nonfinite_output" for s in status],
        "key": [f"images/{shard}/{i}.png" if o else None for i, o in zip(ids, ok)],
        "bytes": pa.array(np.where(ok, 1_500_000, 0), mask=~ok),
        "sha256": [("%064x" % r) if o else None for r, o in zip(rows.tolist(), ok)],
        "attempt": np.ones(n, np.int32),
    }
    arrays = [pa.array(columns[f.name], f.type) if f.name in columns else pa.nulls(n, f.type)
              for f in mf.MANIFEST_SCHEMA]
    return pa.Table.from_arrays(arrays, schema=mf.MANIFEST_SCHEMA)


def build_run(out: str, rows: int, files: int, shard_size: int) -> RunStore:
    store = RunStore(out, RUN_ID)
    per_file = [rows // files + (1 if k < rows % files else 0) for k in range(files)]
    fingerprint = {"version": 3, "num_files": files, "num_rows": rows, "size_bytes": 0, "planned_rows": rows,
                   "files": [{"path": f"in-{k:04d}.parquet", "size": 0, "sha256": "0" * 64, "num_rows": n}
                             for k, n in enumerate(per_file)]}
    mf.write_run_info(store, {"config": {"dataset": {"shard_size": shard_size}}, "fingerprint": fingerprint})
    totals = dict(rows=0, ok=0, failed=0, rejected=0, shards=0)
    for k, n in enumerate(per_file):
        file = f"/data/prompts/in-{k:04d}.parquet"  # as the planner names it; the fingerprint is relative
        for number, start in enumerate(range(0, n, shard_size)):
            stop = min(start + shard_size, n)
            shard = shard_id_for(k, number)
            buf = io.BytesIO()
            pq.write_table(part_table(shard, file, k, start, stop), buf, compression="zstd", compression_level=3,
                           use_dictionary=True, write_statistics=True, row_group_size=1 << 20)
            store.write(layout.manifest_part(shard), buf.getvalue())
            mf.commit_shard(store, shard, {"rows": stop - start, "status": "ok", "attempt": 1, "file": file,
                                           "row_start": start, "row_stop": stop})
            marker = mf.read_commit(store, shard)
            for key in ("rows", "ok", "failed", "rejected"):
                totals[key] += marker[key]
            totals["shards"] += 1
    mf.write_success(store, {"totals": totals})
    return store


def run_verify(run_uri: str) -> tuple[float, int, int, str]:
    """(seconds, peak RSS bytes, exit code, output) of `cogview-ray verify --no-objects` in a child."""
    cmd = [sys.executable, "-m", "cogview_ray.cli", "verify", run_uri, "--no-objects"]
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as log:
        child = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                 cwd=str(Path(__file__).resolve().parents[1]))
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - t0
        child.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        output = log.read().decode(errors="replace")
    return seconds, usage.ru_maxrss * 1024, child.returncode, output  # ru_maxrss: KiB on Linux


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=10_000_000)
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--files", type=int, default=4)
    p.add_argument("--dir", help="where to build the run (default: a temporary folder, removed after)")
    p.add_argument("--keep", action="store_true", help="keep the run folder")
    args = p.parse_args()
    root = tempfile.mkdtemp(prefix="bench-verify-", dir=args.dir)
    try:
        t0 = time.perf_counter()
        store = build_run(os.path.join(root, "out"), args.rows, args.files, args.shard_size)
        print(f"built {args.rows} rows in {-(-args.rows // args.shard_size)} shards in "
              f"{time.perf_counter() - t0:.1f} s at {store.url()}")
        seconds, rss, code, output = run_verify(store.url())
        print("\n".join(output.splitlines()[:6]))
        print(f"rows {args.rows}  seconds {seconds:.1f}  rows/s {args.rows / seconds:,.0f}  "
              f"peak RSS {rss / 2**20:.0f} MiB  exit {code}")
        return code
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
