"""The compiled CogView4 transformer with a dynamic text length: one graph per image size serves
every 16-token prompt bucket, so a run compiles per size, never per prompt length.

Bucketing prompts to fewer lengths is not an option: the reference encodes without an attention
mask, so extra left padding changes the embeddings and the image.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..compiled import COMPILE_MODES, CUDAGRAPH_MODES, CompiledModule, torch_compile

TEXT_DIM = 1  # encoder_hidden_states: [1, L_text, D]


class DynamicTextModule(CompiledModule):
    """A CompiledModule whose shape key leaves out the text length (marked dynamic for dynamo).

    Which calls run compiled depends on the image size only: after `seal()` an unwarmed image size
    runs eagerly whatever its prompt, and a warmed one runs compiled at every text length.
    """

    def __call__(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 *rest: torch.Tensor) -> torch.Tensor:
        key = (tuple(hidden_states.shape), encoder_hidden_states.shape[2],
               *(tuple(a.shape) for a in rest if isinstance(a, torch.Tensor)))
        if key not in self.shapes:
            if self.sealed or len(self.shapes) >= self.max_shapes:
                self.eager_calls += 1
                return self.eager(hidden_states, encoder_hidden_states, *rest)
            self.shapes.add(key)
        # without the mark, dynamo (dynamic=False) would specialise on the first length it sees
        torch._dynamo.mark_dynamic(encoder_hidden_states, TEXT_DIM)
        if self.mode in CUDAGRAPH_MODES:
            torch.compiler.cudagraph_mark_step_begin()
        return self.compiled(hidden_states, encoder_hidden_states, *rest).clone()


def compile_transformer(module: torch.nn.Module, mode: str,
                        compiler: Optional[Callable[[torch.nn.Module, str], Callable]] = None) -> Callable:
    """`module` itself for mode "none", else a DynamicTextModule over `compiler(module, mode)`."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {COMPILE_MODES}, got {mode!r}")
    if mode == "none":
        return module
    return DynamicTextModule(module, (compiler or torch_compile)(module, mode), mode)
