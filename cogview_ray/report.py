"""`cogview-ray report`: one run as a static page, `report.html`, with PNG charts: a contact sheet
of sampled images, per-image time by stage, images per second over time, per-worker busy time.

Everything is read back from storage the way a user would (committed shards only). Plots need
matplotlib, an optional extra (`pip install 'cogview-ray[report]'`), imported only here.
"""
from __future__ import annotations

import html
import json
import os
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

import numpy as np

from . import layout
from .errors import ReportError
from . import manifest as mf
from .records import count_reasons
from .run_logs import describe_logs
from .runtime_check import describe_runtime, read_runtime
from .report_charts import (FILES, OUTPUT_STAGES, RENDER_STAGES, STAGES, draw_contact_sheet,
                            draw_stage_times, draw_throughput, draw_worker_busy, figure_class, html_text)
from .storage import RunStore

# the manifest columns the report reads
COLUMNS = ["shard_id", "id", "seed", "status", "reason", "key", "worker_id", *STAGES]


@dataclass
class ReportData:
    run_url: str
    run_id: str
    rows: dict  # manifest columns (COLUMNS) of committed shards, as lists
    commits: list[dict]  # commit markers, in commit order
    run_info: Optional[dict]
    success: Optional[dict]
    totals: dict = field(default_factory=dict)
    reasons: dict = field(default_factory=dict)  # rows per reason code, as _SUCCESS.json and verify count
    logs: Optional[str] = None  # where the driver logs and worker errors are (`_logs/`), if any
    runtime: Optional[str] = None  # what rendered it (`_runtime.json`): torch, device, attention, ...

    @property
    def complete(self) -> bool:
        return self.success is not None


@dataclass
class ReportResult:
    out_dir: str
    html: str
    pngs: dict  # name -> path
    data: ReportData
    sample: list[dict]


def collect(store: RunStore) -> ReportData:
    """Manifest rows, commit markers and run files of one run."""
    store.invalidate()
    run_info = mf.read_run_info(store)
    generations = mf.committed_generations(store)
    shards = sorted(generations)
    if run_info is None and not shards:
        raise ReportError(f"{store.url()} holds no run (no {layout.RUN_INFO} and no committed shards).")
    markers = mf.read_commits(store, shards, generations)
    commits = sorted(markers.values(), key=lambda c: (c.get("committed_at") or 0.0, c["shard_id"]))
    table = mf.read_manifest(store, columns=COLUMNS, markers=markers)  # the parts these markers name
    rows = table.to_pydict()
    statuses = Counter(rows["status"])
    totals = {"rows": table.num_rows, "ok": statuses["ok"], "failed": statuses["failed"],
              "rejected": statuses["rejected"], "shards_committed": len(shards),
              "failed_shards": sum(1 for c in commits if c.get("status") == "failed")}
    return ReportData(store.url(), store.run_id, rows, commits, run_info, mf.read_success(store), totals,
                      count_reasons(rows["reason"]))


# -- what the charts show -------------------------------------------------------------------


def sample_ok_rows(data: ReportData, n: int, seed: int = 0) -> list[dict]:
    """Up to `n` ok rows, a seeded random sample (the same for the same run), sorted by id."""
    r = data.rows
    ok = [{"id": r["id"][i], "seed": r["seed"][i], "key": r["key"][i], "shard_id": r["shard_id"][i]}
          for i, s in enumerate(r["status"]) if s == "ok"]
    ok.sort(key=lambda x: str(x["id"]))
    picked = random.Random(seed).sample(ok, min(n, len(ok)))
    return sorted(picked, key=lambda x: str(x["id"]))


def stage_values(data: ReportData) -> dict:
    """Per-image seconds of each stage (ok rows), plus their sum per image as `total`."""
    r = data.rows
    ok = [i for i, s in enumerate(r["status"]) if s == "ok"]
    out = {s: np.array([r[s][i] for i in ok if r[s][i] is not None], dtype=float) for s in STAGES}
    out["total"] = np.array([sum(r[s][i] for s in STAGES) for i in ok
                             if all(r[s][i] is not None for s in STAGES)], dtype=float)
    return out


def throughput(data: ReportData, bins: int = 30) -> dict:
    """Images per second over the run, from commit markers: each shard's ok images count at the
    time the driver committed it. Shard-granular; time 0 is the run's start (`_run.json`)."""
    marks = [(float(c["committed_at"]), int(c.get("ok", 0))) for c in data.commits if c.get("committed_at")]
    if not marks:
        return {"edges_s": [], "rate": [], "cumulative": [], "commits_s": [], "commits_images": []}
    first = min(t for t, _ in marks)
    start = float((data.run_info or {}).get("created_at") or first)
    start = min(start, first)
    end = max(t for t, _ in marks)
    span = max(end - start, 1e-3)
    edges = np.linspace(0.0, span, min(bins, max(3, 2 * len(marks))) + 1)
    counts, _ = np.histogram([t - start for t, _ in marks], bins=edges, weights=[k for _, k in marks])
    widths = np.diff(edges)
    marks.sort()
    return {"edges_s": edges.tolist(), "rate": (counts / widths).tolist(),
            "cumulative": np.cumsum(counts).tolist(),
            "commits_s": [t - start for t, _ in marks], "commits_images": np.cumsum([k for _, k in marks]).tolist()}


def worker_busy(data: ReportData) -> dict:
    """Per worker: seconds rendering (text encoding, denoising, decoding), seconds encoding and
    writing images (overlapping rendering), and images made; from manifest rows."""
    r = data.rows
    busy: dict = defaultdict(lambda: {"render_s": 0.0, "output_s": 0.0, "images": 0})
    for i, w in enumerate(r["worker_id"]):
        if w is None:
            continue
        b = busy[w]
        b["render_s"] += sum(r[s][i] or 0.0 for s in RENDER_STAGES)
        b["output_s"] += sum(r[s][i] or 0.0 for s in OUTPUT_STAGES)
        b["images"] += r["status"][i] == "ok"
    return dict(sorted(busy.items()))


# -- the page ---------------------------------------------------------------------------------


def _prompts(store: RunStore, sample: list[dict]) -> dict:
    """Prompts of sampled rows, read from their shards' manifest parts only."""
    out = {}
    for shard in sorted({s["shard_id"] for s in sample}):
        t = mf.read_part(store, shard, columns=["id", "prompt"])
        out.update(zip(t.column("id").to_pylist(), t.column("prompt").to_pylist()))
    return out


def _stats_rows(values: dict) -> str:
    cells = []
    for name, v in values.items():
        if not len(v):
            continue
        p50, p90, p99 = np.percentile(v, [50, 90, 99])
        cells.append(f"<tr><th>{html.escape(name)}</th><td>{p50:.4g}</td><td>{p90:.4g}</td>"
                     f"<td>{p99:.4g}</td><td>{v.max():.4g}</td><td>{v.sum():.4g}</td></tr>")
    return "".join(cells)


def write_html(data: ReportData, store: RunStore, sample: list[dict], values: dict, busy: dict,
               series: dict, path: str) -> None:
    e = html_text  # everything read from the run is text, never markup
    t = data.totals
    status = f"complete ({layout.SUCCESS})" if data.complete else f"not complete (no {layout.SUCCESS})"
    cfg = (data.run_info or {}).get("config", {})
    render = cfg.get("render", {})
    model = cfg.get("model", {})
    output = cfg.get("output", {})
    settings = {"model.path": model.get("path"), "model.dtype": model.get("dtype"),
                "render size": f"{render.get('width')}x{render.get('height')}",
                "render.num_inference_steps": render.get("num_inference_steps"),
                "render.guidance_scale": render.get("guidance_scale"), "render.seed": render.get("seed"),
                "output.format": output.get("format"), "output.image_format": output.get("image_format")}
    reasons = Counter(data.reasons)
    prompts = _prompts(store, sample)
    span = series["edges_s"][-1] if series["edges_s"] else 0.0
    rate = t["ok"] / span if span > 0 else float("nan")
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>cogview-ray report: {e(data.run_id)}</title>",
        "<style>body{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;"
        "text-align:left;font-size:14px}img{max-width:100%}figcaption{color:#555;font-size:13px}</style>",
        "</head><body>",
        f"<h1>Run {e(data.run_id)}</h1><p><code>{e(data.run_url)}</code> &mdash; {e(status)}</p>",
        f"<p id='logs'>Logs: <code>{e(data.logs)}</code></p>" if data.logs else "",
        f"<p id='runtime'>Rendered by: {e(data.runtime)}</p>" if data.runtime else "",
        "<h2>Totals</h2><table>",
        *(f"<tr><th>{k}</th><td id='total-{k}'>{t[k]}</td></tr>" for k in
          ("rows", "ok", "failed", "rejected", "shards_committed", "failed_shards")),
        f"<tr><th>images/s (first start to last commit)</th><td id='total-rate'>{rate:.3g}</td></tr></table>",
    ]
    if reasons:
        parts.append("<h2>Reason codes (failed and rejected rows; ok rows with a note)</h2><table>")
        parts += [f"<tr><th>{e(k)}</th><td>{v}</td></tr>" for k, v in reasons.most_common()]
        parts.append("</table>")
    parts.append("<h2>Settings</h2><table>")
    parts += [f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in settings.items()]
    parts.append("</table>")
    parts += [
        "<h2>Contact sheet</h2>",
        f"<figure><img src='{FILES['contact_sheet']}' alt='contact sheet'><figcaption>A seeded random sample of "
        f"{len(sample)} of {t['ok']} ok images, captioned with id and seed.</figcaption></figure>",
        "<table><tr><th>id</th><th>seed</th><th>prompt</th><th>key</th></tr>",
        *(f"<tr class='sample'><td>{e(s['id'])}</td><td>{e(s['seed'])}</td>"
          f"<td>{e(prompts.get(s['id'], ''))}</td><td><code>{e(s['key'])}</code></td></tr>" for s in sample),
        "</table>",
        "<h2>Time per image by stage</h2>",
        f"<figure><img src='{FILES['stage_times']}' alt='stage time histograms'><figcaption>From the manifest's "
        "per-row timings of ok images. Text encoding, denoising and decoding are measured per batch and divided "
        "by the batch size; encoding and writing run in a background thread while the next batch renders."
        "</figcaption></figure>",
        "<table><tr><th>seconds</th><th>p50</th><th>p90</th><th>p99</th><th>max</th><th>sum</th></tr>",
        _stats_rows(values), "</table>",
        "<h2>Images per second over time</h2>",
        f"<figure><img src='{FILES['throughput']}' alt='images per second'><figcaption>Each shard's ok images "
        "are counted when the driver committed the shard (its commit marker's <code>committed_at</code>), so the "
        "curve moves in steps of one shard; time 0 is when the run was first started, so worker start-up and "
        "pauses between resumed invocations show as zero throughput.</figcaption></figure>",
        "<h2>Busy time per worker</h2>",
        f"<figure><img src='{FILES['worker_busy']}' alt='worker busy time'><figcaption>Sums of manifest timings "
        "per worker id (a replaced worker gets a new generation number). Idle time and model loading are not "
        "included.</figcaption></figure><table><tr><th>worker</th><th>rendering s</th><th>encoding + writing s"
        "</th><th>images</th></tr>",
        *(f"<tr><td>{e(w)}</td><td>{b['render_s']:.4g}</td><td>{b['output_s']:.4g}</td><td>{b['images']}</td>"
          "</tr>" for w, b in busy.items()),
        "</table></body></html>",
    ]
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(parts))


def build_report(run_uri: str, out_dir: Optional[str] = None,
                 storage_options: Optional[Mapping[str, Any]] = None, *, sample_size: int = 24,
                 seed: int = 0, store: Optional[RunStore] = None) -> ReportResult:
    """Write `report.html` and its PNGs for the run at `run_uri` into `out_dir`
    (default `./report-{run_id}`); returns their paths and the numbers behind them."""
    figure_class()  # fail before reading anything if matplotlib is missing
    store = store or RunStore.from_run_uri(run_uri, storage_options)
    data = collect(store)
    data.logs = describe_logs(store)
    runtime = read_runtime(store)  # None for runs made before `_runtime.json`
    data.runtime = describe_runtime(runtime) if runtime else None
    out_dir = out_dir or f"report-{store.run_id}"
    os.makedirs(out_dir, exist_ok=True)
    sample = sample_ok_rows(data, sample_size, seed)
    values, series, busy = stage_values(data), throughput(data), worker_busy(data)
    pngs = {name: os.path.join(out_dir, f) for name, f in FILES.items()}
    draw_contact_sheet(store, sample, pngs["contact_sheet"])
    draw_stage_times(values, pngs["stage_times"])
    draw_throughput(series, pngs["throughput"])
    draw_worker_busy(busy, pngs["worker_busy"])
    page = os.path.join(out_dir, "report.html")
    write_html(data, store, sample, values, busy, series, page)
    with open(os.path.join(out_dir, "report.json"), "w", encoding="utf-8") as f:
        json.dump({"run": data.run_url, "complete": data.complete, "logs": data.logs, "runtime": data.runtime,
                   "totals": data.totals,
                   "reasons": data.reasons, "throughput": series, "workers": busy}, f, indent=2, sort_keys=True)
    return ReportResult(out_dir, page, pngs, data, sample)
