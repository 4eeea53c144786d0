"""Benchmark our pipeline (each compile mode and attention backend) against the diffusers reference.

    python jobs/benchmark.py model --preset small --height 256 --width 256 --steps 4 --runs 5
    python jobs/benchmark.py model --checkpoint /ckpt/full --device cuda --height 1024 --width 1024 \\
        --steps 4 --scale-steps 50 --compile all --attention all --skip-reference --json-out bench.json
    python jobs/benchmark.py model --preset small-cogview4 --height 256 --width 256 --steps 4
    python jobs/benchmark.py flops --preset full-cogview4   # 1024x1024, 50 steps, CFG; no weights

Per variant: s/image p50/p90 over --runs timed batches (each after a warm-up at the timed batch, so
nothing compiles while timed), per-phase times, peak device memory, compile seconds apart, and on
CUDA the model FLOP utilisation against the device's dense peak. With --scale-steps, times are
scaled to that many steps (text encoding and decode once, denoising per step). Needs only torch,
transformers and safetensors (diffusers for the reference): no Ray, no network.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cogview_ray.model import load_pipeline, resolve_device  # noqa: E402
from cogview_ray.model.attention import ATTENTION_BACKENDS, fa3_available  # noqa: E402
from cogview_ray.model.checkpoint import COGVIEW4_PRESETS, PRESETS, make_checkpoint  # noqa: E402
from cogview_ray.model.compiled import COMPILE_MODES  # noqa: E402
from cogview_ray.model.pipeline_base import sync  # noqa: E402

# (device-name fragment, dense bf16, fp32 without tensor cores) TFLOP/s from vendor datasheets;
# the first fragment found in torch.cuda.get_device_name() wins, so specific names come first
PEAK_TFLOPS = [
    ("H100 PCIe", 756.0, 51.0),
    ("H100 NVL", 835.0, 60.0),
    ("H100", 989.0, 67.0),  # SXM5: "NVIDIA H100 80GB HBM3"
    ("H200 NVL", 835.0, 60.0),
    ("H200", 989.0, 67.0),  # SXM
    ("A100", 312.0, 19.5),  # 40 GB and 80 GB, SXM4 and PCIe
    ("L40S", 362.0, 91.6),
    ("L40", 181.0, 90.5),  # before "L4", which it contains
    ("L4", 121.0, 30.3),
]


def peak_tflops(device_name: str, dtype: torch.dtype) -> Optional[float]:
    """Dense peak TFLOP/s of a device for bf16 (tensor cores) or fp32; None when unknown."""
    for fragment, bf16, fp32 in PEAK_TFLOPS:
        if fragment.lower() in device_name.lower():
            return bf16 if dtype == torch.bfloat16 else fp32
    return None


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))  # ceil
    return ordered[int(rank) - 1]


def plan_variants(compiles: list[str], attentions: list[str]) -> list[tuple[str, str]]:
    """(compile, attention) pairs: both axes swept one at a time (attention backends eager, compile
    modes with the first attention), or the full product when one axis has a single value."""
    if len(compiles) > 1 and len(attentions) > 1:
        return [("none", a) for a in attentions] + [(c, attentions[0]) for c in compiles if c != "none"]
    return [(c, a) for c in compiles for a in attentions]


PRESET_NAMES = [*PRESETS, *COGVIEW4_PRESETS]


def _op_kind(op) -> str:
    """Which part of the count an aten op's FLOPs belong to."""
    name = str(op)
    if "attention" in name or "bmm" in name:  # SDPA kernels, or its math decomposition
        return "attention"
    if "mm" in name:  # addmm / mm: the Linear layers
        return "linear"
    return "other"


def count_flops(transformer, vae, height: int, width: int, text_lens: list[int], steps: int,
                dtype: torch.dtype, device) -> dict:
    """FLOPs for one image, split: transformer linear and attention (one forward per text length
    in `text_lens`, i.e. two with CFG, times `steps`), and one VAE decode. Works on meta modules."""
    from torch.utils.flop_counter import FlopCounterMode

    f = vae.downscale_factor
    c = transformer.config
    x = torch.zeros(1, c.in_channels, height // f, width // f, device=device, dtype=dtype)
    size = torch.tensor([[height, width]], dtype=dtype).to(device)
    t = torch.full((1,), 999.0).to(device)
    split = {"transformer_linear": 0, "transformer_attention": 0, "transformer_other": 0}
    with torch.inference_mode():
        for length in text_lens:
            text = torch.zeros(1, length, c.text_embed_dim, device=device, dtype=dtype)
            with FlopCounterMode(display=False) as fc:
                transformer(x, text, t, size, size, torch.zeros_like(size))
            for op, n in fc.get_flop_counts()["Global"].items():
                split["transformer_" + _op_kind(op)] += n * steps
        with FlopCounterMode(display=False) as fc:
            vae(x)
        split["vae_decode"] = fc.get_total_flops()
    split["total"] = sum(split.values())
    return split


def pipeline_text_lens(pipe, prompt: str, guidance: float) -> list[int]:
    """Text tokens per transformer forward of one step: CogView4 pads each text to a multiple of 16
    (cond, then the empty negative with CFG); CogView3-Plus pads both to its token limit."""
    if pipe.identity["family"] == "CogView4Pipeline":
        texts = [prompt, ""] if guidance > 1 else [prompt]
        return [pipe.text_encoder.tokenize(p, pipe.max_sequence_length)[0].shape[1] for p in texts]
    return [pipe.max_sequence_length] * (2 if guidance > 1 else 1)


def preset_flops(preset: str, height: int, width: int, steps: int, guidance: float, text_tokens: int,
                 negative_tokens: int) -> dict:
    """`count_flops` for a preset's modules built on the meta device: the full-size count without
    weights or memory. Text lengths are given (a real prompt's tokens are the real tokenizer's)."""
    from cogview_ray.model.vae import VAEConfig, VAEDecoder

    if preset.endswith("cogview4"):
        from cogview_ray.model.cogview4.checkpoint import PRESETS as CV4_PRESETS
        from cogview_ray.model.cogview4.transformer import CogView4Transformer as T, TransformerConfig as TC
        spec = CV4_PRESETS[preset]
        text_lens = [text_tokens, negative_tokens]
    else:
        from cogview_ray.model.cogview3plus.transformer import CogView3PlusTransformer as T, TransformerConfig as TC
        spec = PRESETS[preset]
        text_lens = [224, 224]  # T5 ids are always padded to the limit; the negative is a zero embedding
    with torch.device("meta"):
        transformer = T(TC.from_dict(spec.transformer)).to(spec.dtype)
        vae = VAEDecoder(VAEConfig.from_dict(spec.vae)).to(spec.dtype)
    lens = text_lens if guidance > 1 else text_lens[:1]
    out = count_flops(transformer, vae, height, width, lens, steps, spec.dtype, "meta")
    return {"preset": preset, "height": height, "width": width, "steps": steps, "guidance": guidance,
            "text_lens": lens, "flops": out}


# --clock cpu: process CPU seconds (all threads), for a shared CPU machine where wall time
# measures the neighbours; the pipelines' own phase timings stay wall-clock
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = CLOCKS["wall"]


def _timed(device, fn) -> float:
    sync(device)
    t0 = _clock()
    fn()
    sync(device)
    return _clock() - t0


def _scale(phases: dict, steps: int, scale_steps: Optional[int]) -> float:
    """Seconds for one image with denoising scaled from `steps` to `scale_steps` steps."""
    factor = (scale_steps or steps) / steps
    return phases.get("text_encoding", 0.0) + phases.get("denoising", 0.0) * factor + phases.get("decoding", 0.0)


def bench_ours(pipe, args, prompts: list[str]) -> dict:
    dev, b = pipe.device, args.batch
    kw = dict(num_inference_steps=args.steps, guidance_scale=args.guidance)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    # warm-up at the timed batch and size: every compile happens here, none while timed
    warm_s = _timed(dev, lambda: pipe.generate(prompts[:b], list(range(b)), args.height, args.width, **kw))
    runs, phases = [], []
    for r in range(args.runs):
        seeds = list(range(b * (r + 1), b * (r + 2)))
        out = {}
        runs.append(_timed(dev, lambda: out.setdefault(
            "res", pipe.generate(prompts[:b], seeds, args.height, args.width, **kw))) / b)
        phases.append({k: v / b for k, v in out["res"].timings_s.items()})
    p50 = percentile(runs, 50)
    median_phases = {k: percentile([p[k] for p in phases], 50) for k in phases[0]}
    row = {"s_per_image_p50": p50, "s_per_image_p90": percentile(runs, 90), "phases_s": median_phases,
           "warmup_s": warm_s, "compile_s": max(0.0, warm_s - p50 * b)}
    if args.scale_steps:
        row["s_per_image_scaled"] = _scale(median_phases, args.steps, args.scale_steps)
    if dev.type == "cuda":
        row["peak_memory_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
    return row


def bench_reference(ckpt: str, family: str, mode: str, args, prompts, device, dtype, max_len: int) -> dict:
    import diffusers

    # the reference class of the same name as the checkpoint's model_index `_class_name`
    ref = getattr(diffusers, family).from_pretrained(ckpt, torch_dtype=dtype).to(device)
    ref.set_progress_bar_config(disable=True)
    if mode != "none":
        m = None if mode == "default" else mode
        ref.transformer = torch.compile(ref.transformer, mode=m)
        ref.vae.decode = torch.compile(ref.vae.decode, mode=m)
    b = args.batch

    def call(seeds):
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        ref(prompt=prompts[:b], height=args.height, width=args.width, num_inference_steps=args.steps,
            guidance_scale=args.guidance, generator=gens, output_type="pt", max_sequence_length=max_len)

    warm_s = _timed(device, lambda: call(list(range(b))))  # warmed at the timed batch, as ours
    runs = [_timed(device, lambda: call(list(range(b * (r + 1), b * (r + 2))))) / b for r in range(args.runs)]
    p50 = percentile(runs, 50)
    return {"s_per_image_p50": p50, "s_per_image_p90": percentile(runs, 90), "warmup_s": warm_s,
            "compile_s": max(0.0, warm_s - p50 * b)}


def _as_list(value: str, choices: tuple[str, ...], all_: list[str]) -> list[str]:
    names = all_ if value == "all" else value.split(",")
    bad = [n for n in names if n not in choices]
    if bad:
        raise SystemExit(f"unknown choice(s) {bad}; expected {choices} or 'all'")
    return names


def bench_model(args) -> dict:
    device = resolve_device(args.device)
    dtype_name = args.dtype or ("bfloat16" if device.type == "cuda" else "float32")
    dtype = getattr(torch, dtype_name)
    ckpt = args.checkpoint
    if args.random_init:
        ckpt = f"random:{args.random_init}"
        args.skip_reference = True  # no checkpoint holds these weights
    elif ckpt is None:
        ckpt = str(Path(tempfile.mkdtemp()) / args.preset)
        make_checkpoint(args.preset, ckpt)
    attentions_all = ["auto", "flash", "cudnn", "efficient", "math"] + (["fa3"] if fa3_available() else [])
    compiles = _as_list("none,default" if args.compile == "both" else args.compile, COMPILE_MODES,
                        list(COMPILE_MODES))
    attentions = _as_list(args.attention, ATTENTION_BACKENDS, attentions_all)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    results = {"checkpoint": ckpt, "device": str(device), "device_name": device_name, "dtype": dtype_name,
               "height": args.height, "width": args.width, "steps": args.steps, "scale_steps": args.scale_steps,
               "guidance": args.guidance, "batch": args.batch, "runs": args.runs, "torch": torch.__version__,
               "clock": args.clock, "threads": torch.get_num_threads(), "rows": []}
    prompts = [f"benchmark prompt {i}: a harbour at dusk, oil painting" for i in range(args.batch)]
    t0 = time.perf_counter()
    if args.random_init:
        from cogview_ray.model.cogview4.checkpoint import random_pipeline

        base = random_pipeline(args.random_init, device, dtype)
    else:
        base = load_pipeline(ckpt, device=device, dtype=dtype_name)
    results["load_s"] = time.perf_counter() - t0
    steps_for_flops = args.scale_steps or args.steps
    text_lens = pipeline_text_lens(base, prompts[0], args.guidance)
    with torch.device("meta"):  # counted on meta copies: the same count whatever the device's SDPA kernel
        meta = (type(base.transformer)(base.transformer.config).to(base.dtype),
                type(base.vae)(base.vae.config).to(base.dtype))
    split = count_flops(*meta, args.height, args.width, text_lens, steps_for_flops, base.dtype, "meta")
    flops = split["total"]
    results.update(flops_per_image=flops, flops_split=split, text_lens=text_lens, family=base.identity["family"])
    peak = args.peak_tflops or peak_tflops(device_name, dtype)
    results["peak_tflops"] = peak
    for mode, attention in plan_variants(compiles, attentions):
        torch._dynamo.reset()  # each compile mode compiles from scratch, inside its own warm-up
        row = {"variant": f"ours[{mode},{attention}]", "compile": mode, "attention": attention}
        try:
            pipe = type(base)(base.transformer, base.vae, base.text_encoder, base.scheduler_config,
                              base.device, base.dtype, ckpt, compile=mode, attention=attention)
            row["attention_used"] = pipe.identity["attention"]
            row.update(bench_ours(pipe, args, prompts))
            del pipe
        except Exception as e:  # a backend without a kernel here, a failed compile: record, go on
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        _add_mfu(row, flops, peak, args)
        results["rows"].append(row)
        _write(results, args.json_out)
        if not args.skip_reference and attention == attentions[0]:
            ref_row = {"variant": f"diffusers[{mode}]", "compile": mode}
            try:
                ref_row.update(bench_reference(ckpt, base.identity["family"], mode, args, prompts, device, dtype,
                                               base.max_sequence_length))
                if "s_per_image_p50" in row:
                    row["speedup_vs_diffusers"] = ref_row["s_per_image_p50"] / row["s_per_image_p50"]
            except Exception as e:
                ref_row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            results["rows"].append(ref_row)
            _write(results, args.json_out)
    return results


def _add_mfu(row: dict, flops: float, peak: Optional[float], args) -> None:
    """MFU of the (scaled) per-image time against the dense peak; FLOPs are for the scaled steps."""
    if not peak or "s_per_image_p50" not in row:
        return
    seconds = row.get("s_per_image_scaled") or row["s_per_image_p50"]
    row["mfu"] = flops / seconds / (peak * 1e12)


def _write(results: dict, path: Optional[str]) -> None:
    # after every variant: a run cut short by a time limit keeps what it measured
    if path:
        Path(path).write_text(json.dumps(results, indent=2))


def _split_line(split: dict) -> str:
    return ", ".join(f"{k} {v / 1e12:.4g}" for k, v in split.items() if k != "total")


def print_results(r: dict) -> None:
    print(f"checkpoint {r['checkpoint']} | {r['device_name']} {r['dtype']} | {r['height']}x{r['width']} | "
          f"{r['steps']} steps | guidance {r['guidance']} | batch {r['batch']} | {r['runs']} runs | "
          f"{r['clock']} clock, {r['threads']} threads")
    print(f"{r['family']} model FLOPs per image ({r['scale_steps'] or r['steps']} steps, text {r['text_lens']}): "
          f"{r['flops_per_image'] / 1e12:.4g} TFLOP ({_split_line(r['flops_split'])}) | load {r['load_s']:.1f} s")
    for row in r["rows"]:
        if "error" in row:
            print(f"  {row['variant']:<40} error: {row['error']}")
            continue
        line = f"  {row['variant']:<40} p50 {row['s_per_image_p50']:.3f} p90 {row['s_per_image_p90']:.3f} s/image"
        if "s_per_image_scaled" in row:
            line += f"  scaled {row['s_per_image_scaled']:.3f}"
        line += f"  compile {row['compile_s']:.1f} s"
        if "peak_memory_gib" in row:
            line += f"  peak {row['peak_memory_gib']:.1f} GiB"
        if "mfu" in row:
            line += f"  MFU {100 * row['mfu']:.1f}%"
        if "speedup_vs_diffusers" in row:
            line += f"  ratio diffusers/ours = {row['speedup_vs_diffusers']:.2f}"
        print(line)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:2] == ["--mode", "e2e"] or argv[:1] in (["--mode=e2e"], ["e2e"]):  # a worker through real shards
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_e2e import main as e2e_main

        return e2e_main(argv[2:] if argv[0] == "--mode" else argv[1:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    m = sub.add_parser("model", help="our generate() against the diffusers pipeline")
    src = m.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", help="a checkpoint folder in the official layout")
    src.add_argument("--preset", default="small", choices=PRESET_NAMES,
                     help="write a random-weight checkpoint of this preset to a temp dir (default small)")
    src.add_argument("--random-init", choices=COGVIEW4_PRESETS,
                     help="build this CogView4 preset on the device with random init, nothing written (GPU "
                          "check: no 31 GB checkpoint); implies --skip-reference")
    m.add_argument("--device", default="auto")
    m.add_argument("--dtype", choices=["float32", "bfloat16"])
    m.add_argument("--height", type=int, default=256)
    m.add_argument("--width", type=int, default=256)
    m.add_argument("--steps", type=int, default=4)
    m.add_argument("--scale-steps", type=int, help="also report s/image (and MFU) scaled to this many steps")
    m.add_argument("--guidance", type=float, default=5.0)
    m.add_argument("--batch", type=int, default=1, help="images per generate() call, warm-up included")
    m.add_argument("--runs", type=int, default=5, help="timed batches per variant (p50/p90 over them)")
    m.add_argument("--compile", default="none",
                   help=f"comma-separated of {COMPILE_MODES}, 'all', or 'both' (none,default)")
    m.add_argument("--attention", default="auto", help=f"comma-separated of {ATTENTION_BACKENDS} or 'all'")
    m.add_argument("--skip-reference", action="store_true", help="time only our pipeline")
    m.add_argument("--peak-tflops", type=float, help="device peak for MFU when not in the built-in table")
    m.add_argument("--json-out", help="also write the results as JSON here (after every variant)")
    m.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                   help="wall seconds, or process CPU seconds (CPU only; a shared machine)")
    m.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    fl = sub.add_parser("flops", help="FLOPs per image of a preset's modules, built on the meta device")
    fl.add_argument("--preset", default="full-cogview4", choices=PRESET_NAMES)
    fl.add_argument("--height", type=int, default=1024)
    fl.add_argument("--width", type=int, default=1024)
    fl.add_argument("--steps", type=int, default=50)
    fl.add_argument("--guidance", type=float, default=5.0)
    fl.add_argument("--text-tokens", type=int, default=128, help="CogView4 prompt tokens (a multiple of 16)")
    fl.add_argument("--negative-tokens", type=int, default=16, help="CogView4 negative tokens (\"\" pads to 16)")
    args = p.parse_args(argv)
    if args.what == "flops":
        r = preset_flops(args.preset, args.height, args.width, args.steps, args.guidance, args.text_tokens,
                         args.negative_tokens)
        print(f"{r['preset']} {r['height']}x{r['width']} {r['steps']} steps guidance {r['guidance']} "
              f"text {r['text_lens']}: {r['flops']['total'] / 1e15:.3f} PFLOP ({_split_line(r['flops'])} TFLOP)")
        return 0
    if args.runs < 1 or args.batch < 1 or args.steps < 1:
        p.error("--runs, --batch and --steps must be at least 1")
    global _clock
    _clock = CLOCKS[args.clock]
    if args.threads:
        torch.set_num_threads(args.threads)
    results = bench_model(args)
    print_results(results)
    _write(results, args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
