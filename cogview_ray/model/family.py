"""The model-family seam: the `Pipeline` protocol every family implements, its `GenerateResult`,
and `load_pipeline`, which picks the family from a checkpoint's `model_index.json`.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Protocol, Sequence, Union, runtime_checkable

import numpy as np
import torch

from .attention import ATTENTION_BACKENDS  # noqa: F401  (re-exported)
from .compiled import COMPILE_MODES  # noqa: F401  (re-exported)
from .loading import CheckpointError, read_model_index

# model_index.json `_class_name` -> "module:Class"; imported only when a checkpoint needs it, so
# one family's dependencies never load for another's checkpoint.
FAMILIES = {
    "CogView3PlusPipeline": "cogview_ray.model.cogview3plus.pipeline:CogView3PlusPipeline",
    "CogView4Pipeline": "cogview_ray.model.cogview4.pipeline:CogView4Pipeline",
}


@dataclass
class GenerateResult:
    images: torch.Tensor  # [N, 3, H, W] float32 in [0, 1], on the pipeline's device or the CPU
    timings_s: dict = field(default_factory=dict)  # text_encoding, denoising, decoding
    truncated: list = field(default_factory=list)  # prompt longer than max_sequence_length
    finite: list = field(default_factory=list)  # False where latents or decoded pixels held NaN/Inf


def to_uint8_hwc(images: torch.Tensor) -> np.ndarray:
    """[N, 3, H, W] float in [0, 1] -> [N, H, W, 3] uint8, rounded as the reference's PIL output.

    Converted on the tensor's own device before the copy to the host (a quarter of the bytes):
    float32 x * 255 is exact IEEE on any device and torch.round, like numpy's, rounds half to even,
    so the bytes equal the host conversion's."""
    x = images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().cpu().numpy()


@runtime_checkable
class Pipeline(Protocol):
    """A loaded text-to-image model on one device: what the worker and the benchmark rely on.

    `generate` must be batch invariant (an image's bytes never depend on its batch-mates) and
    draw noise from a CPU generator seeded per item. Defaults written `...` are the family's own.
    """

    device: torch.device
    dtype: torch.dtype
    identity: dict  # at least family (model_index `_class_name`), path, config_hash; compile, attention, dtype

    @classmethod
    def from_pretrained(cls, path: Union[str, Path], device=None, dtype=None,
                        compile: str = "none", attention: str = "auto") -> "Pipeline": ...

    @property
    def size_multiple(self) -> int: ...  # height and width must be multiples of this (px)

    @property
    def max_size_px(self) -> int: ...

    @property
    def max_sequence_length(self) -> int: ...  # the text encoder's token limit

    def validate_size(self, height: int, width: int) -> None: ...  # ValueError naming the bad side

    def generate(self, prompts: Sequence[str], seeds: Sequence[int], height: int, width: int,
                 num_inference_steps: int = ..., guidance_scale: float = ..., negative_prompt=None,
                 max_sequence_length: Optional[int] = None) -> GenerateResult: ...

    def warmup(self, height: int, width: int, batch_size: int = 1, num_inference_steps: int = ...,
               guidance_scale: float = ..., max_sequence_length: Optional[int] = None) -> float: ...


def family_class(class_name: Optional[str], source: Union[str, Path] = "model_index.json") -> type:
    """The pipeline class registered for a model_index `_class_name`; refuses one we do not support."""
    target = FAMILIES.get(class_name) if isinstance(class_name, str) else None
    if target is None:
        raise CheckpointError(f"{source} is for {class_name!r}, which is not a supported model family "
                              f"(supported: {', '.join(sorted(FAMILIES))}).")
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def load_pipeline(path: Union[str, Path], device=None, dtype=None, compile: str = "none",
                  attention: str = "auto") -> Pipeline:
    """Load the checkpoint at `path` with the family its model_index.json names."""
    index = read_model_index(path)
    cls = family_class(index.get("_class_name"), Path(path) / "model_index.json")
    # "auto" is every family's default: passed on only when pinned
    extra = {} if attention == "auto" else {"attention": attention}
    return cls.from_pretrained(path, device=device, dtype=dtype, compile=compile, **extra)
