"""The run's runtime identity (torch/cuDNN versions, device model, attention backend, compile mode,
dtype): recorded once at the first worker load, and every later worker must match it."""
from __future__ import annotations

import json
import time
from typing import Callable, Optional

from .errors import RunRefused
from .identity import diff_output_defining
from .layout import RUNTIME
from .storage import RunStore, json_bytes

_SHOWN_CHANGES = 5


def check_runtime(store: RunStore, info: dict, force: bool, say: Callable[[str], None]) -> None:
    """Record `info["runtime"]` (a worker's `info()`) in `_runtime.json` if the run has none yet;
    otherwise compare: a worker whose runtime differs would render other bytes than the run's
    committed shards (a resume on another image, or a mixed cluster), so the run is refused with
    what differs, unless `force` (resume=force), which says it and goes on."""
    runtime = info.get("runtime")
    if not isinstance(runtime, dict):
        return  # a worker that reports none (a test double): nothing to hold it to
    worker = f"worker {info.get('worker_id', '?')} on {info.get('node', '?')}"
    record = {"runtime": runtime, "worker_id": info.get("worker_id"), "node": info.get("node"),
              "recorded_at": time.time()}
    if store.create_once(RUNTIME, json_bytes(record)):
        say(f"runtime {describe_runtime(runtime)}")
        return
    recorded = read_runtime(store)
    if recorded is None:
        raise RunRefused(f"{store.url(RUNTIME)} is unreadable (not a JSON object with a 'runtime'); restore "
                         f"or remove it, or write the run under a new output.run_id")
    changes = diff_output_defining(recorded, runtime)
    if not changes:
        return
    shown = "; ".join(changes[:_SHOWN_CHANGES])
    if force:
        say(f"{worker} renders with another runtime than the run recorded, going on (resume=force): {shown}")
        return
    raise RunRefused(f"{worker} renders with another runtime than run {store.url()} recorded in {RUNTIME} "
                     f"({shown}), so its images would not match the run's bytes; use the same image and "
                     f"device model, a new output.run_id, or resume=force to mix them anyway")


def read_runtime(store: RunStore) -> Optional[dict]:
    """The runtime recorded in `_runtime.json`; None when there is none or it is unreadable."""
    try:
        obj = json.loads(store.read(RUNTIME))
    except (FileNotFoundError, ValueError):
        return None
    runtime = obj.get("runtime") if isinstance(obj, dict) else None
    return runtime if isinstance(runtime, dict) else None


def describe_runtime(runtime: dict) -> str:
    """One line: 'torch 2.6.0, cuDNN 90100, NVIDIA H100 80GB HBM3, attention flash, compile none, bfloat16'."""
    cudnn = f", cuDNN {runtime['cudnn']}" if runtime.get("cudnn") is not None else ""
    return (f"torch {runtime.get('torch')}{cudnn}, {runtime.get('device')}, attention {runtime.get('attention')}, "
            f"compile {runtime.get('compile')}, {runtime.get('dtype')}")
