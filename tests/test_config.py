"""Config loading: YAML + overrides, strict keys, one-sentence refusals, the output identity
(resume diffs, default run ids), redaction."""
import dataclasses
import hashlib
import json
import pickle

import pytest

from cogview_ray import identity
from cogview_ray.config import NightlyConfig, RunConfig, load_config
from cogview_ray.credentials import redacted
from cogview_ray.errors import ConfigError
from cogview_ray.identity import diff_output_defining, output_defining
from tests.conftest import PLANTED_SECRET

pytestmark = pytest.mark.timeout(60)

REQUIRED = ["model.path=ckpt/tiny", "dataset.uri=data/prompts.parquet", "output.uri=outputs/x"]


def _load(*overrides):
    return load_config(None, REQUIRED + list(overrides))


def _one_sentence(message: str) -> bool:
    return "\n" not in message and message.endswith(".") and message[0].isupper()


def test_defaults_and_types():
    cfg = _load()
    assert isinstance(cfg, RunConfig)
    assert cfg.render.height == 1024 and cfg.render.guidance_scale == 5.0
    assert cfg.workers.num_workers == "auto" and cfg.resume == "auto" and cfg.takeover_lock is False
    assert cfg.output.storage_options == {} and type(cfg.output.storage_options) is dict
    assert cfg.model.path == "ckpt/tiny"  # relative paths stay as given
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.render.height = 512  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(cfg)) == cfg


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "model: {path: /ckpt, dtype: float32}\n"
        "dataset: {uri: 's3://b/prompts/*.parquet', id_column: uid, shard_size: 64}\n"
        "render: {height: 768, width: 512, guidance_scale: 7}\n"
        "workers: {num_workers: 2}\n"
        "output: {uri: 's3://b/out', storage_options: {anon: false, client_kwargs: {region_name: eu-west-1}}}\n"
    )
    cfg = load_config(path, ["render.height=256", "workers.num_workers=auto", "resume=force",
                             "output.storage_options.client_kwargs.endpoint_url=http://127.0.0.1:9"])
    assert cfg.render.height == 256 and cfg.render.width == 512
    assert cfg.render.guidance_scale == 7.0 and isinstance(cfg.render.guidance_scale, float)
    assert cfg.model.dtype == "float32" and cfg.dataset.id_column == "uid" and cfg.dataset.shard_size == 64
    assert cfg.workers.num_workers == "auto" and cfg.resume == "force"
    assert cfg.output.storage_options == {
        "anon": False,
        "client_kwargs": {"region_name": "eu-west-1", "endpoint_url": "http://127.0.0.1:9"},
    }
    assert load_config(path, []).workers.num_workers == 2


def test_num_workers_integer_forms(tmp_path):
    assert _load("workers.num_workers=3").workers.num_workers == 3
    path = tmp_path / "q.yaml"
    path.write_text('workers: {num_workers: "4"}\n')
    assert load_config(path, REQUIRED).workers.num_workers == 4


def test_empty_yaml_file_is_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config(path, REQUIRED) == _load()


@pytest.mark.parametrize(
    "override, key, value",
    [
        ("render.hieght=5", "render.hieght", None),
        ("nonsense=1", "nonsense", None),
        ("render=5", "render", None),
        ("render.height=abc", "render.height", "abc"),
        ("render.batch_size=1.5", "render.batch_size", "1.5"),
        ("takeover_lock=perhaps", "takeover_lock", "perhaps"),
        ("dataset.limit=[1]", "dataset.limit", "[1]"),
        ("render.batch_size=0", "render.batch_size", "0"),
        ("workers.num_workers=0", "workers.num_workers", "0"),
        ("workers.num_workers=-2", "workers.num_workers", "-2"),
        ("workers.num_workers=many", "workers.num_workers", "many"),
        ("workers.max_in_flight=0", "workers.max_in_flight", "0"),
        ("workers.max_attempts=0", "workers.max_attempts", "0"),
        ("workers.shard_timeout_s=0", "workers.shard_timeout_s", "0"),
        ("workers.startup_timeout_s=0", "workers.startup_timeout_s", "0"),
        ("workers.startup_timeout_s=-5", "workers.startup_timeout_s", "-5"),
        ("workers.gpus_per_worker=-1", "workers.gpus_per_worker", "-1"),
        ("render.height=0", "render.height", "0"),
        ("render.width=-16", "render.width", "-16"),
        ("render.width=1.5", "render.width", "1.5"),
        ("render.num_inference_steps=0", "render.num_inference_steps", "0"),
        ("render.num_inference_steps=1001", "render.num_inference_steps", "1001"),
        ("render.guidance_scale=nan", "render.guidance_scale", "nan"),
        ("render.guidance_scale=inf", "render.guidance_scale", "inf"),
        ("render.guidance_scale=-1", "render.guidance_scale", "-1"),
        ("render.seed=-1", "render.seed", "-1"),
        ("output.format=zip", "output.format", "zip"),
        ("output.image_format=gif", "output.image_format", "gif"),
        ("model.dtype=float16", "model.dtype", "float16"),
        ("model.compile=fast", "model.compile", "fast"),
        ("model.device=tpu", "model.device", "tpu"),
        ("output.quality=0", "output.quality", "0"),
        ("output.quality=101", "output.quality", "101"),
        ("dataset.shard_size=0", "dataset.shard_size", "0"),
        ("dataset.limit=0", "dataset.limit", "0"),
        ("dataset.prompt_column=", "dataset.prompt_column", "None"),
        ("dataset.prompt_column=' '", "dataset.prompt_column", "' '"),
        ("output.run_id=../escape", "output.run_id", "../escape"),
        ("output.run_id=a/b", "output.run_id", "a/b"),
        ("output.run_id=.hidden", "output.run_id", ".hidden"),
        ("resume=maybe", "resume", "maybe"),
        ("model.path=null", "model.path", "None"),
        ("nightly.keep_days=0", "nightly.keep_days", "0"),
        ("nightly.timezone=Mars/Olympus", "nightly.timezone", "Mars/Olympus"),
    ],
)
def test_refusals_name_key_and_value(override, key, value):
    with pytest.raises(ConfigError) as info:
        _load(override)
    message = str(info.value)
    assert key in message, message
    if value is not None:
        assert value in message, message
    assert _one_sentence(message), message


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(ConfigError, match=r"render\.hieght .*did you mean render\.height\?"):
        _load("render.hieght=768")


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("model: {path: /x}\noutput: {uri: /o, fromat: png}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, ["dataset.uri=/d"])
    assert "output.fromat" in str(info.value) and str(path) in str(info.value)


@pytest.mark.parametrize("missing", ["model.path", "dataset.uri", "output.uri"])
def test_required_settings(missing):
    given = [o for o in REQUIRED if not o.startswith(missing)]
    with pytest.raises(ConfigError) as info:
        load_config(None, given)
    assert str(info.value) == f"Config key {missing} is required but not set."


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml", REQUIRED)
    bad = tmp_path / "bad.yaml"
    bad.write_text("render: {height: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad, REQUIRED)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(scalar, REQUIRED)
    with pytest.raises(ConfigError, match="key=value"):
        _load("render.height")
    with pytest.raises(ConfigError, match="render.height"):
        _load('render.height="')


def test_redaction_hides_planted_secret(monkeypatch):
    monkeypatch.setenv("COGVIEW_TEST_SECRET", PLANTED_SECRET)
    cfg = _load(
        "output.uri=s3://bucket/out",
        "output.storage_options.key=AKIA-testing",
        "output.storage_options.secret=${oc.env:COGVIEW_TEST_SECRET}",
        f"model.path=s3://user:{PLANTED_SECRET}@models/cogview",
    )
    assert cfg.output.storage_options["secret"] == PLANTED_SECRET  # resolved for fsspec
    saved = redacted(cfg)
    text = json.dumps(saved)
    assert PLANTED_SECRET not in text and "AKIA-testing" not in text
    assert saved["output"]["storage_options"] == "***"
    assert saved["model"]["path"] == "s3://***@models/cogview"
    assert saved["render"] == dataclasses.asdict(cfg.render)  # everything else as resolved
    assert PLANTED_SECRET not in json.dumps(output_defining(cfg))


def test_secret_never_in_error_messages():
    with pytest.raises(ConfigError) as info:
        _load(f"output.storage_options={PLANTED_SECRET}")
    assert PLANTED_SECRET not in str(info.value) and "output.storage_options" in str(info.value)
    with pytest.raises(ConfigError) as info:
        _load(f"output.storage_options.secret:{PLANTED_SECRET}")
    assert PLANTED_SECRET not in str(info.value)


def test_output_defining_diff():
    old = output_defining(_load())
    assert diff_output_defining(old, output_defining(_load())) == []
    # as saved in _run.json and read back
    assert diff_output_defining(json.loads(json.dumps(old)), output_defining(_load())) == []
    # not output-defining: scheduling, workers, resume flags, storage options
    same = _load("workers.max_attempts=9", "model.device=cpu", "resume=force",
                 "output.storage_options.anon=true", "output.run_id=r1")
    assert diff_output_defining(old, output_defining(same)) == []
    changed = _load("render.height=768", "output.image_format=jpeg", "dataset.limit=10",
                    "model.compile=max-autotune", "model.attention=cudnn")
    assert diff_output_defining(old, output_defining(changed)) == [
        "dataset.limit: null -> 10",
        "model.attention: (absent) -> \"cudnn\"",
        "model.compile: (absent) -> \"max-autotune\"",
        "output.image_format: \"png\" -> \"jpeg\"",
        "render.height: 1024 -> 768",
    ]
    partial = json.loads(json.dumps(old))
    del partial["render"]["seed"]
    assert diff_output_defining(partial, old) == ["render.seed: (absent) -> 0"]
    assert set(output_defining(_load())) == {"model", "dataset", "render", "output"}


def test_validate_config_on_plain_objects():
    from cogview_ray.config import validate_config

    cfg = _load("output.run_id=nightly-2024.01_a")
    assert validate_config(cfg) == cfg
    for bad in ["nightly\n", "a" * 129, "", "..", "-x"]:
        broken = dataclasses.replace(cfg, output=dataclasses.replace(cfg.output, run_id=bad))
        with pytest.raises(ConfigError, match="output.run_id"):
            validate_config(broken)
    broken = dataclasses.replace(cfg, render=dataclasses.replace(cfg.render, batch_size=True))
    with pytest.raises(ConfigError, match="render.batch_size must be an integer, got True"):
        validate_config(broken)


def test_unresolvable_secret_interpolation_is_named_without_detail():
    with pytest.raises(ConfigError) as info:
        _load("output.storage_options.secret=${oc.env:COGVIEW_SURELY_UNSET_VAR}")
    assert str(info.value) == "Config key output.storage_options.secret could not be resolved."


def test_sizes_need_only_be_positive_integers():
    # the limits (range, multiple) belong to the loaded pipeline: the worker checks them per row
    cfg = _load("render.height=100", "render.width=4096")
    assert (cfg.render.height, cfg.render.width) == (100, 4096)


def test_output_identity_of_existing_settings_is_unchanged():
    settings = output_defining(_load())
    assert settings == {
        "model": {"path": "ckpt/tiny", "dtype": "auto", "render_scheme": 2},
        "dataset": {"uri": "data/prompts.parquet", "prompt_column": "prompt", "id_column": None,
                    "shard_size": 1000, "limit": None},
        "render": {"height": 1024, "width": 1024, "num_inference_steps": 50, "guidance_scale": 5.0,
                   "negative_prompt": None, "seed": 0, "max_sequence_length": None, "max_prompt_chars": 10000},
        "output": {"format": "files", "image_format": "png", "quality": 95, "key_scheme": 2},
    }
    # what driver.default_run_id hashes (it changed with the prompt limit, key scheme 2 and the
    # max_sequence_length default None: the driver cannot tell "224 for CogView3-Plus" from
    # "224 for CogView4", so None is recorded as itself; and render scheme 2, the new kernels)
    blob = json.dumps({"settings": settings, "input": {"files": []}}, sort_keys=True)
    assert hashlib.sha256(blob.encode()).hexdigest()[:12] == "ee441d638791"


def test_a_new_setting_defines_the_output_unless_marked():
    @dataclasses.dataclass(frozen=True)
    class WatermarkedOutput(type(_load().output)):
        watermark: str = "none"
        upload_threads: int = dataclasses.field(default=8, metadata={"output_defining": False})

    cfg = _load()
    cfg = dataclasses.replace(cfg, output=WatermarkedOutput(**dataclasses.asdict(cfg.output)))
    assert output_defining(cfg)["output"] == {"format": "files", "image_format": "png", "quality": 95,
                                              "watermark": "none", "key_scheme": 2}


def test_parquet_container_scheme_defines_parquet_runs_only():
    files = output_defining(_load())
    parquet = output_defining(load_config(None, REQUIRED + ["output.format=parquet"]))
    assert "parquet_scheme" not in files["output"]
    assert parquet["output"]["parquet_scheme"] == identity.PARQUET_SCHEME == 2
    # a parquet run made before the Image struct (no scheme recorded) is refused on resume
    old = {**parquet, "output": {k: v for k, v in parquet["output"].items() if k != "parquet_scheme"}}
    assert diff_output_defining(old, parquet) == ["output.parquet_scheme: (absent) -> 2"]


def test_seed_scheme_enters_the_identity_once_it_changes(monkeypatch):
    from cogview_ray.rows import derive_seed

    # scheme 1 is what derive_seed computes today; a change there must bump SEED_SCHEME
    assert identity.SEED_SCHEME == 1 and derive_seed(1234, "night-01") == 6132676611397535527
    old = output_defining(_load())
    assert "seed_scheme" not in old["render"]
    monkeypatch.setattr(identity, "SEED_SCHEME", 2)
    new = output_defining(_load())
    assert new["render"]["seed_scheme"] == 2
    assert diff_output_defining(old, new) == ["render.seed_scheme: (absent) -> 2"]


def test_nightly_section_is_part_of_the_config_but_not_of_the_identity(tmp_path):
    path = tmp_path / "n.yaml"
    path.write_text("nightly: {timezone: Europe/Berlin, keep_days: 3}\n")
    cfg = load_config(path, REQUIRED + ["nightly.run_id_format=%d.%m.%Y"])  # '%' starts no YAML value
    assert cfg.nightly == NightlyConfig(timezone="Europe/Berlin", run_id_format="%d.%m.%Y", keep_days=3)
    assert load_config(None, REQUIRED).nightly == NightlyConfig()
    assert output_defining(cfg) == output_defining(_load())
    with pytest.raises(ConfigError, match=r"Override for config key render.height could not be parsed"):
        _load("render.height=%d")
