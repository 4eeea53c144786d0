"""The attention kernel, chosen explicitly: SDPA pinned to one backend, or FlashAttention-3 with
the head dim zero-padded to one it supports. The choice changes output bytes, so it is recorded.
"""
from __future__ import annotations

import contextlib
import math
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

ATTENTION_BACKENDS = ("auto", "flash", "cudnn", "efficient", "math", "fa3")
_SDPA = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
         "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
# head dims FlashAttention-3 has kernels for; others are zero-padded up to the next one
FA3_HEAD_DIMS = (64, 96, 128, 192, 256)


def fa3_available() -> bool:
    try:
        import flash_attn_interface  # noqa: F401
    except Exception:  # not installed, or built for another torch/CUDA
        return False
    return True


def padded_head_dim(head_dim: int, supported=FA3_HEAD_DIMS) -> int:
    """The smallest supported head dim >= head_dim (40 -> 64)."""
    for d in supported:
        if d >= head_dim:
            return d
    raise ValueError(f"head dim {head_dim} is larger than any supported ({supported})")


def padded_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pad_to: int,
                     attend: Callable[..., torch.Tensor]) -> torch.Tensor:
    """Attention over [N, H, L, d] with the head dim zero-padded to `pad_to`, scaled by 1/sqrt(d).

    Exact: zero columns add nothing to q.k, and zero columns of v give zero outputs, which are
    sliced off. `attend(q, k, v, scale=...)` takes and returns [N, H, L, pad_to].
    """
    d = q.shape[-1]
    pad = (0, pad_to - d)
    out = attend(F.pad(q, pad), F.pad(k, pad), F.pad(v, pad), scale=1.0 / math.sqrt(d))
    return out[..., :d]


def _fa3(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    from flash_attn_interface import flash_attn_func

    # FA3 takes [N, L, H, d]; some releases return (out, lse)
    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale)
    out = out[0] if isinstance(out, tuple) else out
    return out.transpose(1, 2)


def make_attend(name: str) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
    """attend(q, k, v) over [N, H, L, d] for a resolved backend name (not "auto")."""
    if name == "fa3":
        return lambda q, k, v: padded_attention(q, k, v, padded_head_dim(q.shape[-1]), _fa3)
    if name not in _SDPA:
        raise ValueError(f"attention must be one of {ATTENTION_BACKENDS}, got {name!r}")
    return F.scaled_dot_product_attention


def attention_context(name: Optional[str]):
    """The context that pins SDPA to backend `name` (dynamo traces it; a no-op for fa3/None)."""
    if name in _SDPA:
        return sdpa_kernel(_SDPA[name])
    return contextlib.nullcontext()


def candidates(device: torch.device) -> list[str]:
    """Backends worth timing on this device, fastest first by published figures."""
    if device.type != "cuda":
        return ["flash"]
    names = ["fa3"] if fa3_available() else []
    return names + ["cudnn", "flash", "efficient"]


def resolve_attention(name: str, device: torch.device, dtype: torch.dtype, heads: int, head_dim: int,
                      seq_len: int, repeats: int = 5) -> str:
    """`name` itself unless "auto". "auto" on CPU is "flash" (torch's fused CPU kernel, the one
    the recorded golden bytes were rendered with; "math" differs in the last bits); on CUDA the
    fastest of the backends that run on a [2, heads, seq_len, head_dim] attention."""
    if name != "auto":
        if name not in ATTENTION_BACKENDS:
            raise ValueError(f"attention must be one of {ATTENTION_BACKENDS}, got {name!r}")
        if name == "fa3" and not fa3_available():
            raise ValueError("attention fa3 needs the flash_attn_interface (FlashAttention-3) package")
        return name
    if device.type != "cuda":
        return "flash"
    return _fastest(device, dtype, heads, head_dim, seq_len, repeats)


def _fastest(device, dtype, heads, head_dim, seq_len, repeats) -> str:  # CUDA only
    q, k, v = (torch.randn(2, heads, seq_len, head_dim, device=device, dtype=dtype) for _ in range(3))
    best, best_s = "math", math.inf
    for name in candidates(device):
        attend = make_attend(name)
        try:
            with torch.inference_mode(), attention_context(name):
                attend(q, k, v)  # first call: kernel selection and any lazy init
                torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                for _ in range(repeats):
                    attend(q, k, v)
                torch.cuda.synchronize(device)
        except RuntimeError:  # no kernel for this dtype, head dim or GPU
            continue
        s = (time.perf_counter() - t0) / repeats
        if s < best_s:
            best, best_s = name, s
    return best
