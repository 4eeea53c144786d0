"""Benchmark our pipeline against the diffusers reference on the same checkpoint.

    python jobs/benchmark.py model --preset small --height 256 --width 256 --steps 4 --images 4
    python jobs/benchmark.py model --checkpoint /models/CogView3Plus-3b --device cuda --compile both

Prints seconds per image for each variant (ours and diffusers; eager and compiled), the ratio
diffusers/ours (> 1 means ours is faster), and on CUDA the model FLOP utilisation. Needs only
torch, transformers, safetensors and diffusers: no Ray, no network.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cogview_ray.model.checkpoint import make_checkpoint  # noqa: E402
from cogview_ray.model import load_pipeline, resolve_device  # noqa: E402

# dense bf16 / fp32 peak TFLOP/s by device-name fragment (vendor datasheets)
PEAK_TFLOPS = {"H100": (989.0, 67.0), "H200": (989.0, 67.0), "A100": (312.0, 19.5), "L40S": (362.0, 91.6)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_flops(pipe, height: int, width: int, guidance: float, steps: int) -> float:
    """FLOPs for one image: transformer forwards (x2 with CFG) x steps + one VAE decode.

    Calls the CogView3-Plus transformer and VAE directly (eager, whatever the compile mode).
    """
    from torch.utils.flop_counter import FlopCounterMode

    f = pipe.vae.downscale_factor
    c = pipe.transformer.config
    rows = 2 if guidance > 1 else 1
    dev, dt = pipe.device, pipe.dtype
    x = torch.zeros(rows, c.in_channels, height // f, width // f, device=dev, dtype=dt)
    text = torch.zeros(rows, pipe.max_sequence_length, c.text_embed_dim, device=dev, dtype=dt)
    t = torch.full((rows,), 999, device=dev, dtype=torch.int64)
    size = torch.tensor([[height, width]] * rows, device=dev, dtype=dt)
    with torch.inference_mode():
        with FlopCounterMode(display=False) as fc:
            pipe.transformer(x, text, t, size, size, torch.zeros_like(size))
        step_flops = fc.get_total_flops()
        with FlopCounterMode(display=False) as fc:
            pipe.vae(x[:1])
        decode_flops = fc.get_total_flops()
    return step_flops * steps + decode_flops


def time_ours(pipe, args, prompts, seeds) -> float:
    pipe.generate(prompts[:1], seeds[:1], args.height, args.width, num_inference_steps=args.steps,
                  guidance_scale=args.guidance)  # warm-up (compiles when compiling)
    _sync(pipe.device)
    t0 = time.perf_counter()
    for i in range(0, len(prompts), args.batch):
        pipe.generate(prompts[i:i + args.batch], seeds[i:i + args.batch], args.height, args.width,
                      num_inference_steps=args.steps, guidance_scale=args.guidance)
    _sync(pipe.device)
    return (time.perf_counter() - t0) / len(prompts)


def time_reference(ref, args, prompts, seeds, device, max_len: int) -> float:
    def call(p, s):
        gens = [torch.Generator("cpu").manual_seed(x) for x in s]
        ref(prompt=p, height=args.height, width=args.width, num_inference_steps=args.steps,
            guidance_scale=args.guidance, generator=gens, output_type="pt", max_sequence_length=max_len)

    call(prompts[:1], seeds[:1])
    _sync(device)
    t0 = time.perf_counter()
    for i in range(0, len(prompts), args.batch):
        call(prompts[i:i + args.batch], seeds[i:i + args.batch])
    _sync(device)
    return (time.perf_counter() - t0) / len(prompts)


def bench_model(args) -> dict:
    device = resolve_device(args.device)
    dtype_name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    dtype = getattr(torch, dtype_name)
    ckpt = args.checkpoint
    if ckpt is None:
        ckpt = str(Path(tempfile.mkdtemp()) / args.preset)
        make_checkpoint(args.preset, ckpt)
    prompts = [f"benchmark prompt {i}: a harbour at dusk, oil painting" for i in range(args.images)]
    seeds = list(range(args.images))
    modes = ["none", "default"] if args.compile == "both" else [args.compile]
    results = {"checkpoint": ckpt, "device": str(device), "dtype": dtype_name, "height": args.height,
               "width": args.width, "steps": args.steps, "guidance": args.guidance, "batch": args.batch,
               "images": args.images, "torch": torch.__version__, "rows": []}
    if device.type == "cuda":
        results["device_name"] = torch.cuda.get_device_name(device)
    flops = None
    for mode in modes:
        pipe = load_pipeline(ckpt, device=device, dtype=dtype_name, compile=mode)
        if flops is None:
            flops = count_flops(pipe, args.height, args.width, args.guidance, args.steps)
        t0 = time.perf_counter()
        ours = time_ours(pipe, args, prompts, seeds)
        row = {"variant": f"ours[{mode}]", "s_per_image": ours, "wall_incl_warmup_s": time.perf_counter() - t0}
        results["rows"].append(row)
        family, max_len = pipe.identity["family"], pipe.max_sequence_length
        del pipe
        if not args.skip_reference:
            import diffusers

            # the reference class of the same name as the checkpoint's model_index `_class_name`
            Reference = getattr(diffusers, family)
            ref = Reference.from_pretrained(ckpt, torch_dtype=dtype).to(device)
            ref.set_progress_bar_config(disable=True)
            if mode != "none":
                ref.transformer = torch.compile(ref.transformer)
                ref.vae.decode = torch.compile(ref.vae.decode)
            theirs = time_reference(ref, args, prompts, seeds, device, max_len)
            results["rows"].append({"variant": f"diffusers[{mode}]", "s_per_image": theirs})
            row["speedup_vs_diffusers"] = theirs / ours
            del ref
    results["flops_per_image"] = flops
    if device.type == "cuda":
        name = results["device_name"]
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
        peak_tflops = args.peak_tflops or (peak[0 if dtype == torch.bfloat16 else 1] if peak else None)
        if peak_tflops:
            for row in results["rows"]:
                row["mfu"] = flops / row["s_per_image"] / (peak_tflops * 1e12)
    return results


def print_results(r: dict) -> None:
    print(f"checkpoint {r['checkpoint']} | {r.get('device_name', r['device'])} {r['dtype']} | "
          f"{r['height']}x{r['width']} | {r['steps']} steps | guidance {r['guidance']} | batch {r['batch']}")
    print(f"model FLOPs per image: {r['flops_per_image'] / 1e12:.3f} TFLOP")
    for row in r["rows"]:
        extra = ""
        if "speedup_vs_diffusers" in row:
            extra += f"  ratio diffusers/ours = {row['speedup_vs_diffusers']:.2f}"
        if "mfu" in row:
            extra += f"  MFU {100 * row['mfu']:.1f}%"
        print(f"  {row['variant']:<20} {row['s_per_image']:.3f} s/image{extra}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    m = sub.add_parser("model", help="our generate() against the diffusers pipeline")
    src = m.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", help="a checkpoint folder in the official layout")
    src.add_argument("--preset", default="small", choices=["tiny", "small", "full"],
                     help="write a random-weight checkpoint of this preset to a temp dir (default small)")
    m.add_argument("--device", default="auto")
    m.add_argument("--dtype", choices=["float32", "bfloat16"])
    m.add_argument("--height", type=int, default=256)
    m.add_argument("--width", type=int, default=256)
    m.add_argument("--steps", type=int, default=4)
    m.add_argument("--guidance", type=float, default=5.0)
    m.add_argument("--batch", type=int, default=1)
    m.add_argument("--images", type=int, default=4)
    m.add_argument("--compile", choices=["none", "default", "both"], default="none")
    m.add_argument("--skip-reference", action="store_true", help="time only our pipeline")
    m.add_argument("--peak-tflops", type=float, help="device peak for MFU when not in the built-in table")
    m.add_argument("--json-out", help="also write the results as JSON here")
    args = p.parse_args(argv)
    results = bench_model(args)
    print_results(results)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
