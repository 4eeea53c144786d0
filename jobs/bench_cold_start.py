"""Cold start with and without the node's compile cache: compile + warm-up seconds of a first worker
on a node, of a second worker process on the same node (same `$COGVIEW_RAY_CACHE`), and of a
worker on a fresh node (an empty cache) as the control.

    python jobs/bench_cold_start.py                       # tiny preset, 64x64, model.compile=default
    python jobs/bench_cold_start.py --preset small --size 128

Each worker is its own process building `RenderWorker` (no Ray) and reporting `info()`'s
`compile_s`; the cache root is a fresh temporary folder, and TORCHINDUCTOR_CACHE_DIR is unset so
the worker places torch's compile cache there (`compile_cache.use_node_compile_cache`).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(args) -> None:
    """One worker process: build the worker, print its start-up timings as JSON."""
    sys.path.insert(0, str(ROOT))
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cogview_ray.config import load_config
    from cogview_ray.worker import RenderWorker

    tmp = Path(tempfile.mkdtemp(prefix="bench-cold-"))
    pq.write_table(pa.table({"prompt": ["a red house"]}), str(tmp / "p.parquet"))
    cfg = load_config(None, [
        f"model.path=preset:{args.preset}", "model.dtype=float32", "model.device=cpu",
        f"model.compile={args.compile}", f"dataset.uri={tmp}/p.parquet", f"render.height={args.size}",
        f"render.width={args.size}", "render.num_inference_steps=2", "render.batch_size=1",
        f"workers.cpus_per_worker={args.threads}", f"output.uri={tmp}/out", "output.run_id=r"])
    info = RenderWorker(cfg, "r", "w00.0").info()
    print(json.dumps({"load_s": info["load_s"], "compile_s": info["compile_s"],
                      "cache": os.environ.get("TORCHINDUCTOR_CACHE_DIR")}))


def spawn(args, cache_root: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    env["COGVIEW_RAY_CACHE"] = cache_root
    cmd = [sys.executable, __file__, "--worker", "--preset", args.preset, "--size", str(args.size),
           "--compile", args.compile, "--threads", str(args.threads)]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--size", type=int, default=64, help="render height and width, px")
    p.add_argument("--compile", default="default", help="model.compile")
    p.add_argument("--threads", type=int, default=2, help="workers.cpus_per_worker")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    node = tempfile.mkdtemp(prefix="bench-node-")
    first = spawn(args, node)
    second = spawn(args, node)
    fresh = spawn(args, tempfile.mkdtemp(prefix="bench-fresh-node-"))
    print(f"preset {args.preset}, {args.size}x{args.size}, model.compile={args.compile}, "
          f"{args.threads} threads; compile cache under {first['cache']}")
    for name, r in (("first worker on a node", first), ("second worker, same node", second),
                    ("first worker on a fresh node", fresh)):
        print(f"  {name:30s} load {r['load_s']:6.2f}s  compile+warm-up {r['compile_s']:6.2f}s")
    print(f"  second / first compile+warm-up: {second['compile_s'] / first['compile_s']:.2f}  "
          f"(fresh / first: {fresh['compile_s'] / first['compile_s']:.2f})")


if __name__ == "__main__":
    main()
