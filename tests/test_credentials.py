"""Credentials in URLs (user:password@, signed query strings) never leave the process: not in
`_run.json`, the output identity, manifest rows, driver log lines or error messages."""
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cogview_ray import worker as worker_mod
from cogview_ray.cli import main as cli_main
from cogview_ray.config import load_config
from cogview_ray.credentials import redact_text, redacted, strip_userinfo
from cogview_ray.identity import output_defining
from cogview_ray.manifest import manifest_bytes
from cogview_ray.shards import plan_shards

pytestmark = pytest.mark.timeout(300)
SECRET = "planted-URL-SECRET-41c9"


@pytest.mark.parametrize("text,expected", [
    (f"s3://user:{SECRET}@bucket/x", "s3://***@bucket/x"),
    (f"https://host/p.parquet?X-Amz-Signature={SECRET}&a=1", "https://host/p.parquet?***"),
    (f"could not read gs://b/x?token={SECRET} (403)", "could not read gs://b/x?*** (403)"),
    ("/plain/local/path.parquet", "/plain/local/path.parquet"),
    ("a prompt? with a question", "a prompt? with a question"),
])
def test_redact_text(text, expected):
    assert redact_text(text) == expected
    assert strip_userinfo(text) == expected


def test_saved_config_and_identity_hold_no_url_secret():
    cfg = load_config(None, [f"model.path=s3://user:{SECRET}@bucket/ckpt?sig={SECRET}",
                             f"dataset.uri=https://host/p.parquet?X-Amz-Signature={SECRET}",
                             "output.uri=/tmp/out"])
    assert SECRET not in json.dumps(redacted(cfg))
    assert SECRET not in json.dumps(output_defining(cfg))


def test_manifest_rows_hold_no_model_url_secret(tiny_checkpoint, tmp_path, monkeypatch):
    pq.write_table(pa.table({"prompt": ["a red house"]}), str(tmp_path / "p.parquet"))
    monkeypatch.setattr(worker_mod, "resolve_model_path", lambda path, options=None: tiny_checkpoint)
    cfg = load_config(None, [f"model.path=s3://user:{SECRET}@bucket/ckpt?sig={SECRET}", "model.dtype=float32",
                             "model.device=cpu", f"dataset.uri={tmp_path}/p.parquet", "render.height=32",
                             "render.width=32", "render.num_inference_steps=1", f"output.uri={tmp_path}/out"])
    shards, _ = plan_shards(cfg.dataset, None)
    result = worker_mod.RenderWorker(cfg, "r", "w00.0").render_shard(shards[0], 1, 0.0)
    assert [r.status for r in result.records] == ["ok"]
    assert result.records[0].model_path == "s3://***@bucket/ckpt?***"
    assert SECRET.encode() not in manifest_bytes(result.records)


def test_error_messages_hold_no_url_secret(tmp_path, capsys):
    code = cli_main(["render", "configs/demo.yaml", f"dataset.uri=file://{tmp_path}/none.parquet?token={SECRET}",
                     f"output.uri={tmp_path}/out"])
    err = capsys.readouterr().err
    assert code == 2 and "matches no files" in err and "?***" in err and SECRET not in err
