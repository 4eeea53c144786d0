"""Run settings: frozen dataclasses loaded from YAML plus `key=value` overrides and strictly
validated; every refusal is one sentence naming the key. Output identity: identity.py; secrets:
credentials.py."""
from __future__ import annotations

import dataclasses
import datetime as dt
import difflib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import (
    ConfigKeyError,
    InterpolationResolutionError,
    MissingMandatoryValue,
    OmegaConfBaseException,
    ValidationError,
)

from .credentials import REDACTED, is_secret_key
from .errors import ConfigError, first_line

MAX_SEED = 2**63 - 1
MAX_STEPS = 1000

DTYPES = ("auto", "bfloat16", "float32")
COMPILE_MODES = ("none", "default", "max-autotune", "max-autotune-no-cudagraphs")
# "auto": timed at worker start on CUDA; fa3 needs flash_attn_interface (model/attention.py)
ATTENTION_BACKENDS = ("auto", "flash", "cudnn", "efficient", "math", "fa3")
DEVICES = ("auto", "cuda", "cpu")
FORMATS = ("files", "webdataset", "parquet")
IMAGE_FORMATS = ("png", "jpeg", "webp")
RESUME_MODES = ("auto", "force")

RUN_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")

# Field metadata read by identity.output_defining: every setting defines the output (its bytes or
# layout) unless its field says otherwise, so a new setting is part of the resume check by default.
OUTPUT_DEFINING = "output_defining"
_NOT_DEFINING = {OUTPUT_DEFINING: False}
# Settings added after runs existed: left out of the identity at their default (the behaviour of
# those runs), so older `_run.json`s and default run ids stay valid; any other value counts.
OMIT_IF_DEFAULT = "omit_if_default"
_NEW_SETTING = {OMIT_IF_DEFAULT: True}


@dataclass(frozen=True)
class ModelConfig:
    path: str = MISSING
    dtype: str = "auto"
    # compiled kernels and the attention backend change output bytes in the last bits
    compile: str = field(default="none", metadata=_NEW_SETTING)
    attention: str = field(default="auto", metadata=_NEW_SETTING)
    device: str = field(default="auto", metadata=_NOT_DEFINING)


@dataclass(frozen=True)
class DatasetConfig:
    uri: str = MISSING
    prompt_column: str = "prompt"
    id_column: Optional[str] = None
    shard_size: int = 1000
    limit: Optional[int] = None


@dataclass(frozen=True)
class RenderConfig:
    height: int = 1024  # limits come from the loaded pipeline (the worker checks them)
    width: int = 1024
    num_inference_steps: int = 50
    guidance_scale: float = 5.0
    negative_prompt: Optional[str] = None
    # images do not depend on their batch-mates: the pipeline runs one item per forward
    batch_size: int = field(default=1, metadata=_NOT_DEFINING)
    seed: int = 0
    # None: the pipeline's own token limit (CogView3-Plus 224, CogView4 1024); recorded as null
    max_sequence_length: Optional[int] = None
    # longer prompts and negative prompts are rejected (prompt_too_long) before tokenizing
    max_prompt_chars: int = 10_000
    # [height, width] pairs compiled at worker start besides height x width; with compiling, rows
    # of other sizes run eagerly (their bytes depend on this list, so it is output-defining)
    sizes: List[List[int]] = field(default_factory=list, metadata=_NEW_SETTING)


@dataclass(frozen=True)
class WorkersConfig:
    num_workers: Union[str, int] = "auto"
    gpus_per_worker: float = 1.0
    cpus_per_worker: float = 1.0
    max_in_flight: int = 2
    max_attempts: int = 3
    shard_timeout_s: float = 3600.0
    startup_timeout_s: float = 1800.0  # no worker ready this long (none loaded, or all lost): fail


@dataclass(frozen=True)
class OutputConfig:
    uri: str = field(default=MISSING, metadata=_NOT_DEFINING)  # the run's place, not its content
    run_id: Optional[str] = field(default=None, metadata=_NOT_DEFINING)
    format: str = "files"
    image_format: str = "png"
    quality: int = 95
    storage_options: Dict[str, Any] = field(default_factory=dict, metadata=_NOT_DEFINING)


@dataclass(frozen=True)
class NightlyConfig:
    """`cogview-ray nightly` only: one run per calendar day, its id the date."""

    timezone: str = "UTC"  # IANA name: the calendar day of a trigger is taken in this zone
    run_id_format: str = "nightly-%Y-%m-%d"  # strftime of the day; must encode the date and only it
    keep_days: Optional[int] = None  # delete nights dated more than this many days before today


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    render: RenderConfig = field(default_factory=RenderConfig)
    workers: WorkersConfig = field(default_factory=WorkersConfig, metadata=_NOT_DEFINING)
    output: OutputConfig = field(default_factory=OutputConfig)
    nightly: NightlyConfig = field(default_factory=NightlyConfig, metadata=_NOT_DEFINING)
    # "auto": resume only when output-defining settings and input match; "force": resume anyway.
    resume: str = field(default="auto", metadata=_NOT_DEFINING)
    # Take over a run lock left by a driver that is gone.
    takeover_lock: bool = field(default=False, metadata=_NOT_DEFINING)


_SECTIONS = {
    "model": ModelConfig,
    "dataset": DatasetConfig,
    "render": RenderConfig,
    "workers": WorkersConfig,
    "output": OutputConfig,
    "nightly": NightlyConfig,
}
# Free-form mappings passed through to other libraries: any keys allowed, values hidden.
_FREE_FORM = {"output.storage_options"}
_STRING_TYPES = ("a string", "a string or null")


# ---------------------------------------------------------------- loading


def load_config(path: Optional[str | Path], overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """YAML file (optional) merged over the defaults, then `key=value` overrides; validated."""
    schema = OmegaConf.structured(RunConfig)
    OmegaConf.set_readonly(schema, False)  # frozen dataclasses make it read-only
    OmegaConf.set_struct(schema, True)
    for key in _FREE_FORM:
        OmegaConf.set_struct(OmegaConf.select(schema, key), False)

    layers: list[tuple[DictConfig, str]] = []
    if path is not None:
        layers.append((_read_yaml(Path(path)), f"in {path}"))
    if overrides:
        layers.append((_parse_overrides(list(overrides)), "on the command line"))

    merged = schema
    for layer, where in layers:
        _check_keys(layer, where)
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as e:
            raise _translate(e, layer, where) from None
    try:
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise _translate(e, None, "") from None
    return validate_config(cfg)


def _read_yaml(path: Path) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"Config file {path} does not exist.")
    try:
        loaded = OmegaConf.load(path)
    except Exception as e:  # yaml errors, unreadable file
        raise ConfigError(f"Config file {path} is not valid YAML ({first_line(e)}).") from None
    if loaded is None or (isinstance(loaded, DictConfig) and loaded._is_none()):
        return OmegaConf.create({})
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"Config file {path} must hold a mapping of settings at the top level.")
    return loaded


def _parse_overrides(overrides: list[str]) -> DictConfig:
    for item in overrides:
        if not isinstance(item, str) or "=" not in item or not item.split("=", 1)[0].strip():
            shown = REDACTED if is_secret_key(str(item)) else repr(item)
            raise ConfigError(f"Override {shown} must have the form key=value, e.g. render.height=768.")
    parsed = []
    for item in overrides:
        try:
            OmegaConf.from_dotlist([item])
            parsed.append(item)
        except Exception:  # yaml scanner/parser errors and OmegaConf grammar errors
            key, raw = (part.strip() for part in item.split("=", 1))
            if _expected(key) not in _STRING_TYPES:
                raise ConfigError(f"Override for config key {key} could not be parsed as a value.") from None
            # text YAML cannot read (a strftime pattern starts with '%'): for a string setting,
            # the text is the value
            parsed.append(f"{key}={json.dumps(raw)}")
    return OmegaConf.from_dotlist(parsed)


def _check_keys(layer: DictConfig, where: str) -> None:
    """Unknown keys and section-vs-value mismatches, with a suggestion for typos."""
    top = {f.name for f in dataclasses.fields(RunConfig)}
    for key in layer.keys():
        key = str(key)
        if key not in top:
            raise ConfigError(_unknown(key, sorted(top), where))
        if key in _SECTIONS:
            value = layer._get_node(key)
            if not isinstance(value, DictConfig) or value._is_none():
                raise ConfigError(f"Config key {key} {where} must be a mapping of settings, not a single value.")
            names = [f.name for f in dataclasses.fields(_SECTIONS[key])]
            for sub in value.keys():
                if str(sub) not in names:
                    raise ConfigError(_unknown(f"{key}.{sub}", [f"{key}.{n}" for n in names], where))


def _unknown(key: str, known: list[str], where: str) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"Unknown config key {key} {where}{hint}."


def _translate(e: OmegaConfBaseException, layer: Optional[DictConfig], where: str) -> ConfigError:
    key = str(getattr(e, "full_key", None) or getattr(e, "key", None) or "?")
    suffix = f" {where}" if where else ""
    # OmegaConf's own messages can quote values: never for a key that may hold a secret.
    detail = "" if _is_secret(key) else f" ({first_line(e)})"
    if isinstance(e, MissingMandatoryValue):
        return ConfigError(f"Config key {key} is required but not set.")
    if isinstance(e, InterpolationResolutionError):
        return ConfigError(f"Config key {key}{suffix} could not be resolved{detail}.")
    if isinstance(e, ConfigKeyError):
        return ConfigError(f"Unknown config key {key}{suffix}.")
    if isinstance(e, ValidationError):
        shown = _shown(key, _raw_value(layer, key))
        return ConfigError(f"Config key {key}{suffix} expects {_expected(key)}, got {shown}.")
    return ConfigError(f"Config key {key}{suffix} is invalid{detail}.")


def _raw_value(layer: Optional[DictConfig], key: str) -> Any:
    if layer is None:
        return "?"
    try:
        node = OmegaConf.select(layer, key, throw_on_missing=False)
    except OmegaConfBaseException:
        return "?"
    if isinstance(node, DictConfig) or OmegaConf.is_list(node):
        return OmegaConf.to_container(node, resolve=False)
    return node


def _expected(key: str) -> str:
    parts = key.split(".")
    owner: Any = RunConfig
    for part in parts:
        fields = {f.name: f for f in dataclasses.fields(owner)} if dataclasses.is_dataclass(owner) else {}
        if part not in fields:
            return "a value of the right type"
        owner = fields[part].type
        if isinstance(owner, str):  # postponed annotations: sections by class name
            owner = {cls.__name__: cls for cls in _SECTIONS.values()}.get(owner, owner)
    names = {
        "int": "an integer",
        "float": "a number",
        "str": "a string",
        "bool": "true or false",
        "Optional[int]": "an integer or null",
        "Optional[str]": "a string or null",
        "Union[str, int]": '"auto" or an integer',
        "Dict[str, Any]": "a mapping",
    }
    return names.get(owner if isinstance(owner, str) else getattr(owner, "__name__", str(owner)),
                     "a value of the right type")


def _is_secret(key: str) -> bool:
    return is_secret_key(key.rsplit(".", 1)[-1]) or any(key.startswith(k) for k in _FREE_FORM)


def _shown(key: str, value: Any) -> str:
    return REDACTED if _is_secret(key) else repr(value)


# ---------------------------------------------------------------- validation


def validate_config(cfg: RunConfig) -> RunConfig:
    """Refuse impossible values with one sentence naming the key; return a normalized copy."""
    m, d, r, w, o = cfg.model, cfg.dataset, cfg.render, cfg.workers, cfg.output

    _nonempty_str("model.path", m.path)
    _choice("model.dtype", m.dtype, DTYPES)
    _choice("model.compile", m.compile, COMPILE_MODES)
    _choice("model.attention", m.attention, ATTENTION_BACKENDS)
    _choice("model.device", m.device, DEVICES)

    _nonempty_str("dataset.uri", d.uri)
    _nonempty_str("dataset.prompt_column", d.prompt_column)
    if d.id_column is not None:
        _nonempty_str("dataset.id_column", d.id_column)
    _int_range("dataset.shard_size", d.shard_size, 1, None)
    if d.limit is not None:
        _int_range("dataset.limit", d.limit, 1, None)

    _int_range("render.height", r.height, 1, None)
    _int_range("render.width", r.width, 1, None)
    _int_range("render.num_inference_steps", r.num_inference_steps, 1, MAX_STEPS)
    _float_min("render.guidance_scale", r.guidance_scale, 0.0, inclusive=True)
    if r.negative_prompt is not None and not isinstance(r.negative_prompt, str):
        raise ConfigError(f"Config key render.negative_prompt must be a string or null, got {r.negative_prompt!r}.")
    _int_range("render.batch_size", r.batch_size, 1, None)
    _int_range("render.seed", r.seed, 0, MAX_SEED)
    if r.max_sequence_length is not None:
        _int_range("render.max_sequence_length", r.max_sequence_length, 1, None)
    _int_range("render.max_prompt_chars", r.max_prompt_chars, 1, None)
    for i, pair in enumerate(r.sizes):
        if len(pair) != 2:
            raise ConfigError(f"Config key render.sizes[{i}] must be a [height, width] pair, got {list(pair)!r}.")
        _int_range(f"render.sizes[{i}][0]", pair[0], 1, None)
        _int_range(f"render.sizes[{i}][1]", pair[1], 1, None)
    if r.negative_prompt is not None and len(r.negative_prompt) > r.max_prompt_chars:
        raise ConfigError(f"Config key render.negative_prompt has {len(r.negative_prompt)} characters; "
                          f"render.max_prompt_chars is {r.max_prompt_chars}.")

    num_workers = w.num_workers
    if isinstance(num_workers, str) and num_workers.strip().isdigit():
        num_workers = int(num_workers.strip())
    if num_workers != "auto" and not (_is_int(num_workers) and num_workers >= 1):
        raise ConfigError(f'Config key workers.num_workers must be "auto" or a positive integer, got {num_workers!r}.')
    _float_min("workers.gpus_per_worker", w.gpus_per_worker, 0.0, inclusive=True)
    _float_min("workers.cpus_per_worker", w.cpus_per_worker, 0.0, inclusive=True)
    _int_range("workers.max_in_flight", w.max_in_flight, 1, None)
    _int_range("workers.max_attempts", w.max_attempts, 1, None)
    _float_min("workers.shard_timeout_s", w.shard_timeout_s, 0.0, inclusive=False)
    _float_min("workers.startup_timeout_s", w.startup_timeout_s, 0.0, inclusive=False)

    _nonempty_str("output.uri", o.uri)
    if o.run_id is not None and not (isinstance(o.run_id, str) and RUN_ID_RE.fullmatch(o.run_id)):
        raise ConfigError(
            f"Config key output.run_id must be 1-128 letters, digits, '.', '_' or '-' "
            f"starting with a letter or digit, got {o.run_id!r}."
        )
    _choice("output.format", o.format, FORMATS)
    _choice("output.image_format", o.image_format, IMAGE_FORMATS)
    _int_range("output.quality", o.quality, 1, 100)
    if not isinstance(o.storage_options, dict) or not all(isinstance(k, str) for k in o.storage_options):
        raise ConfigError("Config key output.storage_options must be a mapping with string keys.")

    _validate_nightly(cfg.nightly)

    _choice("resume", cfg.resume, RESUME_MODES)
    if not isinstance(cfg.takeover_lock, bool):
        raise ConfigError(f"Config key takeover_lock must be true or false, got {cfg.takeover_lock!r}.")

    if num_workers != w.num_workers:
        cfg = dataclasses.replace(cfg, workers=dataclasses.replace(w, num_workers=num_workers))
    return cfg


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _nonempty_str(key: str, value: Any) -> None:
    if value == MISSING:
        raise ConfigError(f"Config key {key} is required but not set.")
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"Config key {key} must be a non-empty string, got {value!r}.")


def _choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        allowed = ", ".join(repr(c) for c in choices)
        raise ConfigError(f"Config key {key} must be one of {allowed}, got {value!r}.")


def _int_range(key: str, value: Any, low: Optional[int], high: Optional[int]) -> None:
    if not _is_int(value):
        raise ConfigError(f"Config key {key} must be an integer, got {value!r}.")
    if low is not None and value < low or high is not None and value > high:
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ConfigError(f"Config key {key} must be {bound}, got {value!r}.")


def _float_min(key: str, value: Any, low: float, inclusive: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"Config key {key} must be a finite number, got {value!r}.")
    if value < low or (not inclusive and value == low):
        bound = f"at least {low:g}" if inclusive else f"greater than {low:g}"
        raise ConfigError(f"Config key {key} must be {bound}, got {value!r}.")


# ---------------------------------------------------------------- nightly section


def _validate_nightly(n: NightlyConfig) -> None:
    night_zone(n)
    fmt = n.run_id_format
    # the id must encode the whole date and nothing finer, so one day has exactly one run
    if not isinstance(fmt, str) or "%" not in fmt:
        raise ConfigError(f"Config key nightly.run_id_format must be a strftime pattern such as "
                          f"nightly-%Y-%m-%d, got {fmt!r}.")
    for day in (dt.date(2001, 2, 3), dt.date(2030, 12, 31)):
        start, end = dt.datetime.combine(day, dt.time(0, 0)), dt.datetime.combine(day, dt.time(23, 59, 59))
        text = start.strftime(fmt)
        if end.strftime(fmt) != text:
            raise ConfigError(f"Config key nightly.run_id_format {fmt!r} changes within a day; "
                              f"use date fields only (%Y, %m, %d).")
        if not RUN_ID_RE.fullmatch(text):
            raise ConfigError(f"Config key nightly.run_id_format {fmt!r} gives run id {text!r}, which is "
                              f"not 1-128 letters, digits, '.', '_' or '-'.")
        if parse_run_day(text, fmt) != day:
            raise ConfigError(f"Config key nightly.run_id_format {fmt!r} does not encode the full date; "
                              f"include %Y, %m and %d.")
    k = n.keep_days
    if k is not None and (not _is_int(k) or k < 1):
        raise ConfigError(f"Config key nightly.keep_days must be a positive integer or null, got {k!r}.")


def night_zone(n: NightlyConfig) -> dt.tzinfo:
    """The time zone whose calendar day names a night."""
    if n.timezone in ("UTC", "Etc/UTC"):  # works without a tz database (slim images)
        return dt.timezone.utc
    try:
        from zoneinfo import ZoneInfo

        return ZoneInfo(n.timezone)
    except Exception:
        raise ConfigError(f"Config key nightly.timezone must be an IANA time zone such as Europe/Berlin, "
                          f"got {n.timezone!r}.") from None


def night_run_id(n: NightlyConfig, day: dt.date) -> str:
    return dt.datetime.combine(day, dt.time(0, 0)).strftime(n.run_id_format)


def parse_run_day(name: str, fmt: str) -> Optional[dt.date]:
    """The day a run folder name stands for, or None unless `fmt` produced exactly this name."""
    try:
        day = dt.datetime.strptime(name, fmt).date()
    except ValueError:
        return None
    return day if dt.datetime.combine(day, dt.time(0, 0)).strftime(fmt) == name else None
