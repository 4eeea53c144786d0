"""A run's output identity: the settings that change its output bytes or layout. A resume must
find them unchanged, and the default run id hashes them (with the input fingerprint)."""
from __future__ import annotations

import dataclasses
import json
from typing import Any

from .config import OMIT_IF_DEFAULT, OUTPUT_DEFINING, RunConfig
from .credentials import strip_userinfo

# How rows.derive_seed turns (render.seed, row id) into a row's seed. Bump it with any change
# there: the identity then differs, so a resume across the change is refused.
SEED_SCHEME = 1
# How rows.object_key turns ids into output keys. 2: ids with capitals are hashed and every key is
# lower case, so ids that differ only in case never share an object on a case-insensitive store.
KEY_SCHEME = 2
# The layout of `parquet` output containers. 2: `image` is a struct {bytes, path} with Hugging Face
# `Image` feature metadata (1 was plain binary): a run may not mix the two, or `datasets` refuses it.
PARQUET_SCHEME = 2
# How the pipelines compute pixels, where a release changes bytes for the same settings. 2: fused
# q/k/v GEMMs, oneDNN linears and channels-last VAE convolutions in both families (float32 on CPU
# rounds differently from 1). Recorded from 2 on, so a run rendered by the old kernels is not resumed by
# the new ones (its explicit run id is refused, its default one differs).
RENDER_SCHEME = 2
# Runs made before the scheme was recorded used scheme 1, and their identity has no seed_scheme:
# scheme 1 is recorded by its absence, so their `_run.json` and default run ids stay valid.
_UNRECORDED_SEED_SCHEME = 1


def output_defining(cfg: RunConfig) -> dict:
    """Every setting of the config except those whose field is marked
    `metadata={OUTPUT_DEFINING: False}` (scheduling, credentials, flags), by section; URLs
    without their user:password. A new setting counts unless it is marked."""
    settings = _defining(cfg)
    if SEED_SCHEME != _UNRECORDED_SEED_SCHEME:
        settings["render"]["seed_scheme"] = SEED_SCHEME
    settings["output"]["key_scheme"] = KEY_SCHEME
    settings["model"]["render_scheme"] = RENDER_SCHEME
    if cfg.output.format == "parquet":
        settings["output"]["parquet_scheme"] = PARQUET_SCHEME
    return settings


def _defining(section: Any) -> dict:
    out = {}
    for f in dataclasses.fields(section):
        if not f.metadata.get(OUTPUT_DEFINING, True):
            continue
        value = getattr(section, f.name)
        if f.metadata.get(OMIT_IF_DEFAULT) and value == _default(f):
            continue
        out[f.name] = _defining(value) if dataclasses.is_dataclass(value) else strip_userinfo(value)
    return out


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def diff_output_defining(old: dict, new: dict) -> list[str]:
    """Human-readable changes between two `output_defining` dicts, e.g. 'render.height: 1024 -> 768'."""
    a, b = _flatten(old), _flatten(new)
    lines = []
    for key in sorted(set(a) | set(b)):
        before, after = a.get(key, _ABSENT), b.get(key, _ABSENT)
        if before is _ABSENT or after is _ABSENT or not _same(before, after):
            lines.append(f"{key}: {_fmt(before)} -> {_fmt(after)}")
    return lines


_ABSENT = object()


def _same(a: Any, b: Any) -> bool:
    # bool is an int in Python, but true and 1 are different settings.
    if isinstance(a, bool) != isinstance(b, bool):
        return False
    return a == b


def _fmt(value: Any) -> str:
    if value is _ABSENT:
        return "(absent)"
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


def _flatten(d: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def runtime_identity(pipeline_identity: dict, torch_version: str, device_name: str,
                     cudnn_version: Any = None) -> dict:
    """What a worker renders with that changes output bytes besides the config: the resolved
    compile mode, attention backend and dtype (from `Pipeline.identity`), the torch and cuDNN
    versions and the device model. Every worker of a run must report the same; a resume must
    find the one `_run.json` recorded (compare with `diff_output_defining`)."""
    return {"compile": pipeline_identity.get("compile", "none"),
            "attention": pipeline_identity.get("attention"),
            "dtype": pipeline_identity.get("dtype"),
            "torch": torch_version, "cudnn": cudnn_version, "device": device_name,
            # a family's kernel generation (absent where it has none): a change of kernels changes bytes
            **({"kernels": pipeline_identity["kernels"]} if "kernels" in pipeline_identity else {})}


def family_name(class_name: str) -> str:
    """The short family name of a pipeline class: 'CogView4Pipeline' -> 'cogview4' (manifest rows)."""
    return str(class_name).removesuffix("Pipeline").lower()
