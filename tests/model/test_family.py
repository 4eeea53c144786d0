"""The model-family seam: load_pipeline picks the family from model_index.json, refuses unknown
ones in one sentence, and CogView3PlusPipeline satisfies the Pipeline protocol."""
import inspect
import json
import shutil
from pathlib import Path

import pytest

from cogview_ray.model import FAMILIES, CheckpointError, Pipeline, config_hash, load_pipeline
from cogview_ray.model.cogview3plus import CogView3PlusPipeline

pytestmark = pytest.mark.timeout(120)


class FakePipeline:
    """A second family stand-in: records how load_pipeline called it; not a full Pipeline."""

    calls = []

    @classmethod
    def from_pretrained(cls, path, device=None, dtype=None, compile="none"):
        cls.calls.append((str(path), device, dtype, compile))
        return cls()


def _index_only(tmp_path: Path, class_name) -> Path:
    index = {"transformer": ["diffusers", "X"]}
    if class_name is not None:
        index["_class_name"] = class_name
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    return tmp_path


def _copy_with_tokenizer_config(src, dst: Path, **changes) -> Path:
    shutil.copytree(src, dst)
    path = dst / "tokenizer" / "tokenizer_config.json"
    cfg = {k: v for k, v in {**json.loads(path.read_text()), **changes}.items() if v is not None}
    path.write_text(json.dumps(cfg))
    return dst


def test_load_pipeline_picks_the_family_from_model_index(tiny_checkpoint):
    pipe = load_pipeline(tiny_checkpoint, device="cpu", dtype="float32")
    assert type(pipe) is CogView3PlusPipeline
    assert pipe.identity == {"family": "CogView3PlusPipeline", "path": tiny_checkpoint,
                             "config_hash": config_hash(tiny_checkpoint), "compile": "none",
                             "attention": "flash", "dtype": "float32", "kernels": 2}
    assert (pipe.size_multiple, pipe.max_size_px, pipe.max_sequence_length) == (16, 1024, 224)
    # float32 on CPU: oneDNN GEMMs and channels-last VAE convolutions (both families; bf16 has neither)
    assert pipe.transformer.transformer_blocks[0].attn1.onednn and pipe.vae.channels_last
    bf16 = load_pipeline(tiny_checkpoint, device="cpu", dtype="bfloat16")
    assert not bf16.transformer.transformer_blocks[0].attn1.onednn and not bf16.vae.channels_last


def test_load_pipeline_dispatches_to_the_registered_class(tmp_path, monkeypatch):
    monkeypatch.setitem(FAMILIES, "FakePipeline", f"{__name__}:FakePipeline")
    monkeypatch.setattr(FakePipeline, "calls", [])
    root = _index_only(tmp_path, "FakePipeline")
    got = load_pipeline(root, device="cpu", dtype="bfloat16", compile="default")
    assert type(got) is FakePipeline
    assert FakePipeline.calls == [(str(root), "cpu", "bfloat16", "default")]
    assert not isinstance(got, Pipeline)  # the protocol check can fail


@pytest.mark.parametrize("class_name", ["FluxPipeline", None])
def test_unknown_family_is_refused_in_one_sentence(tmp_path, class_name):
    _index_only(tmp_path, class_name)
    with pytest.raises(CheckpointError) as err:
        load_pipeline(tmp_path, device="cpu")
    msg = str(err.value)
    assert msg.startswith(str(tmp_path / "model_index.json")) and repr(class_name) in msg
    assert msg.endswith("(supported: CogView3PlusPipeline, CogView4Pipeline).") and msg.count(". ") == 0


def test_cogview3plus_satisfies_the_protocol(tiny_checkpoint):
    pipe = CogView3PlusPipeline.from_pretrained(tiny_checkpoint, device="cpu", dtype="float32")
    assert isinstance(pipe, Pipeline)
    for name in ("from_pretrained", "generate", "warmup", "validate_size"):
        want = list(inspect.signature(getattr(Pipeline, name)).parameters)
        got = list(inspect.signature(getattr(CogView3PlusPipeline, name)).parameters)
        assert got == want, name
    assert {"family", "path", "config_hash"} <= set(pipe.identity)


def test_token_limit_comes_from_the_tokenizer(tiny_checkpoint, tmp_path):
    short = _copy_with_tokenizer_config(tiny_checkpoint, tmp_path / "short", model_max_length=8)
    pipe = CogView3PlusPipeline.from_pretrained(short, device="cpu", dtype="float32")
    assert pipe.max_sequence_length == 8
    # the limit is generate()'s default: a 10-word prompt is truncated at 8 tokens
    got = pipe.generate(["a cat", "one two three four five six seven eight nine ten"], [1, 2], 32, 32,
                        num_inference_steps=1)
    assert got.truncated == [False, True]
    unset = _copy_with_tokenizer_config(tiny_checkpoint, tmp_path / "unset", model_max_length=None)
    assert CogView3PlusPipeline.from_pretrained(unset, device="cpu").max_sequence_length == 224
