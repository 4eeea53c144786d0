"""Reading a diffusers checkpoint folder (model index, component configs, safetensors weights),
and the device and dtype rules every model family loads with.

Modules are built on the meta device and take the loaded tensors with `assign=True`, so a
component costs one copy of its weights in memory; weights are read one tensor at a time and go
straight to the device. Pickle weights are never opened.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path
from collections.abc import Mapping
from typing import Callable, Iterable, Optional, Union

import torch
from torch import nn

PICKLE_SUFFIXES = (".bin", ".pt", ".ckpt", ".pth")
# Preferred file stems when a folder holds more than one candidate (diffusers, then transformers).
WEIGHT_STEMS = ("diffusion_pytorch_model", "model")
CONFIG_NAMES = ("config.json", "scheduler_config.json")

_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32}
_FP16_NAMES = {"float16", "fp16", "half"}


class CheckpointError(ValueError):
    """A checkpoint folder or file that cannot be loaded; the message names what is wrong."""


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}).") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, not {type(data).__name__}.")
    return data


def config_fields(cls, d: dict, source: str, ignored: Iterable[str] = ()) -> dict:
    """The keys of a component config that dataclass `cls` takes; any other key (except
    `_`-prefixed bookkeeping and `ignored` leftovers) is an error naming `source`."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(k for k in d if k not in names and not k.startswith("_") and k not in set(ignored))
    if unknown:
        raise CheckpointError(f"{source} has unknown key(s) {unknown}")
    return {k: v for k, v in d.items() if k in names}


def read_model_index(path: str | Path, class_name: Optional[str] = None, components: Iterable[str] = ()) -> dict:
    """Parse `model_index.json` of a checkpoint root.

    A family passes its `class_name` (a different `_class_name` is refused; a missing one is
    accepted) and the `components` it needs, each of which must be listed and have a folder.
    """
    root = Path(path)
    index_path = root / "model_index.json"
    if not index_path.is_file():
        raise CheckpointError(f"{root} is not a diffusers checkpoint folder: it has no model_index.json.")
    index = _read_json(index_path)
    found = index.get("_class_name")
    if class_name is not None and found is not None and found != class_name:
        raise CheckpointError(f"{index_path} is for {found}, not {class_name}.")
    for name in components:
        if not index.get(name):
            raise CheckpointError(f"{index_path} lists no '{name}' component, which {class_name} needs.")
        if not (root / name).is_dir():
            raise CheckpointError(f"Checkpoint {root} has no '{name}' folder although model_index.json lists it.")
    return index


def config_hash(path: str | Path) -> str:
    """sha256 over the checkpoint's model_index.json and component configs: its architecture identity."""
    root = Path(path)
    h = hashlib.sha256()
    names = ["model_index.json", "transformer/config.json", "vae/config.json",
             "text_encoder/config.json", "scheduler/scheduler_config.json"]
    for name in names:
        f = root / name
        if f.exists():
            h.update(name.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def load_component_config(folder: str | Path) -> dict:
    """The component's `config.json` (models) or `scheduler_config.json` (scheduler) as a dict."""
    folder = Path(folder)
    for name in CONFIG_NAMES:
        if (folder / name).is_file():
            return _read_json(folder / name)
    raise CheckpointError(f"{folder} has neither config.json nor scheduler_config.json.")


def check_weights_format(folder: str | Path) -> None:
    """Refuse a folder whose weights exist only as pickle files (they run code when loaded)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"Weights folder {folder} does not exist.")
    if any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{folder} holds only pickle weights ({', '.join(pickles)}); pickle checkpoints can execute code "
            "when opened and are not loaded; convert them to safetensors."
        )
    raise CheckpointError(f"{folder} holds no *.safetensors weights.")


def _pick(candidates: list[Path], suffix: str, folder: Path) -> Path:
    if len(candidates) == 1:
        return candidates[0]
    for stem in WEIGHT_STEMS:
        for path in candidates:
            if path.name == stem + suffix:
                return path
    names = ", ".join(p.name for p in candidates)
    raise CheckpointError(f"{folder} holds several weight files ({names}) and none has a standard name.")


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files that make up the component: all shards of an index, or one file."""
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if indexes:
        index_path = _pick(indexes, ".safetensors.index.json", folder)
        weight_map = _read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_path} has no 'weight_map'.")
        files = [folder / name for name in dict.fromkeys(weight_map.values())]
        missing = [p.name for p in files if not p.is_file()]
        if missing:
            raise CheckpointError(f"{index_path} names shard {missing[0]}, which is not in {folder}.")
        return files
    singles = sorted(p for p in folder.glob("*.safetensors"))
    return [_pick(singles, ".safetensors", folder)]


# safetensors header dtype names (https://github.com/huggingface/safetensors, format section)
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


class SafetensorsState(Mapping):
    """A component's weights as a lazy mapping: keys, shapes and dtypes come from the file headers;
    a tensor is read from disk when it is taken, straight into its own buffer.

    No file is memory-mapped, so the process holds only the tensors taken so far (a mapped file's
    touched pages would count once more against host memory while the tensors are copied out).
    """

    def __init__(self, folder: str | Path, drop_prefixes: Iterable[str] = ()):
        folder = Path(folder)
        check_weights_format(folder)
        drop = tuple(drop_prefixes)
        # key -> (file, dtype, shape, absolute byte offset, byte count)
        self._entries: dict[str, tuple[Path, torch.dtype, tuple[int, ...], int, int]] = {}
        for path in _weight_files(folder):
            for key, entry in _read_header(path).items():
                if drop and key.startswith(drop):
                    continue
                if key in self._entries:
                    raise CheckpointError(f"Weight '{key}' appears in more than one file of {folder}.")
                self._entries[key] = entry

    def __getitem__(self, key: str) -> torch.Tensor:
        path, dtype, shape, offset, nbytes = self._entries[key]
        buf = torch.empty(nbytes, dtype=torch.uint8)
        with open(path, "rb", buffering=0) as f:
            f.seek(offset)
            view, done = memoryview(buf.numpy()), 0
            while done < nbytes:
                n = f.readinto(view[done:])
                if not n:
                    raise CheckpointError(f"{path} ends inside weight '{key}' (truncated file).")
                done += n
        return buf.view(dtype).reshape(shape)

    def __iter__(self):
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key) -> bool:
        return key in self._entries

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key][2]

    def __delitem__(self, key: str) -> None:
        """Forget `key` without reading it."""
        del self._entries[key]

    def pop(self, key: str) -> torch.Tensor:
        tensor = self[key]
        del self[key]
        return tensor


def _read_header(path: Path) -> dict:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n <= 0 or 8 + n > size:
            raise CheckpointError(f"{path} is not a safetensors file (bad header length).")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path} is not a safetensors file (its header is not JSON).") from None
    entries = {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype = _ST_DTYPES[meta["dtype"]]
            shape = tuple(int(d) for d in meta["shape"])
            begin, end = (int(o) for o in meta["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path} has an unreadable or unsupported entry for weight '{key}'.") from None
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes or begin < 0 or 8 + n + end > size:
            raise CheckpointError(f"{path}: weight '{key}' has byte range {begin}..{end}, which does not fit "
                                  f"its shape {list(shape)} and {meta['dtype']} or the file.")
        entries[key] = (path, dtype, shape, 8 + n + begin, nbytes)
    return entries


def open_safetensors_state(folder: str | Path, drop_prefixes: Iterable[str] = ()) -> SafetensorsState:
    """A component's weights (single file or index-sharded) as a lazy `SafetensorsState`.

    Keys starting with any of `drop_prefixes` are never read (e.g. the VAE encoder).
    """
    return SafetensorsState(folder, drop_prefixes)


def load_safetensors_state(folder: str | Path, drop_prefixes: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """Read a component's weights (single file or index-sharded) to CPU tensors in their disk dtype."""
    return dict(open_safetensors_state(folder, drop_prefixes).items())


def build_and_load(
    module_factory: Callable[[], nn.Module],
    state: Mapping[str, torch.Tensor],
    device: str | torch.device,
    dtype: torch.dtype,
    name: str,
    tied: Optional[dict[str, str]] = None,
) -> nn.Module:
    """Build `module_factory()` on the meta device and move `state` into it (strict, by assignment).

    Floating-point tensors are read (from a lazy `SafetensorsState`), cast to `dtype` and moved to
    `device` one at a time, and `state` is emptied as it goes: host memory holds about one tensor
    beyond what is already on `device`, so on the CPU the peak stays near one copy of the weights.
    `tied` maps a key to the key whose tensor it shares (T5's `encoder.embed_tokens.weight` ->
    `shared.weight`): it is not read, even where the checkpoint stores it. Non-persistent buffers are
    recomputed by the module's `init_buffers(device)`. Returns the module in eval mode with
    gradients off.
    """
    tied = dict(tied or {})
    with torch.device("meta"):
        module = module_factory()
    expected = module.state_dict()
    missing = [k for k in expected if k not in state and k not in tied]
    unexpected = sorted(k for k in state if k not in expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing weight(s) {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected weight(s) {_few(unexpected)}")
        raise CheckpointError(f"The {name} checkpoint does not match the model: {'; '.join(parts)}.")
    shape_of = state.shape if isinstance(state, SafetensorsState) else (lambda k: tuple(state[k].shape))
    for key, want in expected.items():
        if key in tied:
            continue
        got = shape_of(key)
        if tuple(got) != tuple(want.shape):
            raise CheckpointError(
                f"The {name} weight '{key}' has shape {list(got)} in the checkpoint, "
                f"but the model expects {list(want.shape)}."
            )
    for key in tied:
        if key in state:
            del state[key]  # never read: it shares its source's tensor
    loaded = {}
    for key in list(state):
        tensor = state.pop(key)
        loaded[key] = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
        del tensor
    for key, source in tied.items():
        loaded[key] = loaded[source]
    module.load_state_dict(loaded, strict=True, assign=True)
    del loaded
    if hasattr(module, "init_buffers"):
        module.init_buffers(device)
    on_meta = [n for n, t in (*module.named_parameters(), *module.named_buffers()) if t.is_meta]
    if on_meta:
        raise CheckpointError(
            f"The {name} module left {_few(on_meta)} on the meta device; its init_buffers(device) must recompute them."
        )
    return module.eval().requires_grad_(False)


def _few(keys: list[str], limit: int = 5) -> str:
    shown = ", ".join(f"'{k}'" for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def resolve_device(device: Optional[Union[str, torch.device]]) -> torch.device:
    """"auto" or None is CUDA when available, else the CPU; an unavailable CUDA is refused."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but CUDA is not available on this machine")
    return device


def resolve_dtype(name: str | torch.dtype, device: str | torch.device) -> torch.dtype:
    """Map a dtype setting to a torch dtype: "auto" is bfloat16 on CUDA and float32 elsewhere."""
    if isinstance(name, torch.dtype):
        if name == torch.float16:
            name = "float16"
        elif name in (torch.bfloat16, torch.float32):
            return name
        else:
            name = str(name).removeprefix("torch.")
    key = str(name).lower()
    if key == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if key in _FP16_NAMES:
        raise CheckpointError(
            f"dtype {name!r} is not supported: CogView3-Plus overflows in float16 and gives black images; "
            "use bfloat16 or float32."
        )
    if key not in _DTYPES:
        raise CheckpointError(f"Unknown dtype {name!r}; use 'auto', 'bfloat16' or 'float32'.")
    return _DTYPES[key]
