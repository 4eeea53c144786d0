"""Output bytes are a contract: a fixed config rendered through RenderWorker (no Ray) gives the
sha256s recorded before the issue-8 redesign (commit bf23f8b), in every output format."""
import hashlib
import json

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cogview_ray.config import load_config
from cogview_ray.shards import plan_shards
from cogview_ray.worker import RenderWorker

pytestmark = pytest.mark.timeout(600)

ROWS = {
    "id": ["a", "b", "c", "d", "e", "f"],
    "prompt": ["a red house", "a blue boat at sea", "two cats", "a red house", "mountains at dawn", "  "],
    "height": [64, 96, 64, 64, None, 64],
    "width": [64, 64, 96, 64, None, 64],
    "guidance_scale": [5.0, 1.0, 3.5, 5.0, None, 5.0],
    "negative_prompt": [None, "blurry", None, "ugly", None, None],
    "seed": [None, 42, None, 7, None, None],
    "num_inference_steps": [2, 3, 2, 2, None, 2],
}
# id -> (seed, sha256 of the encoded PNG, bytes), as rendered at bf23f8b
EXPECTED = {
    "a": (8149325763410288342, "bb90dc369e612367135fb6d90e1f0682065591ee4e5985094cf0884f96071358", 10972),
    "b": (42, "b866b68a6142de68fbe81347983101d7fc413a075041b020e5e63f48b6872cb9", 15847),
    "c": (7275804171881844312, "d2bb2728bc7c169d541a203e737f7fda9078b14f5c0dcf60a2205386e8ca1338", 16369),
    "d": (7, "b42990b9ecd3e3162f6347c9aea68711394b285b722c20d1955ded14ceb1f353", 10647),
    "e": (8914158675834069703, "cf9984fe8748c8e5a749187f5839788fa74f96ab4ce52afa201d769dc3612912", 10814),
}
CONTAINERS = {
    "webdataset": ("shards/f00000-000000.tar", "7d6c6389884c02ee542b677794c08560425fe4765d6a0ff1e4908928b928d6b5"),
    # Changed on purpose (issue 11): `image` became the struct {bytes, path} of a Hugging Face
    # `datasets.Image` column, declared in the schema metadata, so `load_dataset("parquet")` gives
    # images. The image bytes inside (EXPECTED) are unchanged; was 0371747e...aac181c2.
    "parquet": ("shards/f00000-000000.parquet", "21c6cedeed9efebac45f29f8833cd428d8c25ecd9e2faa7e5282951aa23806a4"),
}


@pytest.mark.parametrize("fmt", ["files", "webdataset", "parquet"])
def test_fixed_config_renders_the_recorded_bytes(fmt, tiny_checkpoint, tmp_path):
    pq.write_table(pa.table(ROWS), str(tmp_path / "p.parquet"))
    out = tmp_path / "out"
    cfg = load_config(None, [
        f"model.path={tiny_checkpoint}", "model.dtype=float32", "model.device=cpu",
        f"dataset.uri={tmp_path}/p.parquet", "dataset.id_column=id", "dataset.shard_size=6",
        "render.height=64", "render.width=64", "render.num_inference_steps=2", "render.seed=11",
        "render.batch_size=2", f"output.uri={out}", f"output.run_id=g-{fmt}", f"output.format={fmt}"])
    shards, _ = plan_shards(cfg.dataset, fsspec.filesystem("file"))
    result = RenderWorker(cfg, f"g-{fmt}", "w00.0").render_shard(shards[0], 1, 0.0)
    got = {r.id: (r.seed, r.sha256, r.bytes) for r in result.records if r.status == "ok"}
    assert got == EXPECTED, json.dumps(got, indent=1)
    rejected = [(r.id, r.status, r.reason) for r in result.records if r.status != "ok"]
    assert rejected == [("f", "rejected", "empty_prompt")]
    if fmt in CONTAINERS:
        rel, digest = CONTAINERS[fmt]
        assert hashlib.sha256((out / f"g-{fmt}" / rel).read_bytes()).hexdigest() == digest
    else:
        for r in result.records:
            if r.status == "ok":
                assert hashlib.sha256((out / f"g-{fmt}" / r.key).read_bytes()).hexdigest() == EXPECTED[r.id][1]
