"""The report's pictures and its text rules: row content shown as plain text (escaped, never
markup or mathtext), and the matplotlib charts (contact sheet, stage times, throughput, busy
time). matplotlib is an optional extra, imported only when a chart is drawn."""
from __future__ import annotations

import html
import io
import re
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from PIL import Image

from .errors import ReportError
from .sinks import iter_container, split_locator
from .storage import RunStore

# Per-image stage times. The first three are the batch's time divided by its size (images of a
# batch are made together); encoding and writing run in a background thread, overlapping the
# next batch. Queue time is per shard, not per image, so it is left out.
RENDER_STAGES = ("text_encoding_s", "denoising_s", "decoding_s")
OUTPUT_STAGES = ("image_encoding_s", "writing_s")
STAGES = RENDER_STAGES + OUTPUT_STAGES
FILES = {"contact_sheet": "contact_sheet.png", "stage_times": "stage_times.png",
         "throughput": "throughput.png", "worker_busy": "worker_busy.png"}
_THREADS = 8
# Characters of row content that are not shown as themselves: C0/C1 controls, lone surrogates
# (unencodable), bidi overrides (they reorder the text around them).
_UNPRINTABLE_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff\u202a-\u202e\u2066-\u2069]")
_NAMED_ESCAPES = {"\t": "\\t", "\n": "\\n", "\r": "\\r"}



# -- row content as plain text -----------------------------------------------------------------


def plain_text(value: Any) -> str:
    """`value` as printable text: unprintable characters become backslash escapes (`\\x00`, `\\r`)."""
    return _UNPRINTABLE_RE.sub(_escape_char, str(value))


def _escape_char(m: re.Match) -> str:
    c = m.group()
    return _NAMED_ESCAPES.get(c) or (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")


def html_text(value: Any) -> str:
    return html.escape(plain_text(value))


def _label(value: Any) -> str:
    """Text for a matplotlib title or tick label, shown as is: an escaped `$` never starts
    mathtext, and matplotlib shows it as `$`."""
    return plain_text(value).replace("$", r"\$")


# -- drawing --------------------------------------------------------------------------------


def figure_class():
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib.figure import Figure
    except ImportError:
        raise ReportError("cogview-ray report needs matplotlib: pip install 'cogview-ray[report]'.") from None
    return Figure


def fetch_images(store: RunStore, keys: list[str]) -> dict:
    """Image bytes by output key; each shard container is streamed once."""
    files = [k for k in keys if split_locator(k)[1] is None]
    by_container: dict = defaultdict(set)
    for k in keys:
        rel, member = split_locator(k)
        if member is not None:
            by_container[rel].add(member)
    out = {}
    with ThreadPoolExecutor(max_workers=_THREADS) as pool:
        out.update(zip(files, pool.map(store.read, files)))
    for rel, members in by_container.items():
        for name, data in iter_container(store, rel):
            if name in members:
                out[f"{rel}#{name}"] = data
                members.discard(name)
                if not members:
                    break
    return out


def draw_contact_sheet(store: RunStore, sample: list[dict], path: str, cols: int = 6, thumb_px: int = 160) -> None:
    Figure = figure_class()
    images = fetch_images(store, [s["key"] for s in sample])
    n_rows = max(1, -(-len(sample) // cols))
    fig = Figure(figsize=(cols * 1.9, n_rows * 2.2), dpi=100)
    if not sample:
        fig.text(0.5, 0.5, "no ok images in committed shards", ha="center", va="center")
    for i, s in enumerate(sample):
        ax = fig.add_subplot(n_rows, cols, i + 1)
        ax.set_axis_off()
        try:
            with Image.open(io.BytesIO(images[s["key"]])) as im:
                im = im.convert("RGB")
                im.thumbnail((thumb_px, thumb_px))
                ax.imshow(np.asarray(im))
        except Exception:  # noqa: BLE001 - a missing or broken image is shown, not fatal
            ax.text(0.5, 0.5, "unreadable", ha="center", va="center", transform=ax.transAxes)
        name = plain_text(s["id"])
        ax.set_title(f"{_label(name[:20] + '…' if len(name) > 21 else name)}\nseed {s['seed']}", fontsize=6.5)
    fig.suptitle(f"{len(sample)} sampled ok images (id, seed)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)


def draw_stage_times(values: dict, path: str) -> None:
    Figure = figure_class()
    from matplotlib.ticker import MaxNLocator
    fig = Figure(figsize=(12, 6.5), dpi=100)
    for i, name in enumerate((*STAGES, "total")):
        ax = fig.add_subplot(2, 3, i + 1)
        v = values[name]
        if len(v):
            ax.hist(v, bins=int(min(40, max(5, np.sqrt(len(v))))), color="C0" if name != "total" else "C3")
            ax.axvline(float(np.median(v)), color="k", linestyle="--", linewidth=1)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
        ax.xaxis.set_major_locator(MaxNLocator(5))
        ax.tick_params(labelsize=7)
        label = name.removesuffix("_s").replace("_", " ")
        ax.set_title(f"{label} (median {np.median(v):.3g} s)" if len(v) else label, fontsize=9)
        ax.set_xlabel("seconds per image", fontsize=8)
        ax.set_ylabel("images", fontsize=8)
    fig.suptitle("Per-image time by stage (ok images; rendering stages are batch time / batch size)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)


def draw_throughput(series: dict, path: str) -> None:
    Figure = figure_class()
    fig = Figure(figsize=(10, 4), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    edges = series["edges_s"]
    if edges:
        ax.stairs(series["rate"], edges, fill=True, alpha=0.5, label="images/s (binned)")
        ax2 = ax.twinx()
        ax2.step([0.0, *series["commits_s"]], [0, *series["commits_images"]], where="post", color="C1",
                 label="images committed (cumulative)")
        ax2.set_ylabel("images committed", fontsize=8)
        ax2.set_ylim(bottom=0)
        handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
        ax.legend(handles=handles, fontsize=8, loc="upper left")
    else:
        ax.text(0.5, 0.5, "no committed shards", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("seconds since the run started", fontsize=8)
    ax.set_ylabel("images per second", fontsize=8)
    ax.set_title("Images per second, by shard commit time", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)


def draw_worker_busy(busy: dict, path: str) -> None:
    Figure = figure_class()
    fig = Figure(figsize=(10, max(3.0, 0.45 * len(busy) + 2.0)), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    names = list(busy)
    render = [busy[w]["render_s"] for w in names]
    output = [busy[w]["output_s"] for w in names]
    # positions, not names, on the axis: names are labels only (two may look alike once escaped)
    ax.barh(range(len(names)), render, label="rendering (text encoding, denoising, decoding)")
    ax.barh(range(len(names)), output, left=render, label="encoding + writing (overlaps rendering)")
    ax.set_yticks(range(len(names)), labels=[_label(w) for w in names])
    for y, w in enumerate(names):
        n = busy[w]["images"]
        ax.text(render[y] + output[y], y, f"  {n} image{'s' if n != 1 else ''}", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.margins(x=0.12)
    ax.set_xlabel("busy seconds", fontsize=8)
    ax.set_title("Busy time per worker (worker id w{slot}.{generation})", fontsize=10)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=2)
    fig.tight_layout()
    fig.savefig(path)
