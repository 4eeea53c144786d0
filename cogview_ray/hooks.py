"""Extension points for tests and chaos drills: the worker and driver call a `Hooks` object at fixed
points; the default does nothing, and `COGVIEW_RAY_HOOKS` names another (`package.module:attr`)."""
from __future__ import annotations

import importlib
import os
from typing import Any, Sequence

from .config import ConfigError
from .model_cache import CACHE_ENV

HOOKS_ENV = "COGVIEW_RAY_HOOKS"
FAULTS_ENV = "COGVIEW_RAY_FAULTS"
# Loaded (by name, so the product never imports test code) when only COGVIEW_RAY_FAULTS is set.
FAULT_PLAN = "cogview_ray.testing.faults:FaultPlan"
# What the driver passes to every worker process through Ray's runtime_env: the hooks and
# fault plan must be the same everywhere, and the node cache root is where models land.
FORWARDED_ENV = (HOOKS_ENV, FAULTS_ENV, CACHE_ENV)


class HooksError(ConfigError):
    """`COGVIEW_RAY_HOOKS` (or the fault plan it loads) is wrong; one sentence naming it."""


class Hooks:
    """Called by the worker and the driver at fixed points; every method does nothing here.

    One instance per process (see `load_hooks`); a Ray worker process hosts one `RenderWorker`.
    """

    # -- worker ---------------------------------------------------------------------------

    def worker_started(self, worker_id: str) -> None:
        """First thing in `RenderWorker.__init__`, before the pipeline loads."""

    def worker_ready(self, worker_id: str) -> None:
        """The pipeline is loaded, compiled and warm; storage is open."""

    def wrap_pipeline(self, pipeline: Any) -> Any:
        """The pipeline the worker renders with; a wrapper may change what `generate` returns."""
        return pipeline

    def shard_started(self, shard_id: str, attempt: int) -> None:
        """`render_shard` was called, before the shard's rows are read."""

    def before_shard(self, shard_id: str, rows: Sequence) -> None:
        """The shard's rows (`RowSpec`s, rejected ones included) are read; rendering starts next."""

    def before_batch(self, rows: Sequence) -> None:
        """Just before `generate` for these rows; raising here is as if rendering raised."""

    def after_batch(self, rows: Sequence) -> None:
        """`generate` returned for these rows (their images are not yet checked or written)."""

    # -- driver ---------------------------------------------------------------------------

    def at_driver(self, point: str, shard_id: str) -> None:
        """The driver reached `point` for a shard: `before_manifest` (its images are written, its
        manifest part is not) or `after_manifest` (the part is written, the marker is not)."""


_loaded: tuple[tuple[str, str], Hooks] | None = None  # (env values it came from, the instance)


def load_hooks() -> Hooks:
    """The process's hooks: `COGVIEW_RAY_HOOKS` if set, else the fault plan if
    `COGVIEW_RAY_FAULTS` is set, else a no-op `Hooks()`.

    Cached per process while both variables keep their values (tests change them between runs
    of an in-process driver, and then get a fresh instance).
    """
    global _loaded
    key = (os.environ.get(HOOKS_ENV, ""), os.environ.get(FAULTS_ENV, ""))
    if _loaded is not None and _loaded[0] == key:
        return _loaded[1]
    path = key[0] or (FAULT_PLAN if key[1] else "")
    hooks = _instantiate(path) if path else Hooks()
    _loaded = (key, hooks)
    return hooks


def _instantiate(path: str) -> Hooks:
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise HooksError(f"{HOOKS_ENV}={path!r} is not of the form package.module:attr.")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise HooksError(f"{HOOKS_ENV}={path!r}: module {module_name!r} could not be imported "
                         f"({type(e).__name__}: {e}).") from None
    target = getattr(module, attr, None)
    if not callable(target):
        raise HooksError(f"{HOOKS_ENV}={path!r}: module {module_name!r} has no class or factory {attr!r}.")
    hooks = target()
    if not isinstance(hooks, Hooks):
        raise HooksError(f"{HOOKS_ENV}={path!r} gave a {type(hooks).__name__}, not a cogview_ray.hooks.Hooks.")
    return hooks
