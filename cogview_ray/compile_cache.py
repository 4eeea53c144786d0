"""The torch compile cache on the node-local cache volume: a second worker on a node (or the next
pod there) loads compiled kernels instead of compiling them again."""
from __future__ import annotations

import os
from typing import MutableMapping, Optional

from .model_cache import cache_root

INDUCTOR_ENV = "TORCHINDUCTOR_CACHE_DIR"  # FX graph, AOTAutograd and kernel caches of torch.compile
TRITON_ENV = "TRITON_CACHE_DIR"  # Triton's compiled GPU kernels


def use_node_compile_cache(environ: Optional[MutableMapping[str, str]] = None) -> dict:
    """Point torch's compile caches at `{cache root}/compile/` (`$COGVIEW_RAY_CACHE`, the volume that
    also holds downloaded models), unless the user set them; call before anything compiles.
    Returns the variables set here.

    Only the inductor folder is set: inductor then keeps Triton's kernels in its `triton/{device}`
    subfolder on the same volume, which a user's own TRITON_CACHE_DIR overrides. Torch's default
    (/tmp/torchinductor_{user}) lives and dies with one pod, so a replaced pod compiled everything again.
    Cache entries are keyed by torch version, device and graph, so sharing a folder is safe; writes
    are atomic renames, so concurrent workers do not corrupt it."""
    env = os.environ if environ is None else environ
    if env.get(INDUCTOR_ENV):
        return {}
    folder = str(cache_root() / "compile" / "inductor")
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError:  # a read-only or missing volume: torch's own default still works
        return {}
    env[INDUCTOR_ENV] = folder
    return {INDUCTOR_ENV: folder}
