"""Credentials never leak (issue 4, "Security"): an S3 run (moto) whose storage_options hold a
planted secret; the secret is grepped for in the driver's stdout/stderr, Ray's logs, every
object of the run (`_run.json`, manifest parts, markers, `_SUCCESS.json`, images) and in the
error of a failing S3 run. Keys are built from sanitized ids only (test_bad_input covers
`../x` and `/etc/passwd`); pickle weights are refused (tests/model/test_loading.py)."""
import re
import io
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

pytest.register_assert_rewrite("tests.reliability")

from cogview_ray.cli import main as cli_main  # noqa: E402
from cogview_ray.storage import RunStore  # noqa: E402
from tests.conftest import PLANTED_SECRET  # noqa: E402
from tests.reliability import (  # noqa: E402, F401 (tally is a fixture)
    check_invariants, check_resources_released, overrides, start_render, tally, write_prompts)

pytest_plugins = ["tests.reliability"]
pytestmark = [pytest.mark.ray, pytest.mark.s3, pytest.mark.timeout(180)]


def _config_with_secret(tmp_path: Path, storage_options: dict) -> Path:
    config = tmp_path / "cfg.yaml"
    config.write_text(json.dumps({"output": {"storage_options": storage_options}}))  # JSON is YAML
    return config


def _strings_in_parquet(data: bytes) -> str:
    table = pq.read_table(io.BytesIO(data))
    return json.dumps(table.to_pylist(), default=str)


def test_planted_secret_never_leaks(ray_cluster, tiny_checkpoint, tmp_path, s3_bucket, s3_storage_options, capfd,
                                   tally):
    import fsspec
    import ray

    assert s3_storage_options["secret"] == PLANTED_SECRET
    fs = fsspec.filesystem("s3", **s3_storage_options)
    fs.put_file(write_prompts(tmp_path / "prompts.parquet", n=8), f"{s3_bucket}/in/prompts.parquet")
    config = _config_with_secret(tmp_path, s3_storage_options)
    out_uri = f"s3://{s3_bucket}/renders"
    args = [str(config), *overrides(tiny_checkpoint, f"s3://{s3_bucket}/in/prompts.parquet", out_uri, "sec",
                                    "output.format=webdataset", "workers.num_workers=1")]
    proc = start_render(args, tmp_path, "render")
    tally.runs += 1
    assert proc.wait(timeout=150) == 0, (tmp_path / "render.err").read_text()
    logs = (tmp_path / "render.out").read_text() + (tmp_path / "render.err").read_text()
    assert "worker w00.0 ready" in logs and PLANTED_SECRET not in logs

    store = RunStore(out_uri, "sec", s3_storage_options)
    check_invariants(tally, store, {f"{s3_bucket}/in/prompts.parquet": 8})
    store.invalidate()
    objects = fs.find(store.root)
    names = {o[len(store.root) + 1:] for o in objects}
    assert {"_run.json", "_SUCCESS.json"} <= names
    assert any(n.startswith("manifest/") for n in names) and any(n.startswith("commits/") for n in names)
    assert any(n.startswith("shards/") for n in names)
    for obj in objects:
        data = fs.cat_file(obj)
        assert PLANTED_SECRET.encode() not in data, obj
        if obj.endswith(".parquet"):
            assert PLANTED_SECRET not in _strings_in_parquet(data), obj
    run_info = json.loads(store.read("_run.json"))
    assert run_info["config"]["output"]["storage_options"] == "***"

    # Ray's own logs of this cluster: worker stdout/stderr, raylet, GCS
    logs_dir = Path(ray._private.worker._global_node.get_logs_dir_path())
    log_files = [p for p in logs_dir.rglob("*") if p.is_file()]
    assert log_files
    assert not [p for p in log_files if PLANTED_SECRET.encode() in p.read_bytes()]

    # a failing S3 run: its error names the object, never the credentials
    capfd.readouterr()
    bad = overrides(tiny_checkpoint, str(tmp_path / "prompts.parquet"), "s3://no-such-bucket/renders", "sec")
    tally.runs += 1
    rc = cli_main(["render", str(config), *bad])
    out, err = capfd.readouterr()
    assert rc == 2 and "Traceback" not in err
    errors = [ln for ln in err.splitlines() if ln.startswith("cogview-ray: error:")]
    assert len(errors) == 1 and re.fullmatch(
        r"cogview-ray: error: storage create of s3://no-such-bucket/renders/sec/_probe/\S+ failed "
        r"\(not retryable\): its bucket or folder does not exist", errors[0]), errors
    assert PLANTED_SECRET not in out + err
    check_resources_released()
