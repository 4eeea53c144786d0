"""Host memory and time of loading a checkpoint: peak RSS against the bytes of weights loaded.

    python jobs/bench_load.py --preset small                  # writes the preset to a temp dir first
    python jobs/bench_load.py --checkpoint /tmp/full-ckpt --dtype bfloat16 --only-pipeline
    python jobs/bench_load.py --checkpoint /tmp/full-ckpt --dtype bfloat16 --component text_encoder

Loads each component the way a worker does (meta device, weights read one tensor at a time,
`assign=True`), or the whole pipeline, and prints per component the seconds, the bytes of its
weights in the load dtype, and the process's resident memory: before, after, and the peak
during the load (VmHWM, reset before each component where the kernel allows). A loader that
held two copies, or a float32 copy of bf16 weights, shows as peak growth near 2x the weights.
The peak is the process's, so run it alone. Prints one JSON line at the end.
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

from cogview_ray.model import loading  # noqa: E402
from cogview_ray.model.checkpoint import make_checkpoint  # noqa: E402
from cogview_ray.model.cogview3plus import CogView3PlusPipeline  # noqa: E402
from cogview_ray.model.cogview3plus.transformer import CogView3PlusTransformer, TransformerConfig  # noqa: E402
from cogview_ray.model.text_encoder import TextEncoder  # noqa: E402
from cogview_ray.model.vae import VAEConfig, VAEDecoder  # noqa: E402

COMPONENTS = ("transformer", "vae", "text_encoder")
GIB = 2**30


def rss_bytes() -> tuple[int, int]:
    """(current, peak) resident set size of this process, from /proc/self/status."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["VmHWM"]


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def load_component(root: Path, name: str, device: str, dtype: torch.dtype):
    """One component as CogView3PlusPipeline.from_pretrained loads it."""
    if name == "transformer":
        cfg = TransformerConfig.from_dict(loading.load_component_config(root / name))
        return loading.build_and_load(lambda: CogView3PlusTransformer(cfg),
                                      loading.open_safetensors_state(root / name), device, dtype, name)
    if name == "vae":
        cfg = VAEConfig.from_dict(loading.load_component_config(root / name))
        return loading.build_and_load(
            lambda: VAEDecoder(cfg), loading.open_safetensors_state(root / name, VAEDecoder.unused_prefixes),
            device, dtype, name)
    return TextEncoder.from_folders(root / "text_encoder", root / "tokenizer", device, dtype).model


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of distinct parameter and buffer storage (tied and fused views counted once)."""
    seen, total = set(), 0
    for t in (*module.parameters(), *module.buffers()):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
    return total


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--checkpoint", help="a checkpoint folder in the official layout")
    src.add_argument("--preset", default="small", help="write this random-weight preset to a temp dir first")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--component", action="append", choices=COMPONENTS,
                    help="load only these (repeatable); default: each component, then the whole pipeline")
    ap.add_argument("--only-pipeline", action="store_true", help="load only the whole pipeline (a worker's load)")
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    if args.checkpoint:
        return measure(Path(args.checkpoint), args, dtype)
    with tempfile.TemporaryDirectory() as tmp:  # the written preset goes with it
        return measure(make_checkpoint(args.preset, Path(tmp) / args.preset), args, dtype)


def measure(root: Path, args, dtype: torch.dtype) -> int:
    """Load each component, then the whole pipeline; print times and RSS, then one JSON line."""
    disk = {c: sum(p.stat().st_size for p in (root / c).glob("*.safetensors")) for c in COMPONENTS}
    print(f"checkpoint {root} | {args.device} {args.dtype} | on disk (GiB): "
          + ", ".join(f"{c} {disk[c] / GIB:.2f}" for c in COMPONENTS))
    rows = []
    for name in [] if args.only_pipeline else (args.component or COMPONENTS):
        rss0, _ = rss_bytes()
        exact = reset_peak()
        t0 = time.perf_counter()
        module = load_component(root, name, args.device, dtype)
        seconds = time.perf_counter() - t0
        rss1, peak = rss_bytes()
        row = {"component": name, "load_s": round(seconds, 2), "weights_gib": weight_bytes(module) / GIB,
               "rss_before_gib": rss0 / GIB, "rss_after_gib": rss1 / GIB, "peak_rss_gib": peak / GIB,
               "peak_exact": exact}
        row["peak_growth_over_weights"] = (peak - rss0) / max(1, weight_bytes(module))
        rows.append(row)
        print(f"  {name:13s} {seconds:7.2f} s  weights {row['weights_gib']:6.2f} GiB  RSS {rss0 / GIB:6.2f} -> "
              f"{rss1 / GIB:6.2f} GiB, peak {peak / GIB:6.2f} GiB (growth {row['peak_growth_over_weights']:.2f}x "
              f"the weights{'' if exact else ', lifetime peak'})", flush=True)
        del module
    result = {"checkpoint": str(root), "device": args.device, "dtype": args.dtype, "components": rows}
    if not args.component:
        rss0, _ = rss_bytes()
        exact = reset_peak()
        t0 = time.perf_counter()
        pipe = CogView3PlusPipeline.from_pretrained(root, device=args.device, dtype=args.dtype)
        seconds = time.perf_counter() - t0
        rss1, peak = rss_bytes()
        total = sum(weight_bytes(m) for m in (pipe.transformer, pipe.vae, pipe.text_encoder.model))
        result["pipeline"] = {"load_s": round(seconds, 2), "weights_gib": total / GIB, "rss_before_gib": rss0 / GIB,
                              "rss_after_gib": rss1 / GIB, "peak_rss_gib": peak / GIB, "peak_exact": exact}
        print(f"  {'pipeline':13s} {seconds:7.2f} s  weights {total / GIB:6.2f} GiB  RSS {rss0 / GIB:6.2f} -> "
              f"{rss1 / GIB:6.2f} GiB, peak {peak / GIB:6.2f} GiB")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
