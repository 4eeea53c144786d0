"""A compiled module with a fixed set of input shapes: shapes outside it run eagerly, and outputs
are copied out of the compiler's buffers so that callers may keep them across calls.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

COMPILE_MODES = ("none", "default", "max-autotune", "max-autotune-no-cudagraphs")
# modes whose compiled callables replay CUDA graphs (static output buffers reused per replay)
CUDAGRAPH_MODES = ("max-autotune",)
# distinct input shapes one compiled module may compile; dynamo's own limit is set above it, so
# a fullgraph compile never meets FailOnRecompileLimitHit
MAX_COMPILED_SHAPES = 64


def torch_compile(module: nn.Module, mode: str) -> Callable:
    # static shapes: every forward is one item, so no batch size ever recompiles
    return torch.compile(module, fullgraph=True, dynamic=False, mode=None if mode == "default" else mode)


class CompiledModule:
    """Calls `compiled` for shapes it may compile and `eager` for the rest.

    Until `seal()` the first MAX_COMPILED_SHAPES distinct shapes compile as they come; after it,
    only the shapes already seen (warmed up) run compiled, so which rows run eagerly depends on
    the run's warm-up sizes only, never on the order a worker met its rows.
    """

    def __init__(self, eager: Callable, compiled: Callable, mode: str,
                 max_shapes: int = MAX_COMPILED_SHAPES):
        self.eager, self.compiled, self.mode = eager, compiled, mode
        self.max_shapes = max_shapes
        self.shapes: set[tuple] = set()
        self.sealed = False
        self.eager_calls = 0  # calls that fell back to eager (a benchmark or test reads it)
        limit = torch._dynamo.config.recompile_limit
        torch._dynamo.config.recompile_limit = max(limit, max_shapes + 1)

    def seal(self) -> None:
        self.sealed = True

    def __call__(self, *args: torch.Tensor) -> torch.Tensor:
        key = tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))
        if key not in self.shapes:
            if self.sealed or len(self.shapes) >= self.max_shapes:
                self.eager_calls += 1
                return self.eager(*args)
            self.shapes.add(key)
        if self.mode in CUDAGRAPH_MODES:
            # a new replay may start: outputs of the last one are dead (they were cloned below)
            torch.compiler.cudagraph_mark_step_begin()
        # a CUDA-graph replay writes into the same output buffer every time, and generate()
        # keeps each item's output while the next item runs: hand out a copy
        return self.compiled(*args).clone()


def compile_module(module: nn.Module, mode: str,
                   compiler: Optional[Callable[[nn.Module, str], Callable]] = None) -> Callable:
    """`module` itself for mode "none", else a CompiledModule over `compiler(module, mode)`."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {COMPILE_MODES}, got {mode!r}")
    if mode == "none":
        return module
    return CompiledModule(module, (compiler or torch_compile)(module, mode), mode)
