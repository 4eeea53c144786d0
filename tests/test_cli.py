"""The `cogview-ray` command line: make-checkpoint writes a loadable checkpoint; verify's exit codes."""
import json

import pytest

from cogview_ray.cli import main

pytestmark = pytest.mark.timeout(300)


def test_make_checkpoint_then_load_and_render(tmp_path, capsys):
    from cogview_ray.model.pipeline import CogView3PlusPipeline

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
