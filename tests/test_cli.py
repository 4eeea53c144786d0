"""The `cogview-ray` command line: make-checkpoint writes a loadable checkpoint; exit codes by error
type; user errors (bad options included) as one line, never a traceback."""
import json

import pytest

from cogview_ray.cli import main
from cogview_ray.errors import ConfigError, LockLost, RunLocked, RunRefused
from cogview_ray.model.loading import CheckpointError
from cogview_ray.storage import StorageError
from tests.conftest import PLANTED_SECRET

pytestmark = pytest.mark.timeout(300)


def test_make_checkpoint_then_load_and_render(tmp_path, capsys):
    from cogview_ray.model.cogview3plus import CogView3PlusPipeline

    out = tmp_path / "tiny"
    assert main(["make-checkpoint", "--preset", "tiny", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "CogView3PlusPipeline"
    assert sorted(p.name for p in out.iterdir()) == [
        "model_index.json", "scheduler", "text_encoder", "tokenizer", "transformer", "vae"]
    pipe = CogView3PlusPipeline.from_pretrained(out, device="cpu")
    res = pipe.generate(["a cat"], [0], 64, 64, num_inference_steps=1)
    assert res.images.shape == (1, 3, 64, 64) and res.finite == [True]


def test_make_checkpoint_rejects_unknown_preset(tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["make-checkpoint", "--preset", "huge", str(tmp_path / "x")])
    assert e.value.code == 2


def test_verify_reports_a_missing_run(tmp_path, capsys):
    assert main(["verify", str(tmp_path / "out" / "nope")]) == 1
    assert "_run.json is missing" in capsys.readouterr().out


def test_render_config_error_is_one_sentence(tmp_path, capsys):
    code = main(["render", "configs/demo.yaml", "render.hieght=64", f"output.uri={tmp_path}"])
    err = capsys.readouterr().err
    assert code == 2
    assert "render.hieght" in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["verify", "report"])
@pytest.mark.parametrize("options, detail", [
    ('{"secret": "' + PLANTED_SECRET, "--storage-options is not valid JSON (Unterminated string"),
    ('["anon"]', "--storage-options must be a JSON object such as '{\"anon\": true}', not a JSON list."),
])
def test_bad_storage_options_are_one_sentence(tmp_path, capsys, command, options, detail):
    code = main([command, str(tmp_path / "out" / "run"), "--storage-options", options])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"cogview-ray: error: {detail}") and err.count("\n") == 1, err
    assert PLANTED_SECRET not in err  # the options may hold credentials: never echoed


def test_run_uri_without_a_run_id_is_one_sentence(capsys):
    assert main(["verify", "s3://bucket"]) == 2
    assert capsys.readouterr().err == ("cogview-ray: error: Run URI 's3://bucket' has no run id after its "
                                       "bucket or folder.\n")


@pytest.mark.parametrize("error, code", [
    (RunLocked("run x is locked by another driver"), 3),
    (LockLost("the run lock of x was taken over by another driver"), 3),
    (RunRefused("run x was made with other settings"), 2),
    (ConfigError("Config key render.height must be at least 1, got 0."), 2),
    (StorageError("writing x failed"), 2),
    (CheckpointError("Checkpoint /x has no model_index.json."), 2),
])
def test_exit_code_comes_from_the_error_type(monkeypatch, capsys, error, code):
    import cogview_ray.verify

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(cogview_ray.verify, "verify_run", fail)
    assert main(["verify", "/tmp/out/run"]) == code
    assert capsys.readouterr().err == f"cogview-ray: error: {error}\n"


def test_a_bug_is_not_dressed_as_a_user_error(monkeypatch):
    import cogview_ray.verify

    def fail(*args, **kwargs):
        raise KeyError("bug")

    monkeypatch.setattr(cogview_ray.verify, "verify_run", fail)
    with pytest.raises(KeyError):
        main(["verify", "/tmp/out/run"])


def test_verify_into_a_closed_pipe_exits_quietly(tmp_path):
    """`cogview-ray verify RUN | head -0`: the reader is gone before the first line; no traceback."""
    import os
    import subprocess
    import sys

    from cogview_ray.storage import RunStore
    from tests.test_verify import fabricate

    fabricate(RunStore(str(tmp_path / "out"), "run1"))
    read, write = os.pipe()
    os.close(read)
    with os.fdopen(write, "wb") as stdout:
        done = subprocess.run([sys.executable, "-m", "cogview_ray.cli", "verify", str(tmp_path / "out" / "run1")],
                              stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=120)
    assert done.returncode == 141 and done.stderr == "", done.stderr
