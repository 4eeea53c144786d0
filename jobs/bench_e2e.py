"""End-to-end worker throughput: images/hour per device through real shards, and how much of the
time the device waits on the host (claims, row reads, encoding, writes), without Ray.

    python jobs/bench_e2e.py --preset tiny --rows 48 --shard-size 16 --height 64 --width 64 --steps 2
    python jobs/benchmark.py --mode e2e --checkpoint /ckpt/full --device cuda --dtype bfloat16 \\
        --height 1024 --width 1024 --steps 50 --rows 64 --shard-size 32 --compile max-autotune

A `RenderWorker` runs in this process on a generated Parquet file of prompts with user ids (so
every row is claimed), writing images to a local folder. The first shard warms up (not timed);
each later shard is timed from its call to its result. Duty cycle = time inside
`pipeline.generate` (CUDA events on CUDA) / the shards' wall time; the rest is the device waiting
on the host.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class GenerateTimer:
    """Wraps `pipe.generate` and adds up the time spent inside it: on CUDA the device time
    between events recorded around each call, else the host's wall clock."""

    def __init__(self, pipe):
        import torch

        self.pipe, self.inner, self.total_s, self.calls = pipe, pipe.generate, 0.0, 0
        self.cuda = getattr(pipe, "device", None) is not None and pipe.device.type == "cuda"
        self._torch = torch
        pipe.generate = self

    def __call__(self, *args, **kwargs):
        torch = self._torch
        self.calls += 1
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = self.inner(*args, **kwargs)
            end.record()
            end.synchronize()
            self.total_s += start.elapsed_time(end) / 1000.0
            return out
        t0 = time.perf_counter()
        out = self.inner(*args, **kwargs)
        self.total_s += time.perf_counter() - t0
        return out


def write_prompts(path: Path, rows: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    subjects = ["a red house", "a lighthouse at dusk", "two cats on a sofa", "a bowl of ramen", "a city in fog"]
    prompts = [f"{subjects[i % len(subjects)]}, photo {i}" for i in range(rows)]
    pq.write_table(pa.table({"id": [f"p{i:06d}" for i in range(rows)], "prompt": prompts}), str(path))


def bench_e2e(args) -> dict:
    import fsspec
    import torch

    from cogview_ray.config import load_config
    from cogview_ray.model.checkpoint import make_checkpoint
    from cogview_ray.shards import plan_shards
    from cogview_ray.worker import RenderWorker

    tmp = Path(tempfile.mkdtemp(prefix="cogview-e2e-"))
    ckpt = args.checkpoint or str(make_checkpoint(args.preset, tmp / "ckpt"))
    write_prompts(tmp / "prompts.parquet", args.rows)
    overrides = [
        f"model.path={ckpt}", f"model.device={args.device}", f"model.compile={args.compile}",
        f"model.attention={args.attention}", f"dataset.uri={tmp}/prompts.parquet", "dataset.id_column=id",
        f"dataset.shard_size={args.shard_size}", f"render.height={args.height}", f"render.width={args.width}",
        f"render.num_inference_steps={args.steps}", f"render.guidance_scale={args.guidance}",
        f"render.batch_size={args.batch}", f"output.uri={tmp}/out", "output.run_id=e2e",
        f"output.format={args.format}", f"output.image_format={args.image_format}",
        f"workers.cpus_per_worker={args.cpus}"]
    if args.dtype:
        overrides.append(f"model.dtype={args.dtype}")
    cfg = load_config(None, overrides)
    shards, _ = plan_shards(cfg.dataset, fsspec.filesystem("file"))
    if len(shards) < 2:
        raise SystemExit("--rows must make at least two shards: the first one only warms up")
    t0 = time.perf_counter()
    worker = RenderWorker(cfg, "e2e", "w00.0")
    start_s = time.perf_counter() - t0
    timer = GenerateTimer(worker.pipe)
    worker.render_shard(shards[0], 1, time.time())  # warm-up: first-call costs, prefetch primed
    timer.total_s, timer.calls = 0.0, 0
    shard_s, ok, rows = [], 0, 0
    for shard in shards[1:]:
        s0 = time.perf_counter()
        result = worker.render_shard(shard, 1, time.time())
        shard_s.append(time.perf_counter() - s0)
        ok += result.counts()["ok"]
        rows += shard.num_rows
    wall_s = sum(shard_s)
    duty = timer.total_s / wall_s if wall_s else 0.0
    return {
        "device": worker.device_name, "runtime": worker.runtime, "torch": torch.__version__,
        "checkpoint": args.checkpoint or f"preset {args.preset}", "height": args.height, "width": args.width,
        "steps": args.steps, "batch": args.batch, "format": args.format, "image_format": args.image_format,
        "worker_start_s": start_s, "compile_s": worker.compile_s, "timed_shards": len(shard_s),
        "timed_rows": rows, "ok_images": ok, "wall_s": wall_s, "generate_s": timer.total_s,
        "s_per_image": wall_s / ok if ok else None,
        "images_per_hour": ok / wall_s * 3600 if wall_s else None,
        "duty_cycle": duty, "host_wait_fraction": 1.0 - duty,
        "shard_s": shard_s, "out": str(tmp / "out"),
    }


def print_results(r: dict) -> None:
    print(f"device {r['device']}  {r['height']}x{r['width']}  {r['steps']} steps  batch {r['batch']}  "
          f"format {r['format']}/{r['image_format']}  ({r['checkpoint']})")
    print(f"worker start {r['worker_start_s']:.1f}s (compile+warm-up {r['compile_s']:.1f}s); "
          f"{r['timed_shards']} timed shards, {r['ok_images']} images of {r['timed_rows']} rows in {r['wall_s']:.2f}s")
    print(f"images/hour per device: {r['images_per_hour']:.0f}  ({r['s_per_image']:.3f} s/image)")
    print(f"device duty cycle: {r['duty_cycle']:.3f}  (inside generate {r['generate_s']:.2f}s of {r['wall_s']:.2f}s; "
          f"the device waits on the host {r['host_wait_fraction']:.1%} of the time)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", help="a checkpoint folder in the official layout")
    src.add_argument("--preset", default="tiny", help="write a random-weight checkpoint of this preset (default tiny)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=["float32", "bfloat16"])
    p.add_argument("--compile", default="none")
    p.add_argument("--attention", default="auto")
    p.add_argument("--height", type=int, default=64)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rows", type=int, default=48, help="prompts in the generated file")
    p.add_argument("--shard-size", type=int, default=16, help="rows per shard; the first shard only warms up")
    p.add_argument("--format", default="files", choices=["files", "webdataset", "parquet"])
    p.add_argument("--image-format", default="png", choices=["png", "jpeg", "webp"])
    p.add_argument("--cpus", type=int, default=1, help="torch threads of the worker (workers.cpus_per_worker)")
    p.add_argument("--json-out", help="also write the results as JSON here")
    args = p.parse_args(argv)
    if args.rows < 2 * args.shard_size or args.shard_size < 1:
        p.error("--rows must be at least twice --shard-size (the first shard only warms up)")
    results = bench_e2e(args)
    print_results(results)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
