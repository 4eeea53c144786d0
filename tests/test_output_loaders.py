"""Outputs load with the libraries users reach for: a run's Parquet shards with Hugging Face
`datasets` (the image column decodes to PIL images), its webdataset tars with `webdataset`."""
import json

import numpy as np
import pytest

from cogview_ray.sinks import encode_image, make_sink
from cogview_ray.storage import RunStore

pytestmark = [pytest.mark.timeout(120)]

# (shard, key, height, width): two shards, as a run has, with sizes that tell images apart
SAMPLES = [("00000", "a-0", 16, 24), ("00000", "a-1", 32, 16), ("00001", "b-0", 24, 40)]


def _meta(key, h, w):
    # what a worker writes: the id and render parameters (fixed keys, so every shard has one schema)
    return {"id": key, "prompt": f"prompt of {key}", "negative_prompt": None, "seed": len(key) * 7,
            "height": h, "width": w, "num_inference_steps": 2, "guidance_scale": 5.0}


def _render_run(tmp_path, fmt):
    store = RunStore(str(tmp_path / "out"), "run1")
    for shard in sorted({s for s, *_ in SAMPLES}):
        with make_sink(fmt, store, shard, "png") as sink:
            for s, key, h, w in SAMPLES:
                if s == shard:
                    pixels = np.full((h, w, 3), (h * 5, w * 3, 200), np.uint8)
                    sink.add(key, encode_image(pixels, "png"), _meta(key, h, w))
    return tmp_path / "out" / "run1" / "shards"


def test_parquet_output_loads_as_images_with_datasets(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # local files only; never ask the Hub
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    datasets.disable_progress_bars()
    shards = _render_run(tmp_path, "parquet")
    ds = datasets.load_dataset("parquet", data_files=str(shards / "*.parquet"), split="train",
                               cache_dir=str(tmp_path / "hf"))
    assert isinstance(ds.features["image"], datasets.Image)
    assert ds.num_rows == len(SAMPLES)
    by_key = {row["key"]: row for row in ds}
    for _, key, h, w in SAMPLES:
        row = by_key[key]
        image = row["image"]
        assert image.size == (w, h) and image.mode == "RGB"
        assert image.getpixel((0, 0)) == (h * 5, w * 3, 200)
        assert (row["member"], row["height"], row["width"], row["seed"]) == (f"{key}.png", h, w, len(key) * 7)
    raw = ds.cast_column("image", datasets.Image(decode=False))[0]["image"]
    assert raw["path"] == "a-0.png" and raw["bytes"][:8] == b"\x89PNG\r\n\x1a\n"


def test_webdataset_output_loads_with_webdataset(tmp_path):
    wds = pytest.importorskip("webdataset")
    shards = _render_run(tmp_path, "webdataset")
    urls = [str(p) for p in sorted(shards.glob("*.tar"))]
    assert len(urls) == 2
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False).decode("pil"))
    assert [s["__key__"] for s in samples] == [key for _, key, _, _ in SAMPLES]
    for sample, (_, key, h, w) in zip(samples, SAMPLES):
        assert sample["png"].size == (w, h)
        assert sample["png"].getpixel((0, 0)) == (h * 5, w * 3, 200)
        assert sample["json"] == json.loads(json.dumps(_meta(key, h, w)))
