"""Shared checks of the fault and bad-input tests: the "nothing lost, nothing duplicated"
invariants of issue 4, fault and trace helpers, and the tally behind the README's figures.

Test modules load it as a pytest plugin (`pytest_plugins = ["tests.reliability"]`): every
`Tally` a test fills is appended to `.pytest_cache/reliability_tally.jsonl`, and the session
ends with a summary line (runs, kills, rows, lost, duplicated), also saved as JSON.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cogview_ray.config import load_config
from cogview_ray.driver import run_render
from cogview_ray.manifest import committed_generations, part_of, read_commit, read_manifest, read_success
from cogview_ray.sinks import read_output
from cogview_ray.storage import RunStore
from cogview_ray.testing import ENV
from cogview_ray.verify import verify_run

_CACHE = Path(__file__).resolve().parent.parent / ".pytest_cache"
TALLY_PATH = Path(os.environ.get("COGVIEW_RAY_TALLY") or _CACHE / "reliability_tally.jsonl")
FIGURES_PATH = TALLY_PATH.with_name("reliability_figures.json")
CLI = str(Path(sys.executable).with_name("cogview-ray"))


# ---------------------------------------------------------------- tally


@dataclasses.dataclass
class Tally:
    """What one test did and found: driver runs, processes killed, input rows checked."""

    test: str
    runs: int = 0
    kills: int = 0
    rows: int = 0
    lost: int = 0
    duplicated: int = 0
    rerendered: int = 0  # rows rendered again after a crash (each bounded by the in-flight shards)
    checks: int = 0  # invariant checks passed

    def run(self, cfg, **kwargs):
        """`run_render` in this process, counted."""
        self.runs += 1
        return run_render(cfg, **kwargs)

    def kill(self, pid: int) -> None:
        """SIGKILL a real process (a worker or a driver), counted."""
        os.kill(pid, signal.SIGKILL)
        self.kills += 1


@pytest.fixture
def tally(request):
    t = Tally(request.node.nodeid)
    yield t
    TALLY_PATH.parent.mkdir(parents=True, exist_ok=True)
    with open(TALLY_PATH, "a") as f:
        f.write(json.dumps(dataclasses.asdict(t), sort_keys=True) + "\n")


def pytest_configure(config):
    # a fresh tally per session (the plugin is registered once, however many modules name it)
    if TALLY_PATH.exists():
        TALLY_PATH.unlink()


def read_tally() -> dict:
    entries = [json.loads(line) for line in TALLY_PATH.read_text().splitlines()] if TALLY_PATH.exists() else []
    totals = {k: sum(e[k] for e in entries) for k in ("runs", "kills", "rows", "lost", "duplicated",
                                                         "rerendered", "checks")}
    return {"tests": len(entries), **totals, "per_test": entries}


def pytest_terminal_summary(terminalreporter):
    figures = read_tally()
    if not figures["tests"]:
        return
    FIGURES_PATH.write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")
    terminalreporter.write_sep("=", "reliability tally")
    terminalreporter.write_line(
        f"fault/bad-input tests {figures['tests']}: runs {figures['runs']}, kills {figures['kills']}, "
        f"rows {figures['rows']}, lost {figures['lost']}, duplicated {figures['duplicated']}, "
        f"re-rendered after crashes {figures['rerendered']}, invariant checks {figures['checks']} "
        f"(saved to {FIGURES_PATH})")


# ---------------------------------------------------------------- inputs and configs


def write_prompts(path, n: int = 12, prompts: dict | None = None, id_prefix: str = "item") -> str:
    """`n` rows with ids and 64x64 sizes; `prompts` replaces some prompts by row index."""
    rows = {"prompt": [f"prompt {i}: a small {['red', 'green', 'blue'][i % 3]} house" for i in range(n)],
            "id": [f"{id_prefix}-{i:03d}" for i in range(n)]}
    for i, p in (prompts or {}).items():
        rows["prompt"][i] = p
    pq.write_table(pa.table(rows), str(path))
    return str(path)


def overrides(checkpoint, dataset, out_uri, run_id, *extra) -> list[str]:
    """A tiny job: 64x64, 2 steps, batches of 2, shards of 4 rows, 2 CPU workers."""
    return [
        f"model.path={checkpoint}", "model.dtype=float32", "model.device=cpu",
        f"dataset.uri={dataset}", "dataset.shard_size=4", "dataset.id_column=id",
        "render.height=64", "render.width=64", "render.num_inference_steps=2", "render.batch_size=2",
        "render.seed=7", "workers.num_workers=2", "workers.cpus_per_worker=1", "workers.max_in_flight=2",
        f"output.uri={out_uri}", f"output.run_id={run_id}", *extra,
    ]


def make_cfg(checkpoint, dataset, out_uri, run_id, *extra, storage_options=None):
    cfg = load_config(None, overrides(checkpoint, dataset, out_uri, run_id, *extra))
    if storage_options:
        cfg = dataclasses.replace(cfg, output=dataclasses.replace(cfg.output, storage_options=storage_options))
    return cfg


def set_faults(monkeypatch, tmp_path, rules=(), storage=None) -> Path:
    """Set COGVIEW_RAY_FAULTS (forwarded to workers) with a trace folder; returns the folder."""
    monkeypatch.setenv(ENV, faults_env(tmp_path, rules, storage)[ENV])
    return tmp_path / "trace"


def faults_env(tmp_path, rules=(), storage=None) -> dict:
    """COGVIEW_RAY_FAULTS with a trace and a state folder, as an environment for a subprocess."""
    trace_dir, state_dir = tmp_path / "trace", tmp_path / "fault-state"
    trace_dir.mkdir(exist_ok=True)
    state_dir.mkdir(exist_ok=True)
    spec = {"rules": list(rules), "state_dir": str(state_dir), "trace_dir": str(trace_dir)}
    if storage:
        spec["storage"] = storage
    return {ENV: json.dumps(spec)}


def start_render(args: list[str], log_dir: Path, name: str, env: dict | None = None) -> subprocess.Popen:
    """`cogview-ray render ARGS` as its own process, joined to this test's Ray cluster."""
    import ray

    full_env = {k: v for k, v in os.environ.items() if k != ENV}
    full_env.update(env or {}, RAY_ADDRESS=ray.get_runtime_context().gcs_address)
    out = open(log_dir / f"{name}.out", "w")
    err = open(log_dir / f"{name}.err", "w")
    return subprocess.Popen([CLI, "render", *args], stdout=out, stderr=err, env=full_env)


# ---------------------------------------------------------------- traces


def read_trace(trace_dir) -> list[dict]:
    events = []
    for path in Path(trace_dir).glob("*.jsonl"):
        lines = path.read_text().split("\n")
        for line in lines[:-1]:  # the part after the last newline may still be being written
            if line.strip():
                events.append(json.loads(line))
    return sorted(events, key=lambda e: e["t"])


def rendered_counts(events) -> Counter:
    """How often each (file, row_index) was rendered, over every process of the trace."""
    counts = Counter()
    for e in events:
        if e["event"] == "rendered":
            counts.update((f, i) for f, i in e["rows"])
    return counts


def shard_rows(store: RunStore, shard_ids) -> set:
    """(file, row_index) of the given shards, from the committed manifest."""
    table = read_manifest(store, columns=["shard_id", "file", "row_index"]).to_pylist()
    wanted = set(shard_ids)
    return {(r["file"], r["row_index"]) for r in table if r["shard_id"] in wanted}


def check_rerendered(tally: Tally, store: RunStore, events, inflight_shards) -> set:
    """Rows rendered more than once are rows of the shards that were in flight at the crash."""
    again = {k for k, n in rendered_counts(events).items() if n > 1}
    allowed = shard_rows(store, inflight_shards)
    assert again <= allowed, f"re-rendered rows outside the in-flight shards: {sorted(again - allowed)[:5]}"
    tally.rerendered += len(again)
    return again


# ---------------------------------------------------------------- the invariants


def check_invariants(tally: Tally, store: RunStore, inputs: dict[str, int], *, complete: bool = True,
                     succeeded: bool = True) -> list[dict]:
    """Nothing lost, nothing duplicated, every ok object real: the issue's list, for one run.

    `inputs` maps each input file (as the dataset's filesystem names it) to its row count.
    With `complete=False` (a run stopped part-way) only committed shards are checked, and
    only for duplicates and validity. `succeeded=False`: the run ended with failed shards.
    """
    rows = read_manifest(store).to_pylist()
    by_file = defaultdict(list)
    for r in rows:
        by_file[r["file"]].append(r["row_index"])
    duplicated = sum(len(v) - len(set(v)) for v in by_file.values())
    ok = [r for r in rows if r["status"] == "ok"]
    live_ids = [r["id"] for r in rows if r["status"] != "rejected"]
    duplicated += len(live_ids) - len(set(live_ids)) + len(ok) - len({r["key"] for r in ok})
    lost = sum(n - len(set(by_file.get(f, ())) & set(range(n))) for f, n in inputs.items()) if complete else 0
    tally.rows += sum(inputs.values()) if complete else 0
    tally.lost += lost
    tally.duplicated += duplicated
    assert duplicated == 0, "a row, id or key appears twice in the committed manifests"
    assert set(by_file) <= set(inputs), f"rows of unknown files: {sorted(set(by_file) - set(inputs))}"
    if complete:
        assert lost == 0, f"{lost} input row(s) have no manifest row"
        for f, n in inputs.items():
            assert sorted(by_file[f]) == list(range(n)), f
            statuses = Counter(r["status"] for r in rows if r["file"] == f)
            assert statuses["ok"] + statuses["failed"] + statuses["rejected"] == n, (f, statuses)
    assert {r["status"] for r in rows} <= {"ok", "failed", "rejected"}
    for r in rows:
        if r["status"] != "ok":
            assert r["reason"], f"{r['status']} row {r['row_index']} of {r['file']} has no reason"
            assert r["key"] is None or r["status"] == "failed"
    # no current commit marker (the newest generation) without the manifest part it names
    for shard, generation in committed_generations(store).items():
        assert store.exists(part_of(read_commit(store, shard, generation), shard)), shard
    # every ok object exists, decodes, has its row's size and matches its sha256
    for r in ok:
        data = read_output(store, r["key"])
        assert len(data) == r["bytes"] and hashlib.sha256(data).hexdigest() == r["sha256"], r["key"]
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            assert im.size == (r["width"], r["height"]), r["key"]
    report = verify_run(store.url(""), store._storage_options or None)
    assert report.verified, report.summary()
    if complete and succeeded:
        success = read_success(store)
        assert success is not None and success["totals"]["rows"] == sum(inputs.values())
        assert not store.exists("_FAILED.json")
    elif complete:
        assert read_success(store) is None
        failed = json.loads(store.read("_FAILED.json"))
        assert failed["totals"]["rows"] == sum(inputs.values())
    tally.checks += 1
    return rows


def snapshot(store: RunStore) -> dict:
    """Every object under the run prefix with what changes when it is written again."""
    out = {}
    if store._local or store.fs.protocol == "faulty":
        for dirpath, _, names in os.walk(store.root):
            for name in names:
                st = os.stat(os.path.join(dirpath, name))
                out[os.path.join(dirpath, name)] = (st.st_size, st.st_mtime_ns, st.st_ino)
        return out
    store.invalidate()
    for path, info in store.fs.find(store.root, detail=True).items():
        out[path] = (info.get("size"), str(info.get("ETag")), str(info.get("LastModified")))
    return out


def check_rerun_renders_nothing(tally: Tally, cfg, store: RunStore, trace_dir=None) -> None:
    """A rerun of a finished run renders 0 images and writes 0 objects."""
    before = snapshot(store)
    rendered_before = len([e for e in read_trace(trace_dir) if e["event"] == "rendered"]) if trace_dir else 0
    outcome = tally.run(cfg)
    assert (outcome.rows_rendered, outcome.shards_committed) == (0, 0)
    assert outcome.shards_skipped == outcome.shards_total
    assert snapshot(store) == before
    if trace_dir:
        assert len([e for e in read_trace(trace_dir) if e["event"] == "rendered"]) == rendered_before


def check_resources_released(timeout_s: float = 30.0) -> None:
    """No leaked actors: Ray's available CPUs/GPUs come back to the cluster's (give it a moment)."""
    import ray

    deadline = time.time() + timeout_s
    while True:
        total, free = ray.cluster_resources(), ray.available_resources()
        if all(free.get(k, 0) == total.get(k, 0) for k in ("CPU", "GPU")):
            return
        if time.time() > deadline:
            raise AssertionError(f"resources still held after {timeout_s:g}s: available {free}, cluster {total}")
        time.sleep(0.2)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
